"""Linux calls the `os` module lacks, through ctypes: cachestat(2), statfs's f_type, and
fallocate(2)'s hole punching.

The first two answer questions a reader asks of a file it was handed, and
both may be missing: cachestat needs Linux 6.5 (and a seccomp filter that
lets it through), ctypes needs a C library to load. Each function returns
None (or False) when it cannot answer, and the caller falls back to what it
can do without it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading

__all__ = ["HUGETLBFS_MAGIC", "TMPFS_MAGIC", "cached_pages", "filesystem_magic", "punch_hole"]

TMPFS_MAGIC = 0x01021994  # tmpfs, /dev/shm and every memfd
HUGETLBFS_MAGIC = 0x958458F6  # hugetlbfs and memfds made with MFD_HUGETLB

# cachestat is number 451 wherever Linux uses the unified syscall table (all but alpha and
# mips, which number it otherwise and are not guessed at here).
_CACHESTAT = 451
_UNIFIED_TABLE = frozenset(
    (
        "x86_64",
        "amd64",
        "i386",
        "i686",
        "aarch64",
        "arm64",
        "armv7l",
        "riscv64",
        "ppc64le",
        "ppc64",
        "s390x",
        "loongarch64",
    )
)


class _Range(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _CacheStat(ctypes.Structure):
    _fields_ = (
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    )


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.statfs.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
        libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()
_cachestat_works = _libc is not None and platform.machine() in _UNIFIED_TABLE
# struct statfs is 120 bytes on 64-bit Linux and smaller elsewhere; f_type comes first,
# a long (__fsword_t) everywhere but on s390x, where it is an unsigned int.
_STATFS_SIZE = 256
_F_TYPE = ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long


class _Buffers(threading.local):
    """cachestat's two structs, made once per thread: a handoff's check runs it every time."""

    def __init__(self) -> None:
        span, stat = _Range(), _CacheStat()
        self.parts = (span, stat, ctypes.byref(span), ctypes.byref(stat))


_buffers = _Buffers()


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of *fd*'s file present in memory in [offset, offset + length), 0 length: to the end.

    Counts every page the file holds there, written or only allocated
    (fallocate), and for tmpfs the pages swapped out too; pages beyond the
    end of the file included. None when the kernel cannot say (before 6.5,
    hugetlbfs, a seccomp filter).
    """
    global _cachestat_works
    if not _cachestat_works or _libc is None:
        return None
    span, stat, span_ref, stat_ref = _buffers.parts
    span.off = offset
    span.len = length
    if _libc.syscall(_CACHESTAT, fd, span_ref, stat_ref, 0) == 0:
        return int(stat.nr_cache + stat.nr_evicted)
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        _cachestat_works = False  # this kernel (or its seccomp filter) never will
    return None


def filesystem_magic(target: int | str) -> int | None:
    """The f_type of the filesystem holding *target* (an fd or a path), or None if unknown."""
    if _libc is None:
        return None
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if isinstance(target, int):
        result = _libc.fstatfs(target, buffer)
    else:
        result = _libc.statfs(os.fsencode(target), buffer)
    if result != 0:
        return None
    return _F_TYPE.from_buffer(buffer).value & 0xFFFFFFFF


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the pages of [offset, offset + length) of *fd*'s file now, its size kept.

    For every holder of the file at once: what a thread still holding the fd
    wrote is given back without waiting for it. False when it could not be
    done (no C library, a file system without holes, a write seal).
    """
    if _libc is None or length <= 0:
        return False
    flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return bool(_libc.fallocate(fd, flags, offset, length) == 0)
