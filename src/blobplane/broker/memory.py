"""The broker's own memory: the memfds it allocates, seals, accepts from clients and hands out.

The broker holds exactly one fd per blob (`FdTable`). While a client fills a
blob it created, that is the writable memfd the broker made; from the seal
on, and for every blob a client put, it is a read-only reopening of the
memfd. So every fd a reader gets is read-only twice over: by its open mode
(it cannot add seals or map writable) and by the seals (nobody can write,
shrink or grow it). When the broker exits, the kernel frees every memfd
whose last fd and mapping are gone: nothing is ever left in /dev/shm.
"""

from __future__ import annotations

import errno
import fcntl
import os

from blobplane.backends.checks import (
    F_SEAL_FUTURE_WRITE,
    SIZE_SEALS,
    check_allocated,
    check_received_fd,
    check_regular_and_size,
    get_seals,
)
from blobplane.backends.memfd import allocate_memfd, reopen_readonly, seal_memfd
from blobplane.errors import DescriptorTooShort, InvalidSize, NotSealed, os_errors
from blobplane.types import BlobId

__all__ = [
    "FdTable",
    "allocate",
    "check_put",
    "holding",
    "read_range",
    "reopen_readonly",
    "seal",
    "seal_for_good",
]


def allocate(size: int, blob_id: BlobId) -> int:
    """A new memfd of *size* bytes for a client to fill; the caller owns it.

    Sealed against shrinking and growing at once: the client gets a writable
    fd, and the bytes the broker accounts for must stay the bytes it holds.
    """
    fd = allocate_memfd(size, f"blobplane-broker:{blob_id}")
    try:
        with os_errors(f"sealing the size of blob {blob_id}"):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal(fd: int, blob_id: BlobId, size: int) -> None:
    """Apply every seal; `BlobBusy` while anyone (the client) still maps it writable.

    The size seals were there from the start, so the size is what the create
    declared; it is checked all the same, as the one thing a seal publishes.
    """
    seal_memfd(fd, f"blob {blob_id}")
    _check_exact_size(fd, size, f"blob {blob_id}")


def read_range(fd: int, offset: int, length: int) -> bytes:
    """*length* bytes of a sealed blob from *offset*, read through its fd: for a small range,
    one copy costs less than a mapping made and unmade."""
    with os_errors(f"reading {length} bytes of a blob"):
        data = os.pread(fd, length, offset)
        if len(data) != length:  # pragma: no cover - the size seals hold the length
            raise OSError(errno.EIO, f"a read of {length} bytes got {len(data)}")
    return data


def holding(data: bytes | memoryview) -> int:
    """A read-only fd of a new memfd holding *data*, sealed against every change."""
    fd = allocate_memfd(len(data), "blobplane-broker:inline")
    try:
        with os_errors("writing a blob's bytes"):
            if data and os.pwrite(fd, data, 0) != len(data):  # pragma: no cover - tmpfs
                raise OSError(errno.EIO, "a short write into a new memfd")
        seal_memfd(fd, "an inline blob")
        return reopen_readonly(fd)
    finally:
        os.close(fd)


def seal_for_good(fd: int) -> bool:
    """Seal a kept pool slot against every write, now that its producer went; whether it took.

    Through a writable reopening of the broker's read-only fd. The kernel
    refuses (False) while any process still maps the slot writable (a child
    the producer forked, say), or if its seals were sealed: then nothing
    would stop that process from changing a published blob.
    """
    try:
        writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(writable, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except OSError:
        return False
    finally:
        os.close(writable)
    return True


def _check_exact_size(fd: int, size: int, what: str) -> int:
    with os_errors(f"inspecting {what}"):
        actual = os.fstat(fd).st_size
    if actual != size:
        raise InvalidSize(
            f"{what} holds {actual} bytes but was declared as {size}; the declared size "
            "must be the memfd's size exactly"
        )
    return actual


def check_put(fd: int, size: int, *, pooled: bool) -> int:
    """Refuse a client's fd unless it is a memfd the broker may hand to readers as it is.

    The checks of `recv_blob` (a regular file of at least *size* bytes, sealed
    against shrinking and growing), and on top of them a write seal: a blob
    the broker publishes must not change under its readers. A plain blob
    needs F_SEAL_WRITE (immutable for good); a pool slot F_SEAL_FUTURE_WRITE
    at least (only its producer, who keeps its mapping, writes to it, and
    only after the broker said the slot is free).

    Returns the bytes the memfd holds, which is what the blob is charged:
    exactly *size* for a plain blob (anything else is refused, so no client
    hides memory behind a small declared size), the whole slot for a pool
    slot, whose payload may be shorter than the slot.
    """
    # The checks of `check_received_fd`, with one read of the seals for both.
    check_regular_and_size(fd, 0, f"fd {fd}")
    with os_errors("reading the seals of a blob"):
        seals = get_seals(fd)
    check_regular_and_size(fd, size, f"fd {fd}")  # after the seals: see check_received_fd
    if seals is None or seals & SIZE_SEALS != SIZE_SEALS:
        check_received_fd(fd, size)  # refuses it, in the words recv_blob uses
        with os_errors("reading the seals of a blob"):
            seals = get_seals(fd) or 0  # sealed by its owner meanwhile
    if pooled:
        if not seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            raise NotSealed(
                f"the pool slot lacks F_SEAL_FUTURE_WRITE (seals=0x{seals:x}): any process "
                "could map it writable and change it under its readers. Publish slots of a "
                "blobplane BlobPool"
            )
    elif not seals & fcntl.F_SEAL_WRITE:
        raise NotSealed(
            f"the memfd lacks F_SEAL_WRITE (seals=0x{seals:x}), so its contents could still "
            "change under readers. Seal it (ProducerBlob.seal()) before put, or publish a "
            "pool slot with put_pooled"
        )
    # Every page there: a sparse memfd would be filled in by whoever reads it,
    # charged to their memory, and hide its real cost from the limit.
    check_allocated(fd, size, f"fd {fd}")
    if pooled:
        with os_errors(f"inspecting fd {fd}"):
            held = os.fstat(fd).st_size
        if held < size:  # pragma: no cover - check_regular_and_size refused it already
            raise DescriptorTooShort(f"fd {fd} holds {held} bytes, fewer than {size}")
        return held
    return _check_exact_size(fd, size, f"the memfd of a put of {size} bytes")


class FdTable:
    """The broker's one fd per blob, by blob id. Closing is idempotent."""

    def __init__(self) -> None:
        self._fds: dict[BlobId, int] = {}

    def add(self, blob_id: BlobId, fd: int) -> None:
        self._fds[blob_id] = fd

    def get(self, blob_id: BlobId) -> int:
        return self._fds[blob_id]

    def replace(self, blob_id: BlobId, fd: int) -> None:
        """Hold *fd* for the blob from now on and close the one held before."""
        old, self._fds[blob_id] = self._fds[blob_id], fd
        os.close(old)

    def take(self, blob_id: BlobId) -> int:
        """Stop holding the blob's fd and hand it to the caller, who closes it."""
        return self._fds.pop(blob_id)

    def dup(self, blob_id: BlobId) -> int:
        """A duplicate to send: it stays valid even if the blob is freed while it is in flight."""
        with os_errors(f"duplicating the fd of blob {blob_id}"):
            return os.dup(self._fds[blob_id])

    def close(self, blob_id: BlobId) -> None:
        fd = self._fds.pop(blob_id, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._fds

    def __len__(self) -> int:
        return len(self._fds)
