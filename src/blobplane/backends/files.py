"""File-backed blobs: POSIX named shared memory and the temp-file fallback.

Both keep their files in a private folder of this user (0700, files 0600, names
of 128 random bits). Neither can be sealed by the kernel: `seal()` drops the
producer's writable mapping and makes the file read-only (0400), which stops
accidents but not a determined process of the same user, which could still
truncate the file under a reader. Prefer memfd where it exists.

Each file carries its creator's lock for as long as the creator holds it,
which is what lets a later process sweep the files of one that died
(`private_dir`).

A reader is handed a path or a name by a peer, and opens only what a blob
could be: a `Named` is one name inside this user's shm folder, a `FilePath` a
file directly inside the temp-file folder (or inside a folder the caller
allows), never through a symbolic link; the open never waits (O_NONBLOCK: a
FIFO would block in open() for a writer that never comes), and anything but a
regular file is refused before a byte is read.
"""

from __future__ import annotations

import abc
import errno
import os
from collections.abc import Iterable

from blobplane.backends.base import Allocation, Backend
from blobplane.backends.checks import check_allocated, check_regular_and_size
from blobplane.backends.kernel import HUGETLBFS_MAGIC, TMPFS_MAGIC, filesystem_magic
from blobplane.backends.memlimit import check_can_store
from blobplane.backends.private_dir import (
    create_blob_file,
    new_blob_name,
    shm_root,
    sweep_once,
    temp_root,
)
from blobplane.errors import BlobNotFound, UnsafePath, os_errors
from blobplane.types import BlobBackend, BlobId, FilePath, Named, SharedBlobDescriptor

__all__ = [
    "FileBackend",
    "PosixShmBackend",
    "TempFileBackend",
    "check_blob_name",
    "named_path",
    "open_file_for_read",
    "open_in_folder",
    "resolve_file_path",
]

_OPEN_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MEMORY_FILESYSTEMS = frozenset({TMPFS_MAGIC, HUGETLBFS_MAGIC})

PathLike = str | os.PathLike[str]


class FileBackend(Backend):
    """Blobs that are files in a private folder; subclasses say which folder and descriptor."""

    @abc.abstractmethod
    def folder(self) -> str: ...

    @abc.abstractmethod
    def describe(self, path: str, name: str) -> SharedBlobDescriptor: ...

    def create(self, size: int, blob_id: BlobId) -> Allocation:
        folder = self.folder()
        sweep_once(folder)
        check_can_store(size, folder, f"a blob file in {folder}")
        name = new_blob_name()
        path = os.path.join(folder, name)
        fd = create_blob_file(folder, name)
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


def check_blob_name(name: str, shown: str) -> None:
    """`UnsafePath` unless *name* is one path component: no '/', no NUL, not '.' or '..'."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise UnsafePath(
            f"{shown} does not name a file of its own (got the name {name!r}); a blob file is "
            "one name inside a blob folder, without '/', NUL, '.' or '..'"
        )


def resolve_file_path(path: str, allowed_dirs: Iterable[PathLike] | None = None) -> tuple[str, str]:
    """(folder, name) of a `FilePath`'s *path*, after checking it lies in an allowed folder.

    *allowed_dirs*: the folders a FilePath may name a file in; None for the
    temp-file folder (`temp_root()`) alone. The file must be directly inside
    one of them: the real path of its parent (symbolic links resolved) must be
    the real path of an allowed folder, and its name one component. `UnsafePath`
    otherwise.
    """
    if not os.path.isabs(path):
        raise UnsafePath(f"the FilePath {path!r} is relative; a blob file's path is absolute")
    parent, name = os.path.split(path)
    check_blob_name(name, f"the FilePath {path!r}")
    folders = [temp_root()] if allowed_dirs is None else [os.fspath(d) for d in allowed_dirs]
    real_parent = os.path.realpath(parent)
    for folder in folders:
        real = os.path.realpath(folder)
        if real == real_parent:
            return real, name
    shown = ", ".join(folders) or "none"
    raise UnsafePath(
        f"the FilePath {path!r} is outside the blob folders ({shown}): a peer may only name "
        "a file directly inside one of them. Pass allowed_dirs= to read blobs kept elsewhere"
    )


def open_in_folder(folder: str, name: str, shown: str) -> int:
    """Open *name* in *folder* read-only and check it is a regular file; the caller closes it.

    Relative to an fd of *folder*, so that no component of the path can be
    swapped for a link between check and open; O_NOFOLLOW refuses a symbolic
    link as the name itself, O_NONBLOCK a FIFO's wait for a writer.
    """
    with os_errors(f"opening the folder {folder}"):
        try:
            dir_fd = os.open(folder, _DIR_FLAGS)
        except FileNotFoundError:
            raise BlobNotFound(f"{shown} does not exist: there is no folder {folder}") from None
    try:
        with os_errors(f"opening {shown}"):
            try:
                fd = os.open(name, _OPEN_READ_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                raise BlobNotFound(
                    f"{shown} does not exist (cleaned up, or never created)"
                ) from None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise UnsafePath(
                    f"{shown} is a symbolic link; a blob file is never one, so it is not followed"
                ) from None
    finally:
        os.close(dir_fd)
    try:
        check_regular_and_size(fd, 0, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_for_read(
    descriptor: FilePath | Named,
    size: int,
    *,
    allow_sparse: bool = False,
    allowed_dirs: Iterable[PathLike] | None = None,
) -> int:
    """Open a peer's `FilePath` or `Named` for reading *size* bytes, after every check.

    A regular file in the right folder (see `resolve_file_path`), at least
    *size* bytes long, and, if it lives in memory (tmpfs), with its pages
    allocated unless *allow_sparse*: reading a hole of a tmpfs file
    allocates the page and charges this process for it. A disk file is not
    checked for holes: reading one fills reclaimable page cache, and disk
    filesystems count blocks their own way (compression stores zeros as
    holes). The caller owns the returned fd.
    """
    match descriptor:
        case Named(name=name):
            check_blob_name(name, f"the Named blob {name!r}")
            folder, shown, in_memory = shm_root(), f"the Named blob {name!r}", True
        case FilePath(path=path):
            folder, name = resolve_file_path(path, allowed_dirs)
            shown, in_memory = path, False
    fd = open_in_folder(folder, name, shown)
    try:
        info = check_regular_and_size(fd, size, shown)
        if not allow_sparse:
            magic = filesystem_magic(fd)
            if magic in _MEMORY_FILESYSTEMS or (magic is None and in_memory):
                check_allocated(fd, size, shown, info=info)
    except BaseException:
        os.close(fd)
        raise
    return fd


def named_path(name: str) -> str:
    """The path of a `Named` blob: *name* inside this user's shm folder (one component only)."""
    check_blob_name(name, f"the Named blob {name!r}")
    return os.path.join(shm_root(), name)
