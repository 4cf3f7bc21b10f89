"""Linux memfd blobs: anonymous, sealable, passed between processes as fds."""

from __future__ import annotations

import errno
import fcntl
import os

from blobplane.backends.base import Allocation, Backend
from blobplane.errors import BlobBusy, os_errors
from blobplane.types import BlobBackend, BlobId, UnixFd

# MFD_NOEXEC_SEAL (Linux 6.3): without it (or MFD_EXEC) newer kernels log a
# warning per memfd, and refuse it outright under vm.memfd_noexec=2.
MFD_NOEXEC_SEAL = 0x0008
_noexec_supported = True

FULL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def memfd_available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(os, "MFD_ALLOW_SEALING")


def create_sealable_memfd(name: str) -> int:
    """A new close-on-exec memfd that accepts seals."""
    global _noexec_supported
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    with os_errors("creating a memfd"):
        if _noexec_supported:
            try:
                return os.memfd_create(name, flags | MFD_NOEXEC_SEAL)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _noexec_supported = False
        return os.memfd_create(name, flags)


class MemfdBackend(Backend):
    kind = BlobBackend.MEMFD
    kernel_sealed = True

    def create(self, size: int, blob_id: BlobId) -> Allocation:
        fd = create_sealable_memfd(f"blobplane:{blob_id}")
        try:
            if size:
                # Sizes the memfd and allocates its pages in one pass: the pre-fault
                # that follows then only maps them (3-5% faster than faulting fresh
                # pages in), and a full /dev/shm fails here with ENOSPC, not SIGBUS.
                with os_errors(f"allocating {size} bytes for a memfd"):
                    os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            raise
        return Allocation(UnixFd(fd), fd, size)

    def seal(self, allocation: Allocation) -> None:
        with os_errors("sealing a memfd"):
            try:
                fcntl.fcntl(allocation.fd, fcntl.F_ADD_SEALS, FULL_SEALS)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                raise BlobBusy(
                    "cannot seal: a writable mapping of this memfd still exists "
                    "(another process mapped it before seal())"
                ) from exc
