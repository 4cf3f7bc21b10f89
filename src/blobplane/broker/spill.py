"""Spill files: the bytes of the blobs the broker moved out of memory, in a folder of its own.

Theory of operation
-------------------

`blobplane serve --spill-dir DIR` keeps one file per spilled blob in DIR.
The registry decides what goes out and comes back, and when (its `Spill`
and `Restore` actions); the server calls `SpillDir.write_file` and
`SpillDir.read_file` in a thread, so that the other clients are served
meanwhile, and everything else here on its event loop.

The folder is made 0700 if it is missing, and refused unless it is a
directory of this user that neither group nor others may write to (they
could replace or plant files in it). Every file in it is reached through an
fd of the folder, opened with O_NOFOLLOW, under a name this module makes
from the blob's id (``blob-<32 hex digits>.spill``; never from its key,
which a client chooses), opened with O_NOFOLLOW (and O_EXCL when created,
mode 0600): a symbolic link planted in the folder is never followed.

One broker per folder: the lock file ``blobplane-spill.lock`` in it holds an
exclusive OFD lock for as long as the broker runs
(`private_dir.try_exclusive_lock`, which the kernel drops when the broker
dies however it dies); a second broker is refused at start. Spill files do
not outlive their broker: a broker removes every spill file it finds at
start (left by one that was killed) and every one it wrote when it stops.

Writing: the memfd is mapped read-only (MAP_POPULATE, so no page faults on
the way) and written from the mapping in chunks of `CHUNK` bytes (measured
faster than sendfile(2) from the memfd); a second thread computes a
CRC-32 of the same mapping meanwhile (zlib's runs at about 2 GB/s, as fast as
the write into the page cache: one after the other, they would halve the
rate where a core is free). Reading: a new memfd, sized but not allocated,
is filled by sendfile(2) straight from the file (a write of whole pages
allocates them without zeroing them first, which `posix_fallocate` would,
and measured faster than a read into a mapping pre-faulted with
MADV_POPULATE_WRITE), while a second thread computes the CRC-32 of each
chunk as it lands; then the memfd is sealed and reopened read-only like
every blob the broker hands out. Blobs under `PARALLEL_BYTES` take their
checksum on the same thread. The
checksum is kept in the broker's memory, never in the file. A file that is
missing, of another size, unreadable or whose checksum differs is
`BlobLost`: the blob cannot be brought back.

No fsync: the files need not survive a crash (no broker reads another's),
so they may sit in the page cache for as long as the kernel likes; unlike
the memfds, that memory the kernel can write back and reclaim.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import re
import stat
import threading
import zlib
from collections.abc import Callable

from blobplane.backends.checks import SIZE_SEALS
from blobplane.backends.kernel import TMPFS_MAGIC, filesystem_magic
from blobplane.backends.mapping import map_length
from blobplane.backends.memfd import create_sealable_memfd
from blobplane.backends.memlimit import check_can_allocate
from blobplane.backends.private_dir import try_exclusive_lock
from blobplane.broker import memory
from blobplane.errors import BlobBusy, BlobLost, BrokenResource, OutOfSharedMemory, os_errors
from blobplane.sizes import format_size
from blobplane.types import BlobId

__all__ = ["CHUNK", "LOCK_NAME", "SpillDir", "spill_name"]

# Bytes per write(2) or sendfile(2): large enough that the syscalls cost
# nothing next to the copy.
CHUNK = 8 << 20
# From this size on the checksum runs on a thread of its own beside the copy;
# below, starting the thread costs more than it saves.
PARALLEL_BYTES = 2 * CHUNK
LOCK_NAME = "blobplane-spill.lock"
_NAME = re.compile(r"blob-[0-9a-f]{32}\.spill")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# What a full or failing memfd says; any other error of a restore is the file's.
_MEMORY_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EFBIG}


def spill_name(blob_id: BlobId) -> str:
    """The spill file of *blob_id*, inside the spill folder."""
    return f"blob-{blob_id.uuid.hex}.spill"


class SpillDir:
    """A spill folder this broker holds the lock of; see the module doc.

    `open()` it; `close()` removes every spill file and the lock. The
    checksums are kept here, by blob id, from `written()` until `remove()`.
    Only `write_file` and `read_file` may run in another thread.
    """

    def __init__(self, path: str, dir_fd: int, lock_fd: int, leftovers: int) -> None:
        self.path = path
        self.leftovers = leftovers  # spill files of an earlier broker, removed by open()
        self._dir_fd = dir_fd
        self._lock_fd = lock_fd
        self._checksums: dict[BlobId, int] = {}
        self.on_tmpfs = filesystem_magic(dir_fd) == TMPFS_MAGIC

    @classmethod
    def open(cls, path: str) -> SpillDir:
        """Make or check the folder, take its lock, remove the spill files left in it."""
        path = os.path.abspath(path)
        dir_fd = _open_folder(path)
        try:
            lock_fd = _take_lock(dir_fd, path)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            leftovers = _remove_spill_files(dir_fd)
        except BaseException:
            os.close(lock_fd)
            os.close(dir_fd)
            raise
        return cls(path, dir_fd, lock_fd, leftovers)

    def file_path(self, blob_id: BlobId) -> str:
        """Where *blob_id*'s spill file is, for people (the code goes through the folder's fd)."""
        return os.path.join(self.path, spill_name(blob_id))

    # -- in a thread ---------------------------------------------------------------------

    def write_file(self, blob_id: BlobId, fd: int, size: int) -> int:
        """Write *size* bytes of memfd *fd* to a new spill file; return their CRC-32.

        The caller keeps *fd* open until this returns. On any failure the
        file is removed and `BrokenResource` raised.
        """
        name = spill_name(blob_id)
        doing = f"writing blob {blob_id} to {self.file_path(blob_id)}"
        try:
            out = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            raise BrokenResource(f"{doing}: {exc.strerror or exc}") from exc
        try:
            try:
                checksum = _copy_out(fd, out, size)
            finally:
                os.close(out)
        except BaseException as exc:
            self._unlink(name)
            if isinstance(exc, OSError):
                raise BrokenResource(f"{doing}: {exc.strerror or exc}") from exc
            raise
        return checksum

    def read_file(self, blob_id: BlobId, size: int, checksum: int) -> int:
        """A new sealed, read-only memfd holding the *size* bytes of *blob_id*'s spill file.

        `BlobLost` when the file is missing, of another size, unreadable or
        not what was written (its CRC-32 is not *checksum*); `OutOfSharedMemory`
        when there is no memory for it (the file stays good).
        """
        where = self.file_path(blob_id)
        try:
            src = os.open(spill_name(blob_id), _READ_FLAGS, dir_fd=self._dir_fd)
        except OSError as exc:
            raise BlobLost(
                f"blob {blob_id} was spilled to disk, and its spill file {where} cannot be "
                f"opened ({exc.strerror or exc}); the blob is gone"
            ) from exc
        try:
            info = os.fstat(src)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise BlobLost(
                    f"blob {blob_id} was spilled to disk, and its spill file {where} is not the "
                    f"file of {size} bytes the broker wrote (it holds {info.st_size}); the blob "
                    "is gone"
                )
            return _restore(src, blob_id, size, checksum, where)
        finally:
            os.close(src)

    # -- in the event loop -----------------------------------------------------------------

    def written(self, blob_id: BlobId, checksum: int) -> None:
        """`write_file` succeeded: keep the checksum the restore will check."""
        self._checksums[blob_id] = checksum

    def checksum(self, blob_id: BlobId) -> int | None:
        return self._checksums.get(blob_id)

    def remove(self, blob_id: BlobId) -> None:
        """Remove *blob_id*'s spill file, if there is one, and forget its checksum."""
        if self._checksums.pop(blob_id, None) is not None:
            self._unlink(spill_name(blob_id))

    def __len__(self) -> int:
        return len(self._checksums)

    def close(self) -> None:
        """Remove every spill file, then the lock file, and let the lock go."""
        if self._dir_fd < 0:
            return
        self._checksums.clear()
        try:
            _remove_spill_files(self._dir_fd)
            self._unlink(LOCK_NAME)
        finally:
            os.close(self._lock_fd)
            os.close(self._dir_fd)
            self._dir_fd = self._lock_fd = -1

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass


