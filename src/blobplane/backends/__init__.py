"""Backends: where blob memory lives, and how a reader opens a descriptor it was given."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from blobplane.backends.base import Allocation, Backend
from blobplane.backends.checks import check_received_fd
from blobplane.backends.files import PosixShmBackend, TempFileBackend, open_file_for_read
from blobplane.backends.memfd import MemfdBackend, memfd_available
from blobplane.backends.windows import UNSUPPORTED as WINDOWS_UNSUPPORTED
from blobplane.backends.windows import WindowsBackend
from blobplane.errors import MalformedMetadata
from blobplane.types import (
    BlobBackend,
    FilePath,
    Named,
    SharedBlobDescriptor,
    UnixFd,
    WindowsHandle,
)

__all__ = ["Allocation", "Backend", "ReadableFd", "get_backend", "open_for_read", "resolve"]

_BACKENDS: dict[BlobBackend, type[Backend]] = {
    BlobBackend.MEMFD: MemfdBackend,
    BlobBackend.POSIX_SHM: PosixShmBackend,
    BlobBackend.TEMP_FILE: TempFileBackend,
    BlobBackend.WINDOWS: WindowsBackend,
}


def resolve(kind: BlobBackend) -> BlobBackend:
    """Turn PLATFORM_DEFAULT into the concrete backend for this host."""
    if kind is not BlobBackend.PLATFORM_DEFAULT:
        return kind
    if sys.platform.startswith("linux") and memfd_available():
        return BlobBackend.MEMFD
    return BlobBackend.TEMP_FILE


def get_backend(kind: BlobBackend, *, reserved_huge_pages: bool = False) -> Backend:
    concrete = resolve(BlobBackend(kind))
    if concrete is BlobBackend.MEMFD and not memfd_available():
        raise NotImplementedError("memfd blobs need Linux; use BlobBackend.TEMP_FILE here")
    if reserved_huge_pages:
        if concrete is not BlobBackend.MEMFD:
            raise NotImplementedError(
                f"reserved huge pages are for memfd blobs; {concrete.value} blobs cannot use "
                "them (use BlobBackend.MEMFD)"
            )
        return MemfdBackend(reserved_huge_pages=True)
    return _BACKENDS[concrete]()


class ReadableFd:
    """An fd to map read-only: borrowed (the caller's, never closed) or owned (closed here)."""

    __slots__ = ("fd", "owned")

    def __init__(self, fd: int, *, owned: bool) -> None:
        self.fd = fd
        self.owned = owned

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc_info: object) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def open_for_read(
    descriptor: SharedBlobDescriptor,
    size: int,
    *,
    allow_sparse: bool = False,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None = None,
) -> ReadableFd:
    """Open and check a descriptor from elsewhere, ready to map *size* bytes read-only.

    An fd must be a size-sealed memfd with its pages allocated (see
    `checks`); a name or path must lead to a regular file of at least *size*
    bytes inside a blob folder (see `files.open_file_for_read`).
    *allow_sparse* accepts blobs whose pages are not all allocated (reading
    them allocates pages in this process); *allowed_dirs* lists the folders a
    `FilePath` may name a file in (None: the temp-file folder).
    """
    match descriptor:
        case UnixFd(fd=fd):
            check_received_fd(fd, size, allow_sparse=allow_sparse)
            return ReadableFd(fd, owned=False)
        case Named() | FilePath():
            fd = open_file_for_read(
                descriptor, size, allow_sparse=allow_sparse, allowed_dirs=allowed_dirs
            )
            return ReadableFd(fd, owned=True)
        case WindowsHandle():
            raise NotImplementedError(WINDOWS_UNSUPPORTED)
    raise MalformedMetadata(f"not a SharedBlobDescriptor: {descriptor!r}")
