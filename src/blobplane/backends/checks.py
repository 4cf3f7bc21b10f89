"""What a reader verifies before it maps an fd it did not create.

The attack to defeat: a peer truncates the file after we mapped it and we die
of SIGBUS on the next access. Only an fd whose size is pinned by
F_SEAL_SHRINK and F_SEAL_GROW (a sealed memfd) is safe, so nothing else is
mapped from a peer. A memfd made without MFD_ALLOW_SEALING and a file in
/dev/shm report F_SEAL_SEAL alone, and a file on disk refuses F_GET_SEALS.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from blobplane.errors import DescriptorTooShort, NotSealed, WrongKind, os_errors

F_SEAL_FUTURE_WRITE = 0x0010
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def describe_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "an unknown kind of file"


def check_regular_and_size(fd: int, size: int, what: str) -> os.stat_result:
    """Refuse anything but a regular file of at least *size* bytes."""
    with os_errors(f"inspecting {what}"):
        info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise WrongKind(
            f"{what} is {describe_kind(info.st_mode)}; expected a memfd or regular file"
        )
    if info.st_size < size:
        raise DescriptorTooShort(
            f"{what} holds {info.st_size} bytes but its token says {size}; refusing to map it"
        )
    return info


def get_seals(fd: int) -> int | None:
    """The fd's seals, or None when its filesystem has no sealing at all."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def check_received_fd(fd: int, size: int) -> None:
    """Refuse an fd from another process unless it is a size-sealed memfd of >= *size* bytes."""
    what = f"fd {fd}"
    check_regular_and_size(fd, 0, what)
    with os_errors(f"reading the seals of {what}"):
        seals = get_seals(fd)
    # The size only after the seals: a sender that keeps its own fd could otherwise shrink
    # the file between our size check and its sealing, and the first read past the new end
    # would be a SIGBUS. Once F_SEAL_SHRINK is there, the size read now is final.
    check_regular_and_size(fd, size, what)
    if seals is None:
        raise NotSealed(
            f"{what} is a file on a filesystem without seals; its owner could truncate it "
            "while we read. Send a memfd sealed with F_SEAL_SHRINK | F_SEAL_GROW"
        )
    if seals & SIZE_SEALS != SIZE_SEALS:
        raise NotSealed(
            f"{what} lacks F_SEAL_SHRINK and F_SEAL_GROW (seals=0x{seals:x}); its owner could "
            "truncate it while we read. Seal it (ProducerBlob.seal()) before sending"
        )
