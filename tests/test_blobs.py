"""The allocator, producer and reader handles, in one process."""

from __future__ import annotations

import gc
import mmap
import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobplane import (
    BlobBackend,
    BlobId,
    BlobToken,
    FilePath,
    Named,
    SharedMemoryBlobs,
    UnixFd,
    read_blob_contents,
)
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    BlobNotFound,
    BlobSealed,
    DescriptorMismatch,
    InvalidSize,
    LeaseExpired,
    OutOfBounds,
)
from leaks import blob_mappings

BACKENDS = [BlobBackend.MEMFD, BlobBackend.POSIX_SHM, BlobBackend.TEMP_FILE]
MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [0, 1, 4096, 3 * MiB + 5])
def test_round_trip(backend: BlobBackend, size: int) -> None:
    payload = os.urandom(size)
    with SharedMemoryBlobs(backend) as blobs, blobs.create(size) as blob:
        blob.write_all(payload)
        blob.seal()
        with blobs.map_read(blob.token, blob.descriptor) as mapped:
            assert len(mapped) == size
            with mapped.as_slice() as view:
                assert view.readonly
                assert view == payload
        assert read_blob_contents(blob.descriptor, size) == payload


def test_platform_default_is_memfd_on_linux() -> None:
    with SharedMemoryBlobs() as blobs, blobs.create(1) as blob:
        assert blobs.backend is BlobBackend.MEMFD
        assert isinstance(blob.descriptor, UnixFd)


@pytest.mark.parametrize(
    ("backend", "kind"),
    [
        (BlobBackend.MEMFD, UnixFd),
        (BlobBackend.POSIX_SHM, Named),
        (BlobBackend.TEMP_FILE, FilePath),
    ],
)
def test_descriptor_kind_follows_backend(backend: BlobBackend, kind: type) -> None:
    with SharedMemoryBlobs(backend) as blobs, blobs.create(8) as blob:
        assert isinstance(blob.descriptor, kind)
        assert blob.id == blob.token.id
        assert blob.token.size == blob.size == 8


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=3 * MiB),
    data=st.data(),
)
def test_writes_land_at_their_offset(size: int, data: st.DataObject) -> None:
    offset = data.draw(st.integers(min_value=0, max_value=size), label="offset")
    chunk = data.draw(st.binary(max_size=size - offset), label="chunk")
    with SharedMemoryBlobs() as blobs, blobs.create(size) as blob:
        blob.write_all(chunk, offset)
        blob.seal()
        contents = read_blob_contents(blob.descriptor, size)
    expected = bytes(offset) + chunk + bytes(size - offset - len(chunk))
    assert contents == expected


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=64 * 1024),
    offset=st.integers(min_value=-(1 << 20), max_value=1 << 20),
    length=st.integers(min_value=0, max_value=1 << 17),
)
def test_out_of_bounds_writes_change_nothing(size: int, offset: int, length: int) -> None:
    fits = offset >= 0 and offset + length <= size
    with SharedMemoryBlobs() as blobs, blobs.create(size) as blob:
        if fits:
            blob.write_all(b"\xff" * length, offset)
            return
        with pytest.raises(OutOfBounds, match=r"past the end|offset"):
            blob.write_all(b"\xff" * length, offset)
        blob.seal()
        assert read_blob_contents(blob.descriptor, size) == bytes(size)


def test_buffer_is_writable_zero_copy_view() -> None:
    with SharedMemoryBlobs() as blobs, blobs.create(16) as blob:
        with blob.buffer as view:
            assert len(view) == 16
            assert not view.readonly
            view[3:6] = b"abc"
        blob.seal()
        assert read_blob_contents(blob.descriptor, 16)[3:6] == b"abc"


def test_write_all_accepts_any_contiguous_or_strided_buffer() -> None:
    array = np.arange(12, dtype=np.uint16).reshape(3, 4)
    with SharedMemoryBlobs() as blobs, blobs.create(48) as blob:
        blob.write_all(array)
        blob.write_all(array[:, ::2], offset=24)
        blob.seal()
        contents = read_blob_contents(blob.descriptor, 48)
    assert contents[:24] == array.tobytes()
    assert contents[24:36] == array[:, ::2].tobytes()


