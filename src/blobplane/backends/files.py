"""File-backed blobs: POSIX named shared memory and the temp-file fallback.

Both keep their files in a private folder of this user (0700, files 0600, names
of 128 random bits). Neither can be sealed by the kernel: `seal()` drops the
producer's writable mapping and makes the file read-only (0400), which stops
accidents but not a determined process of the same user, which could still
truncate the file under a reader. Prefer memfd where it exists.
"""

from __future__ import annotations

import abc
import os

from blobplane.backends.base import Allocation, Backend
from blobplane.backends.private_dir import new_blob_name, shm_root, sweep_once, temp_root
from blobplane.errors import BlobNotFound, os_errors
from blobplane.types import BlobBackend, BlobId, FilePath, Named, SharedBlobDescriptor

_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileBackend(Backend):
    """Blobs that are files in a private folder; subclasses say which folder and descriptor."""

    @abc.abstractmethod
    def folder(self) -> str: ...

    @abc.abstractmethod
    def describe(self, path: str, name: str) -> SharedBlobDescriptor: ...

    def create(self, size: int, blob_id: BlobId) -> Allocation:
        folder = self.folder()
        sweep_once(folder)
        name = new_blob_name()
        path = os.path.join(folder, name)
        with os_errors(f"creating {path}"):
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        try:
            if size:
                # Reserve the space now: a sparse file on a full filesystem
                # would kill the writer with SIGBUS on first touch instead.
                with os_errors(f"reserving {size} bytes for {path}"):
                    os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return Allocation(self.describe(path, name), fd, size, path)

    def seal(self, allocation: Allocation) -> None:
        with os_errors("making a blob file read-only"):
            os.fchmod(allocation.fd, 0o400)


class PosixShmBackend(FileBackend):
    kind = BlobBackend.POSIX_SHM

    def folder(self) -> str:
        return shm_root()

    def describe(self, path: str, name: str) -> SharedBlobDescriptor:
        return Named(name)


class TempFileBackend(FileBackend):
    kind = BlobBackend.TEMP_FILE
    # A disk file pre-faulted writable would be written back for nothing.
    prefault = False

    def folder(self) -> str:
        return temp_root()

    def describe(self, path: str, name: str) -> SharedBlobDescriptor:
        return FilePath(path)


def open_file_for_read(path: str) -> int:
    """Open a blob file read-only without following symlinks; the caller closes the fd."""
    with os_errors(f"opening {path}"):
        try:
            return os.open(path, _OPEN_READ_FLAGS)
        except FileNotFoundError:
            raise BlobNotFound(f"{path} does not exist (cleaned up, or never created)") from None


def named_path(name: str) -> str:
    return os.path.join(shm_root(), name)
