"""Linux memfd blobs: anonymous, sealable, passed between processes as fds."""

from __future__ import annotations

import errno
import fcntl
import os

from blobplane.backends.base import Allocation, Backend
from blobplane.backends.hugepages import allocate_pages, reserved_huge_pages
from blobplane.backends.memlimit import check_can_allocate
from blobplane.errors import BlobBusy, BlobError, os_errors
from blobplane.types import BlobBackend, BlobId, UnixFd

# MFD_NOEXEC_SEAL (Linux 6.3): without it (or MFD_EXEC) newer kernels log a
# warning per memfd, and refuse it outright under vm.memfd_noexec=2.
MFD_NOEXEC_SEAL = 0x0008
MFD_HUGETLB = 0x0004
_noexec_supported = True

FULL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def memfd_available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(os, "MFD_ALLOW_SEALING")


def create_sealable_memfd(name: str, flags: int = 0) -> int:
    """A new close-on-exec memfd that accepts seals (and *flags*: `MFD_HUGETLB`)."""
    global _noexec_supported
    flags |= os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    with os_errors("creating a memfd"):
        if _noexec_supported:
            try:
                return os.memfd_create(name, flags | MFD_NOEXEC_SEAL)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _noexec_supported = False
        return os.memfd_create(name, flags)


def allocate_memfd(size: int, name: str) -> int:
    """A new sealable memfd of *size* bytes, its pages allocated now; the caller owns the fd.

    posix_fallocate sizes the memfd and allocates its pages in one pass
    (`hugepages.allocate_pages`: in huge pages where the kernel allows): a
    pre-fault that follows only maps them (3-5% faster than faulting fresh
    pages in), and a full /dev/shm or memory cgroup fails here with
    `OutOfSharedMemory`, not with SIGBUS in whoever fills it. A size larger
    than the memory left (the cgroup's limit, MemAvailable) is refused before
    anything is allocated: a memory cgroup would OOM-kill rather than fail the
    fallocate (see `memlimit`).
    """
    check_can_allocate(size, "a memfd blob")
    fd = create_sealable_memfd(name)
    try:
        if size:
            allocate_pages(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def allocate_reserved_memfd(size: int, name: str) -> int | None:
    """A new sealable memfd of *size* bytes in reserved huge pages (`MFD_HUGETLB`), every page
    allocated now; None if there are not enough free, or *size* is under one of them.

    Its size is *size* rounded up to whole huge pages: a hugetlbfs file has
    no other size (ftruncate refuses it). A blob in it is *size* bytes long
    all the same; the rest is zeros nobody reads. The pages are allocated
    whole before anyone maps it, so a reader finds every page there
    (`checks.check_allocated`) and a count that raced with another taker
    fails here, not with SIGBUS later.
    """
    reserved = reserved_huge_pages()
    page = reserved.page_size
    if not page or size < page:
        return None
    rounded = -(-size // page) * page
    if reserved.free * page < rounded:
        return None
    try:
        fd = create_sealable_memfd(name, MFD_HUGETLB)
    except BlobError:
        return None  # a kernel without hugetlbfs: the usual pages
    try:
        os.ftruncate(fd, rounded)
        os.posix_fallocate(fd, 0, rounded)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EINVAL):
            return None  # taken meanwhile, or not to be had: the usual pages
        with os_errors(f"allocating {rounded} bytes of reserved huge pages"):
            raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal_memfd(fd: int, what: str) -> None:
    """Apply every seal (no write, shrink or grow, ever); `BlobBusy` while a writable map exists."""
    with os_errors(f"sealing {what}"):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, FULL_SEALS)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            raise BlobBusy(
                f"cannot seal {what}: a writable mapping of it still exists. Release every "
                "view of its buffer and drop the mapping first; it stays unsealed, so you may "
                "try again"
            ) from exc


def reopen_readonly(fd: int) -> int:
    """A new, read-only open file description of the file behind *fd* (via /proc/self/fd)."""
    with os_errors("reopening a file read-only"):
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class MemfdBackend(Backend):
    kind = BlobBackend.MEMFD
    kernel_sealed = True

    def __init__(self, *, reserved_huge_pages: bool = False) -> None:
        # Blobs of a huge page and more in reserved huge pages, while enough are free.
        self.reserved_huge_pages = reserved_huge_pages

    def create(self, size: int, blob_id: BlobId) -> Allocation:
        name = f"blobplane:{blob_id}"
        fd = allocate_reserved_memfd(size, name) if self.reserved_huge_pages else None
        if fd is None:
            fd = allocate_memfd(size, name)
        return Allocation(UnixFd(fd), fd, size)

    def seal(self, allocation: Allocation) -> None:
        seal_memfd(allocation.fd, "a memfd blob")