@pytest.mark.parametrize("size", [-1, 1.5, True, "10", 2**62 + 1])
def test_impossible_sizes_are_refused(size: object) -> None:
    with SharedMemoryBlobs() as blobs, pytest.raises(InvalidSize):
        blobs.create(size)  # type: ignore[arg-type]


def test_size_beyond_host_memory_is_refused_with_advice() -> None:
    with SharedMemoryBlobs() as blobs, pytest.raises(InvalidSize, match="max_blob_size"):
        blobs.create(2**60)


def test_unknown_and_cleaned_up_tokens() -> None:
    with SharedMemoryBlobs() as blobs:
        stranger = BlobToken(BlobId.new(), 10)
        with pytest.raises(BlobNotFound, match="never created by this allocator"):
            blobs.map_read(stranger, UnixFd(0))
        blob = blobs.create(10)
        token, descriptor = blob.token, blob.descriptor
        blobs.cleanup(token)
        blobs.cleanup(token)  # idempotent
        blobs.cleanup(stranger)
        with pytest.raises(BlobNotFound):
            blobs.map_read(token, descriptor)
        with pytest.raises(BlobClosed, match="cleaned up"):
            blob.write_all(b"x")
        with pytest.raises(BlobClosed):
            _ = blob.buffer
        with pytest.raises(BlobClosed):
            blob.seal()


def test_descriptor_or_token_that_does_not_match() -> None:
    with SharedMemoryBlobs() as blobs, blobs.create(10) as first, blobs.create(10) as second:
        with pytest.raises(DescriptorMismatch, match="does not belong"):
            blobs.map_read(first.token, second.descriptor)
        forged = BlobToken(first.id, 1 << 20)
        with pytest.raises(DescriptorMismatch, match="does not match"):
            blobs.map_read(forged, first.descriptor)
        blobs.cleanup(forged)  # a forged token cleans nothing up
        assert first.token in blobs


def test_write_after_seal_is_refused_by_library_and_kernel() -> None:
    with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs, blobs.create(4096) as blob:
        blob.write_all(b"sealed")
        blob.seal()
        blob.seal()  # sealing twice is fine
        with pytest.raises(BlobSealed):
            blob.write_all(b"x")
        with pytest.raises(BlobSealed):
            _ = blob.buffer
        fd = blob.fileno()
        for attempt in (
            lambda: os.pwrite(fd, b"x", 0),
            lambda: os.ftruncate(fd, 0),
            lambda: os.ftruncate(fd, 8192),
            lambda: mmap.mmap(fd, 4096, access=mmap.ACCESS_WRITE),
        ):
            with pytest.raises(PermissionError):
                attempt()
        assert read_blob_contents(blob.descriptor, 6 + 4090)[:6] == b"sealed"


@pytest.mark.parametrize(
    "backend", [BlobBackend.MEMFD, BlobBackend.POSIX_SHM, BlobBackend.TEMP_FILE]
)
def test_sendable_is_set_while_a_sealed_fd_blob_lives(backend: BlobBackend) -> None:
    """What a channel reads to hand a blob over: only for a sealed, live memfd blob."""
    with SharedMemoryBlobs(backend) as blobs:
        blob = blobs.create(64)
        assert blob.sendable is None  # not sealed yet
        blob.seal()
        if backend is BlobBackend.MEMFD:
            assert isinstance(blob.descriptor, UnixFd)
            assert blob.sendable == (blob.fileno(), blob.token)
        else:
            assert blob.sendable is None  # a name travels no channel
        blob.cleanup()
        assert blob.sendable is None  # its fd is closed, the number may be reused


def test_seal_waits_for_views_of_the_buffer() -> None:
    with SharedMemoryBlobs() as blobs, blobs.create(64) as blob:
        array = np.frombuffer(blob.buffer, dtype=np.uint8)
        with pytest.raises(BlobBusy, match="release them first"):
            blob.seal()
        assert not blob.sealed
        del array
        blob.seal()
        assert blob.sealed


