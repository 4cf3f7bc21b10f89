"""Filling a broker memfd from a network stream: allocated ahead of the bytes, never sparse.

A blob that arrives over Flight (a DoPut, or a copy fetched from a peer) goes
straight into the memfd the broker will publish. The memfd gets its size and
its size seals at once (what the registry accounts is what it holds), but
its pages are allocated a few MiB ahead of the bytes as they come
(`MADV_POPULATE_WRITE`, else `posix_fallocate`), not all before the first
byte: allocating and zeroing a GiB takes longer than receiving it on this
kind of host, and doing it alongside the transfer hides most of it. Every
page is allocated before anything is written to it, and every byte is
written before the blob is sealed, so a sealed blob is never sparse
(`Filling.finish` checks it).

The size is checked against what the host can still back (`check_can_allocate`)
before anything is made, as for every broker blob.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from blobplane.backends.checks import SIZE_SEALS, check_allocated
from blobplane.backends.mapping import MADV_POPULATE_WRITE
from blobplane.backends.memfd import create_sealable_memfd
from blobplane.backends.memlimit import check_can_allocate
from blobplane.errors import InvalidSize, RemoteProtocolError, os_errors

__all__ = ["AHEAD_BYTES", "Filling", "RangeWriter", "allocate_unfilled"]

# How far ahead of the bytes the pages are allocated, in one call each time.
AHEAD_BYTES = 8 << 20
_PAGE = mmap.PAGESIZE
_populate = True


def allocate_unfilled(size: int, name: str) -> int:
    """A sealable memfd of *size* bytes, sealed against shrinking and growing, pages not yet made.

    The caller owns the fd; `Filling` allocates its pages as the bytes come.
    """
    check_can_allocate(size, "a blob from a Flight stream")
    fd = create_sealable_memfd(name)
    try:
        with os_errors(f"sizing a memfd of {size} bytes"):
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Filling:
    """A writable mapping of a broker memfd, written through one `RangeWriter` per range.

    Not thread-safe as a whole, but writers of disjoint ranges may run in
    threads of their own.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._mapped: mmap.mmap | None = None
        self._view: memoryview | None = None
        if size:
            with os_errors("mapping a blob writable"):
                self._mapped = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
            self._view = memoryview(self._mapped)

    def writer(self, start: int, end: int) -> RangeWriter:
        if not 0 <= start <= end <= self.size:
            raise InvalidSize(f"bytes {start} to {end} are not inside a blob of {self.size}")
        return RangeWriter(self, start, end)

    def populate(self, start: int, end: int) -> None:
        """Allocate the pages of [start, end) (page-aligned *start*): before they are written."""
        global _populate
        length = end - start
        if length <= 0:
            return
        with os_errors(f"allocating {length} bytes of shared memory"):
            if _populate and self._mapped is not None:
                try:
                    self._mapped.madvise(MADV_POPULATE_WRITE, start, length)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    _populate = False  # an older kernel: allocate through the fd
            os.posix_fallocate(self.fd, start, length)

    def copy(self, offset: int, data: memoryview) -> None:
        assert self._view is not None
        self._view[offset : offset + len(data)] = data

    def finish(self) -> None:
        """Unmap (a memfd with a writable mapping cannot be sealed) and check it is not sparse."""
        self.close()
        check_allocated(self.fd, self.size, "a blob filled from a Flight stream")

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None


class RangeWriter:
    """Appends to bytes [start, end) of a `Filling`, in order; refuses a byte past *end*."""

    def __init__(self, filling: Filling, start: int, end: int) -> None:
        self._filling = filling
        self.start = start
        self.end = end
        self.position = start
        # Pages before this (page-aligned, or *end*) are allocated.
        self._allocated = start - start % _PAGE

    @property
    def complete(self) -> bool:
        return self.position == self.end

    def append(self, data: memoryview) -> None:
        count = len(data)
        if not count:
            return
        stop = self.position + count
        if stop > self.end:
            raise RemoteProtocolError(
                f"the stream sent more than the {self.end - self.start} bytes it declared"
            )
        if stop > self._allocated:
            ahead = min(self.end, max(stop, self._allocated + AHEAD_BYTES))
            ahead = min(-(-ahead // _PAGE) * _PAGE, self._filling.size)
            self._filling.populate(self._allocated, ahead)
            self._allocated = ahead
        self._filling.copy(self.position, data)
        self.position = stop
