"""Private folders for file-backed blobs: created 0700, verified, swept of orphans.

A blob file is named ``<pid>-<128 random bits>``: the name cannot be guessed,
and the pid tells a person looking at the folder who made it. Whether a file
is abandoned is never judged from that pid: a process in another pid
namespace (a container sharing /dev/shm) sees every pid outside as dead.

The proof is a lock. The creator takes an exclusive OFD lock (F_OFD_SETLK,
F_WRLCK, on the whole file) on its own read-write descriptor before the file
has a name (O_TMPFILE, then linkat), and keeps it for as long as it holds
the blob: the lock belongs to that open file description, so it lasts while
any fd of it (one inherited across fork, or the duplicate a mapping keeps)
or mapping made from it exists, through `seal()` (only the mode changes),
and the kernel drops it when the last one goes, at cleanup or when the
process dies however it dies. Readers open the file afresh and lock
nothing: a blob whose creator is gone is abandoned even while readers still
map it, and unlinking it takes nothing from them (the pages live until their
last mapping goes).

A sweeper opens each file read-only (O_NONBLOCK | O_NOFOLLOW) and tries a
shared lock with F_OFD_SETLK, which never waits: it is granted only if no
creator holds the file, and the file is unlinked while the sweeper holds it.
Shared, not exclusive, because a sweeper cannot ask a write lock of a file it
may only read (sealed blobs are mode 0400), and any lock conflicts with the
creator's exclusive one. Files that are not the sweeper's to judge (other
names, not regular files) are left alone.

On a filesystem without O_TMPFILE the file gets its name first and the lock
a few microseconds later; a sweeper in another process that looks in that
window removes a blob being created. Linux's tmpfs, ext4, xfs and btrfs
all have O_TMPFILE. Where OFD locks are missing (not Linux), nothing is swept.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import tempfile
import threading

from blobplane.errors import BrokenResource, os_errors

_swept: set[str] = set()
_sweep_lock = threading.Lock()


def ensure_private_dir(path: str) -> str:
    """Create *path* as a 0700 folder of this user, or verify the one that exists."""
    with os_errors(f"creating the private folder {path}"):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise BrokenResource(
            f"{path} exists but is not a private folder of uid {os.getuid()} "
            f"(a directory, owned by us, mode 0700); remove it or set BLOBPLANE_DIR"
        )
    return path


def temp_root() -> str:
    """Folder for temp-file blobs: $BLOBPLANE_DIR, else $XDG_RUNTIME_DIR, else the temp dir."""
    explicit = os.environ.get("BLOBPLANE_DIR")
    if explicit:
        return ensure_private_dir(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
    return ensure_private_dir(os.path.join(base, f"blobplane-{os.getuid()}"))


SHM_ROOT = "/dev/shm"


def shm_root() -> str:
    """This user's private folder inside /dev/shm ($BLOBPLANE_SHM_DIR), home of named segments.

    A `Named` descriptor is a name inside this folder, so producer and
    consumer must agree on it: same user, same environment.
    """
    explicit = os.environ.get("BLOBPLANE_SHM_DIR")
    if explicit:
        return ensure_private_dir(explicit)
    return ensure_private_dir(os.path.join(SHM_ROOT, f"blobplane-{os.getuid()}"))


def new_blob_name() -> str:
    return f"{os.getpid()}-{secrets.token_hex(16)}"


_BLOB_NAME = re.compile(r"[0-9]+-[0-9a-f]{32}")
_F_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t),
# padded to 32 bytes. l_pid must be 0 for OFD locks. 32-bit hosts go without the locks.
_FLOCK = struct.Struct("hhqqi4x")
_LOCKS_WORK = _F_OFD_SETLK is not None and struct.calcsize("P") == 8
_SWEEP_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_TMPFILE: int | None = getattr(os, "O_TMPFILE", None)


def _lock(fd: int, kind: int) -> bool:
    """Take an OFD lock of *kind* on the whole file without waiting; False if someone holds one."""
    assert _F_OFD_SETLK is not None
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def try_exclusive_lock(fd: int) -> bool:
    """Lock the whole file behind *fd* (open for writing) for this open file description.

    Without waiting: False when another open file description holds a lock
    on it. The lock lasts while any fd of this description does, and goes when
    the process dies however it dies. An OFD lock (see the module doc); where
    those are missing, flock(2), which behaves the same here.
    """
    if _LOCKS_WORK:
        with os_errors("locking a file"):
            return _lock(fd, fcntl.F_WRLCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        with os_errors("locking a file"):
            raise exc from None
    return True


def hold_creator_lock(fd: int) -> None:
    """Mark the file behind *fd* (open read-write) as held by its creator; see the module doc."""
    if _LOCKS_WORK:
        with os_errors("locking a new blob file"):
            if not _lock(fd, fcntl.F_WRLCK):
                raise BrokenResource("a new blob file is already locked by another process")


def create_blob_file(folder: str, name: str) -> int:
    """A new 0600 file *name* in *folder*, locked by its creator from the moment it has a name.

    Returns its read-write fd, which the caller owns: the lock lasts as long
    as it (or a duplicate, or a mapping made from it) does.
    """
    path = os.path.join(folder, name)
    if _LOCKS_WORK and _O_TMPFILE is not None:
        fd = _create_locked_tmpfile(folder, path)
        if fd is not None:
            return fd
    with os_errors(f"creating {path}"):
        fd = os.open(path, _CREATE_FLAGS, 0o600)
    try:
        hold_creator_lock(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _create_locked_tmpfile(folder: str, path: str) -> int | None:
    """`create_blob_file` through O_TMPFILE; None where the filesystem or /proc lacks it."""
    assert _O_TMPFILE is not None
    with os_errors(f"creating {path}"):
        try:
            fd = os.open(folder, os.O_RDWR | _O_TMPFILE | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # EOPNOTSUPP: a filesystem without it; EISDIR, EINVAL: a kernel without it.
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return None
            raise
        try:
            hold_creator_lock(fd)
            # linkat(AT_SYMLINK_FOLLOW) through /proc: the file appears already locked. A
            # dst_dir_fd, because os.link calls link(2), which follows no link, without one.
            folder_fd = os.open(folder, _DIR_FLAGS)
            try:
                os.link(
                    f"/proc/self/fd/{fd}",
                    os.path.basename(path),
                    dst_dir_fd=folder_fd,
                    follow_symlinks=True,
                )
            finally:
                os.close(folder_fd)
        except FileNotFoundError:
            os.close(fd)
            if os.path.isdir("/proc/self/fd"):
                raise
            return None  # no /proc mounted: name it first, then lock
        except BaseException:
            os.close(fd)
            raise
    return fd


def _remove_if_abandoned(dir_fd: int, name: str) -> bool:
    """Unlink *name* if it is a regular file no creator holds (see the module doc)."""
    try:
        fd = os.open(name, _SWEEP_OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:
        return False  # gone meanwhile, a symlink, not ours to read: not ours to judge
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not _lock(fd, fcntl.F_RDLCK):
            return False
        # Only the file we proved abandoned: the name must still lead to it.
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_orphans(folder: str) -> list[str]:
    """Unlink the blob files in *folder* that no live creator holds; return their names.

    A file counts as abandoned only when a non-blocking OFD lock on it is
    granted, which proves its creator closed it or died (see the module doc);
    a pid that this process cannot see proves nothing.
    """
    removed: list[str] = []
    if not _LOCKS_WORK:
        return removed
    try:
        dir_fd = os.open(folder, _DIR_FLAGS)
    except OSError:
        return removed
    try:
        for name in os.listdir(dir_fd):
            if _BLOB_NAME.fullmatch(name) and _remove_if_abandoned(dir_fd, name):
                removed.append(name)
    finally:
        os.close(dir_fd)
    return removed


def sweep_once(folder: str) -> None:
    """Sweep *folder* the first time this process uses it."""
    with _sweep_lock:
        if folder in _swept:
            return
        _swept.add(folder)
    sweep_orphans(folder)