def test_closing_a_read_with_live_arrays_defers_the_unmap() -> None:
    with SharedMemoryBlobs() as blobs, blobs.create(8192) as blob:
        blob.write_all(b"\x07" * 8192)
        blob.seal()
        mapped = blobs.map_read(blob.token, blob.descriptor)
        baseline = blob_mappings()
        array = np.frombuffer(mapped.as_slice(), dtype=np.uint8)
        mapped.close()
        mapped.close()
        assert mapped.closed
        with pytest.raises(BlobClosed):
            mapped.as_slice()
        assert blob_mappings() == baseline  # still mapped: the array uses it
        assert int(array.sum()) == 7 * 8192
        assert not array.flags.writeable
        del array
        gc.collect()
        assert blob_mappings() == baseline - 1


def test_cleanup_with_live_producer_views_never_pulls_memory_away() -> None:
    with SharedMemoryBlobs(BlobBackend.POSIX_SHM) as blobs:
        blob = blobs.create(4096)
        view = blob.buffer
        blobs.cleanup(blob.token)
        view[0] = 1  # still mapped, though the name is gone
        assert view[0] == 1
        view.release()


def test_lease_expiry_and_collection() -> None:
    now = [1000.0]
    with SharedMemoryBlobs(clock=lambda: now[0]) as blobs:
        short = blobs.create(16, lease_ms=50)
        long = blobs.create(16, lease_ms=10_000)
        forever = blobs.create(16)
        blobs.map_read(short.token, short.descriptor).close()
        now[0] += 0.049
        assert blobs.collect_expired() == []
        now[0] += 0.001
        with pytest.raises(LeaseExpired, match="50 ms lease"):
            blobs.map_read(short.token, short.descriptor)
        blobs.renew(long.token, 20_000)
        now[0] += 15
        assert blobs.collect_expired() == [short.token]
        assert short.closed
        assert long.token in blobs
        assert forever.token in blobs
        assert blobs.collect_expired() == []


def test_invalid_leases_are_refused() -> None:
    with SharedMemoryBlobs() as blobs:
        for lease in (0, -5, 1.5):
            with pytest.raises(InvalidSize, match="lease_ms"):
                blobs.create(16, lease_ms=lease)  # type: ignore[arg-type]


def test_closed_allocator_refuses_new_blobs_and_frees_old_ones() -> None:
    blobs = SharedMemoryBlobs()
    blob = blobs.create(10)
    blobs.close()
    blobs.close()
    assert blob.closed
    with pytest.raises(BlobClosed):
        blobs.create(10)


@pytest.mark.parametrize("backend", [BlobBackend.POSIX_SHM, BlobBackend.TEMP_FILE])
def test_files_live_privately(backend: BlobBackend) -> None:
    with SharedMemoryBlobs(backend) as blobs, blobs.create(10) as blob:
        path = blob.descriptor.path if isinstance(blob.descriptor, FilePath) else None
        if isinstance(blob.descriptor, Named):
            from blobplane.backends.files import named_path

            path = named_path(blob.descriptor.name)
        assert path is not None
        folder = os.path.dirname(path)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert len(os.path.basename(path).split("-")[1]) == 32  # 128 random bits
        blob.seal()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o400


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_blobs_leave_nothing_behind(backend: BlobBackend) -> None:
    with SharedMemoryBlobs(backend) as blobs:
        for size in range(0, 300 * 97, 97):
            with blobs.create(size) as blob:
                blob.write_all(b"z" * size)
                blob.seal()
                with blobs.map_read(blob.token, blob.descriptor) as mapped:
                    assert len(mapped.as_slice()) == size
        assert len(blobs) == 0


def test_collected_allocator_unlinks_its_files() -> None:
    from blobplane.backends.private_dir import shm_root

    before = set(os.listdir(shm_root()))
    blobs = SharedMemoryBlobs(BlobBackend.POSIX_SHM)
    blobs.create(100)
    assert set(os.listdir(shm_root())) != before
    del blobs
    gc.collect()
    assert set(os.listdir(shm_root())) == before


def test_windows_backend_says_it_is_not_implemented() -> None:
    with (
        SharedMemoryBlobs(BlobBackend.WINDOWS) as blobs,
        pytest.raises(NotImplementedError, match="TEMP_FILE"),
    ):
        blobs.create(1)


def test_a_producer_handle_keeps_its_allocator_alive() -> None:
    blob = SharedMemoryBlobs(BlobBackend.POSIX_SHM).create(64)
    gc.collect()
    blob.write_all(b"still here")
    blob.seal()
    assert read_blob_contents(blob.descriptor, 10) == b"still here"
    blob.cleanup()
