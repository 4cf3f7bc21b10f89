"""Blobs crossing real process boundaries, and what a reader refuses from a peer."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from blobplane import (
    BlobBackend,
    FilePath,
    Named,
    SharedMemoryBlobs,
    UnixFd,
    decode_descriptor,
    map_descriptor,
    read_blob_contents,
)
from blobplane.backends.private_dir import shm_root, sweep_orphans
from blobplane.errors import DescriptorTooShort, NotSealed, WrongKind
from children import CHILD_TIMEOUT_S, run_python

pytestmark = pytest.mark.usefixtures("no_leaks")

READ_IN_CHILD = """
import hashlib, sys
from blobplane import decode_descriptor, map_descriptor
descriptor = decode_descriptor(sys.argv[1])
with map_descriptor(descriptor, int(sys.argv[2])) as mapped, mapped.as_slice() as view:
    print(hashlib.sha256(view).hexdigest())
"""


@pytest.mark.parametrize(
    "backend", [BlobBackend.MEMFD, BlobBackend.POSIX_SHM, BlobBackend.TEMP_FILE]
)
def test_child_reads_what_parent_sealed(backend: BlobBackend) -> None:
    payload = os.urandom(2 << 20)
    with SharedMemoryBlobs(backend) as blobs, blobs.create(len(payload)) as blob:
        blob.write_all(payload)
        blob.seal()
        # An inherited fd keeps its number in the child, so the descriptor travels as is.
        inherited = (blob.fileno(),) if isinstance(blob.descriptor, UnixFd) else ()
        result = run_python(
            READ_IN_CHILD,
            blob.descriptor.to_json().decode(),
            str(len(payload)),
            pass_fds=inherited,
        )
    assert result.stdout.strip() == hashlib.sha256(payload).hexdigest()


PRODUCE_IN_CHILD = """
import sys
from blobplane import BlobBackend, SharedMemoryBlobs
with SharedMemoryBlobs(BlobBackend(sys.argv[1])) as blobs, blobs.create(1 << 20) as blob:
    blob.write_all(b"from the child" * 1000)
    blob.seal()
    print(blob.descriptor.to_json().decode(), flush=True)
    sys.stdin.readline()  # the parent has read it