# -- the folder ----------------------------------------------------------------------------


def _open_folder(path: str) -> int:
    """An fd of the folder *path*, made 0700 if missing, refused unless private enough."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BrokenResource(f"creating the spill folder {path}: {exc.strerror or exc}") from exc
    try:
        dir_fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            reason = "it is a symbolic link" if os.path.islink(path) else "it is not a directory"
        raise BrokenResource(f"the spill folder {path} cannot be used: {reason}") from exc
    try:
        # The folder opened, not the path: it cannot be swapped after the check.
        info = os.fstat(dir_fd)
        if info.st_uid != os.geteuid():
            raise BrokenResource(
                f"the spill folder {path} belongs to uid {info.st_uid}, not to this user "
                f"(uid {os.geteuid()}); its owner could read or replace the spilled blobs"
            )
        if stat.S_IMODE(info.st_mode) & 0o022:
            raise BrokenResource(
                f"the spill folder {path} has mode {stat.S_IMODE(info.st_mode):04o}: others "
                f"may write to it and replace or plant files; chmod go-w {path}, or name a "
                "folder that does not exist yet (it is made 0700)"
            )
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def _take_lock(dir_fd: int, path: str) -> int:
    """The fd of the folder's lock file, locked by this broker; `BlobBusy` if another holds it."""
    where = os.path.join(path, LOCK_NAME)
    try:
        fd = os.open(LOCK_NAME, _LOCK_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise BrokenResource(f"opening the lock file {where}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise BrokenResource(f"{where} is not a regular file of this user; remove it")
        if not try_exclusive_lock(fd):
            raise BlobBusy(
                f"another broker uses the spill folder {path} (it holds the lock on {where}); "
                "give each broker a spill folder of its own"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_spill_files(dir_fd: int) -> int:
    """Unlink every spill file in the folder (unlink never follows a link); return how many."""
    removed = 0
    for name in os.listdir(dir_fd):
        if not _NAME.fullmatch(name):
            continue  # not ours: left alone
        try:
            os.unlink(name, dir_fd=dir_fd)
            removed += 1
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            pass
    return removed


# -- copying ---------------------------------------------------------------------------------


def _copy_out(fd: int, out: int, size: int) -> int:
    """Write the memfd's *size* bytes to *out* in chunks; return their CRC-32."""
    if size == 0:
        return 0
    # A client's pool slot may be a file of huge pages: mapped whole (`map_length`).
    length = map_length(fd, size, os.fstat(fd))
    mapped = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
    try:
        with memoryview(mapped) as whole, whole[:size] as view:
            if size < PARALLEL_BYTES:
                _write_all(out, view)
                return zlib.crc32(view)
            # The checksum reads the same mapping on its own thread meanwhile.
            checker = _Background(lambda stop: _crc_of(view, stop))
            try:
                _write_all(out, view)
            except BaseException:
                checker.abandon()
                raise
            return checker.join()
    finally:
        mapped.close()


def _write_all(out: int, view: memoryview) -> None:
    size = len(view)
    done = 0
    while done < size:
        with view[done : done + CHUNK] as part:
            done += os.write(out, part)


def _crc_of(view: memoryview, stop: threading.Event) -> int:
    checksum = 0
    for start in range(0, len(view), CHUNK):
        if stop.is_set():
            break
        with view[start : start + CHUNK] as part:
            checksum = zlib.crc32(part, checksum)
    return checksum


def _restore(src: int, blob_id: BlobId, size: int, checksum: int, where: str) -> int:
    """A new sealed, read-only memfd with the *size* bytes of *src*, checked against *checksum*."""
    check_can_allocate(size, f"restoring blob {blob_id} from disk")
    fd = create_sealable_memfd(f"blobplane-broker:{blob_id}")
    try:
        with os_errors(f"sizing the memfd that blob {blob_id} is restored into"):
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
        actual = _copy_in(src, fd, size, blob_id, where)
        if actual != checksum:
            raise BlobLost(
                f"blob {blob_id} was spilled to disk, and its spill file {where} no longer "
                f"holds what was written (CRC-32 {actual:08x}, written {checksum:08x}); "
                "the blob is gone"
            )
        memory.seal(fd, blob_id, size)
        return memory.reopen_readonly(fd)
    finally:
        os.close(fd)


def _copy_in(src: int, fd: int, size: int, blob_id: BlobId, where: str) -> int:
    """sendfile *src* into memfd *fd*, the CRC-32 of each chunk taken as it lands."""
    if size == 0:
        return 0
    landed: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    checker = None
    if size >= PARALLEL_BYTES:
        checker = _Background(lambda stop: _crc_landed(fd, landed, stop))
    try:
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(fd, src, offset, min(CHUNK, size - offset))
            except OSError as exc:
                if exc.errno in _MEMORY_ERRNOS:
                    raise OutOfSharedMemory(
                        f"restoring blob {blob_id} ({format_size(size)}) from disk: no memory "
                        f"for it ({exc.strerror}); it stays spilled"
                    ) from exc
                raise BlobLost(
                    f"blob {blob_id} was spilled to disk, and reading its spill file {where} "
                    f"failed ({exc.strerror or exc}); the blob is gone"
                ) from exc
            if sent == 0:
                raise BlobLost(
                    f"blob {blob_id} was spilled to disk, and its spill file {where} ended "
                    f"after {offset} of its {size} bytes; the blob is gone"
                )
            landed.put((offset, sent))
            offset += sent
    except BaseException:
        landed.put(None)
        if checker is not None:
            checker.abandon()
        raise
    landed.put(None)
    if checker is None:
        return _crc_landed(fd, landed, threading.Event())
    return checker.join()


def _crc_landed(
    fd: int, landed: queue.SimpleQueue[tuple[int, int] | None], stop: threading.Event
) -> int:
    checksum = 0
    # sendfile may land a chunk short: map from the page its start is in.
    while (chunk := landed.get()) is not None:
        if stop.is_set():
            continue
        offset, length = chunk
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(
            fd,
            offset - base + length,
            flags=mmap.MAP_SHARED | _MAP_POPULATE,
            prot=mmap.PROT_READ,
            offset=base,
        )
        try:
            with memoryview(mapped) as view, view[offset - base :] as part:
                checksum = zlib.crc32(part, checksum)
        finally:
            mapped.close()
    return checksum


class _Background:
    """`work(stop)` on a thread of its own: `join()` returns its result or raises its error.

    `abandon()` sets *stop*, so that the work may end early, and waits for it:
    what it was given must outlive it.
    """

    def __init__(self, work: Callable[[threading.Event], int]) -> None:
        self._stop = threading.Event()
        self._result = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[threading.Event], int]) -> None:
        try:
            self._result = work(self._stop)
        except BaseException as exc:
            self._error = exc

    def join(self) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def abandon(self) -> None:
        self._stop.set()
        self._thread.join()
