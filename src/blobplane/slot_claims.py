"""Claims on pool slots across processes: open-file-description byte-range locks.

A reader holds a shared lock on a slot's byte of the pool's control block
while it reads the slot; a producer that wants to take back a slot nobody
released (the drop-oldest policy of streams) must first win an exclusive lock
on it, which the kernel grants only when no reader holds one. The kernel drops
a dead process's locks with its fds, so a killed reader never pins a slot.

OFD locks belong to an open file description, and an fd passed with
SCM_RIGHTS shares its sender's description: a reader must lock through a
description of its own, which `backends.memfd.reopen_readonly` makes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from blobplane.errors import os_errors

# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


def _flock(lock_type: int, slot: int) -> bytes:
    return _FLOCK.pack(lock_type, os.SEEK_SET, slot, 1, 0)


def try_claim_shared(fd: int, slot: int) -> bool:
    """Take a reader's lock on *slot* unless the producer holds it; never waits.

    The producer holds it only while it takes the slot back, so a refusal
    means the frame the reader wanted is gone: waiting would gain nothing,
    and would hang the reader for as long as a stopped producer stays stopped.
    """
    return _try_lock(fd, fcntl.F_RDLCK, slot)


def try_claim_exclusive(fd: int, slot: int) -> bool:
    """Take the producer's lock on *slot* if no reader holds it; never waits."""
    return _try_lock(fd, fcntl.F_WRLCK, slot)


def _try_lock(fd: int, lock_type: int, slot: int) -> bool:
    with os_errors(f"claiming pool slot {slot}"):
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(lock_type, slot))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
    return True


def unclaim(fd: int, slot: int) -> None:
    with os_errors(f"releasing pool slot {slot}"):
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, slot))