"""


@pytest.mark.parametrize("backend", [BlobBackend.POSIX_SHM, BlobBackend.TEMP_FILE])
def test_parent_reads_by_name_what_child_produced(backend: BlobBackend) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PRODUCE_IN_CHILD, backend.value],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        descriptor = decode_descriptor(child.stdout.readline())
        assert isinstance(descriptor, Named | FilePath)
        contents = read_blob_contents(descriptor, 1 << 20)
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=CHILD_TIMEOUT_S) == 0
    assert contents.startswith(b"from the child" * 1000)
    assert contents.endswith(bytes((1 << 20) - 14000))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left.settimeout(10)
    right.settimeout(10)
    with left, right:
        yield left, right


HOSTILE_PRODUCER = """
import os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sock.settimeout(30)
fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 1 << 20)
os.pwrite(fd, b"bait" * 1024, 0)
socket.send_fds(sock, [b"here"], [fd])
sock.recv(16)          # the parent looked at it
os.ftruncate(fd, 0)    # the classic attack: shrink it under the reader
sock.send(b"truncated")
sock.recv(16)
"""


def test_unsealed_memfd_from_a_truncating_peer_is_refused_not_a_sigbus(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    parent, child_end = pair
    with subprocess.Popen(
        [sys.executable, "-c", HOSTILE_PRODUCER, str(child_end.fileno())],
        pass_fds=(child_end.fileno(),),
    ) as child:
        _, fds, _, _ = socket.recv_fds(parent, 16, 1)
        (fd,) = fds
        try:
            with pytest.raises(NotSealed, match="lacks F_SEAL_SHRINK and F_SEAL_GROW"):
                map_descriptor(UnixFd(fd), 1 << 20)
            parent.send(b"go")
            assert parent.recv(16) == b"truncated"
            with pytest.raises((NotSealed, DescriptorTooShort)):
                read_blob_contents(UnixFd(fd), 1 << 20)
        finally:
            os.close(fd)
            parent.send(b"bye")
        assert child.wait(timeout=CHILD_TIMEOUT_S) == 0


def test_a_sealed_blob_cannot_be_truncated_by_the_child_holding_it() -> None:
    with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs, blobs.create(1 << 20) as blob:
        blob.write_all(b"keep" * 100)
        blob.seal()
        result = run_python(
            """
            import os, sys
            fd = int(sys.argv[1])
            for attempt in (lambda: os.ftruncate(fd, 0), lambda: os.pwrite(fd, b"evil", 0)):
                try:
                    attempt()
                except PermissionError:
                    print("refused")
            """,
            str(blob.fileno()),
            pass_fds=(blob.fileno(),),
        )
        assert result.stdout.split() == ["refused", "refused"]
        assert read_blob_contents(blob.descriptor, 400) == b"keep" * 100


def _memfd(size: int, *, sealing: bool, seals: int = 0) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING if sealing else 0)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@pytest.mark.parametrize(
    ("make_fd", "error", "message"),
    [
        (lambda: _memfd(4096, sealing=False), NotSealed, "lacks F_SEAL_SHRINK"),
        (lambda: _memfd(4096, sealing=True), NotSealed, "lacks F_SEAL_SHRINK"),
        (
            lambda: _memfd(4096, sealing=True, seals=fcntl.F_SEAL_SHRINK),
            NotSealed,
            "lacks F_SEAL_SHRINK",
        ),
        (lambda: _memfd(100, sealing=True, seals=SIZE_SEALS), DescriptorTooShort, "holds 100"),
        (lambda: os.open(tempfile.gettempdir(), os.O_RDONLY), WrongKind, "a directory"),
        (lambda: socket.socket(socket.AF_UNIX).detach(), WrongKind, "a socket"),
        (lambda: os.open("/dev/null", os.O_RDONLY), WrongKind, "a character device"),
    ],
    ids=[
        "memfd-without-sealing",
        "memfd-unsealed",
        "memfd-shrink-only",
        "memfd-too-short",
        "directory",
        "socket",
        "device",
    ],
)
def test_reader_refuses_unsafe_fds(make_fd: object, error: type[Exception], message: str) -> None:
    fd = make_fd()  # type: ignore[operator]
    try:
        with pytest.raises(error, match=message):
            map_descriptor(UnixFd(fd), 4096)
        with pytest.raises(error, match=message):
            read_blob_contents(UnixFd(fd), 4096)
        os.fstat(fd)  # borrowed, not closed
    finally:
        os.close(fd)


def test_reader_refuses_a_pipe_and_a_dev_shm_file() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(WrongKind, match="a pipe"):
            map_descriptor(UnixFd(read_end), 1)
    finally:
        os.close(read_end)
        os.close(write_end)
    path = os.path.join("/dev/shm", f"blobplane-test-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(NotSealed, match="lacks F_SEAL_SHRINK"):
            map_descriptor(UnixFd(fd), 4096)
    finally:
        os.close(fd)
        os.unlink(path)


def test_files_of_a_killed_producer_are_swept() -> None:
    result = run_python(
        """
        import os
        from blobplane import BlobBackend, SharedMemoryBlobs
        blob = SharedMemoryBlobs(BlobBackend.POSIX_SHM).create(4096)
        print(blob.descriptor.name, flush=True)
        os._exit(0)  # no cleanup, no finalizers: as good as SIGKILL
        """
    )
    name = result.stdout.strip()
    assert name in os.listdir(shm_root())
    assert name in sweep_orphans(shm_root())
    assert name not in os.listdir(shm_root())
