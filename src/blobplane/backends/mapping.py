"""mmap helpers shared by every backend: writable pre-faulted maps and read-only maps.

Python's `mmap` cannot map zero bytes, so a zero-size blob has no mapping at
all and the callers use an empty buffer in its place (the None returns).

A file of hugetlbfs (a memfd made with ``MFD_HUGETLB``, say) is mapped in
whole huge pages (`map_length`): munmap refuses any other length
of such a mapping, and Python's `mmap.close()` does not say so, so a
mapping of 4 KiB of one would outlive its close, pinning the peer's memory
and the reader's address space for as long as the process lives.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable

from blobplane.backends.copying import copy_bytes
from blobplane.backends.hugepages import HUGE_PAGE_SIZE, MADV_POPULATE_WRITE, advise_huge
from blobplane.backends.kernel import HUGETLBFS_MAGIC, filesystem_magic
from blobplane.errors import NotBytesLike, OutOfBounds, os_errors
from blobplane.types import is_int

# MADV_POPULATE_WRITE faults every page in one syscall instead of one fault per
# page during the fill; it also turns a full tmpfs into an ENOSPC/EFAULT error
# here instead of SIGBUS later.
_populate_supported = True


def map_writable(fd: int, size: int, *, prefault: bool) -> mmap.mmap | None:
    """Map the first *size* bytes of *fd* shared and writable; pre-fault when asked.

    The mapping may be longer than *size* (`map_length`).
    """
    global _populate_supported
    if size == 0:
        return None
    length = map_length(fd, size, _stat(fd))
    with os_errors("mapping a blob writable"):
        mapped = mmap.mmap(fd, length, access=mmap.ACCESS_WRITE)
    try:
        advise_huge(mapped, size)
    except BaseException:
        mapped.close()
        raise
    if prefault and _populate_supported:
        try:
            with os_errors(f"pre-faulting {size} bytes of shared memory"):
                try:
                    mapped.madvise(MADV_POPULATE_WRITE)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    _populate_supported = False  # older kernel: fault during the fill
        except BaseException:
            mapped.close()
            raise
    return mapped


def map_length(fd: int, size: int, info: os.stat_result) -> int:
    """How many bytes of *fd* (whose fstat is *info*) to map to read its first *size*: *size*,
    or for a file of hugetlbfs, *size* rounded up to whole huge pages (within the file)."""
    block = info.st_blksize
    # A large block size alone is no proof: shmem reports one for transparent huge pages.
    if block <= mmap.PAGESIZE or filesystem_magic(fd) not in (HUGETLBFS_MAGIC, None):
        return size
    return max(size, min(-(-size // block) * block, info.st_size))


def _stat(fd: int) -> os.stat_result:
    with os_errors("inspecting a blob before mapping it"):
        return os.fstat(fd)


def map_readonly(fd: int, size: int, info: os.stat_result | None = None) -> mmap.mmap | None:
    """Map the first *size* bytes of *fd* shared and read-only (the mapping keeps its own fd).

    *info*: the fd's fstat, when the caller has it (else it is taken here).
    The mapping may be longer than *size* (`map_length`).
    """
    if size == 0:
        return None
    if info is None:
        info = _stat(fd)
    length = map_length(fd, size, info)
    try:
        # access=ACCESS_READ, not prot=PROT_READ: only the former makes the
        # exported memoryviews read-only (a write would otherwise segfault).
        mapped = mmap.mmap(fd, length, access=mmap.ACCESS_READ)
    except OSError:
        # Translated here rather than by a `with` around the call: a channel maps
        # every blob it receives on the way to its answer, and this costs nothing
        # when the call succeeds.
        with os_errors("mapping a blob read-only"):
            raise
    # Maps the file's huge pages whole, where it has them. Tested here first: a
    # channel maps every blob it receives, most of them small.
    if size >= HUGE_PAGE_SIZE:
        advise_huge(mapped, size)
    return mapped


def unmap_when_unused(mapped: mmap.mmap | None) -> None:
    """Unmap now, or leave it to the last live view: never pull memory from under one."""
    if mapped is None:
        return
    try:
        mapped.close()
    except BufferError:
        pass  # views exported: dropping our reference defers the unmap to them


def byte_view(data: object) -> memoryview:
    """Any buffer as a flat view of bytes (strided input is packed once).

    Anything else is `NotBytesLike`: a str (which has no one byte form), an
    int, a list, a released memoryview.
    """
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise NotBytesLike(
            f"cannot write an object of type {type(data).__name__} ({exc}); write a "
            "bytes-like object: bytes, bytearray, memoryview, array.array, a numpy array"
        ) from exc
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    return view.cast("B")


def physical_memory() -> int:
    """Bytes of RAM on this host: the ceiling for a blob or a pool."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - every Linux has both
        return 2**48


def copier(data: object) -> Callable[[memoryview], None]:
    """A function that copies *data* (any buffer) to the start of the view it is given."""
    view = byte_view(data)

    def copy(into: memoryview) -> None:
        copy_bytes(into, view)

    return copy


def write_into(mapped: mmap.mmap | None, size: int, data: object, offset: int, what: str) -> None:
    """Copy *data* (any buffer) into the first *size* bytes of *mapped* at *offset*, bounds-checked.

    The one bounds check behind every `write_all` (blobs, pool loans, broker blobs).
    """
    view = byte_view(data)
    if not is_int(offset):
        raise OutOfBounds(f"offset must be an int, got {type(offset).__name__}")
    end = offset + view.nbytes
    if offset < 0 or end > size:
        raise OutOfBounds(
            f"writing {view.nbytes} bytes at offset {offset} reaches byte {end}, "
            f"past the end of this {size}-byte {what}"
        )
    if mapped is not None and view.nbytes:
        with memoryview(mapped) as whole, whole[offset:end] as part:
            copy_bytes(part, view)
