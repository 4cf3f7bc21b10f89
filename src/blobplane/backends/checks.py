"""What a reader verifies before it maps an fd it did not create.

The first attack to defeat: a peer truncates the file after we mapped it and
we die of SIGBUS on the next access. Only an fd whose size is pinned by
F_SEAL_SHRINK and F_SEAL_GROW (a sealed memfd) is safe, so nothing else is
mapped from a peer. A memfd made without MFD_ALLOW_SEALING and a file in
/dev/shm report F_SEAL_SEAL alone, and a file on disk refuses F_GET_SEALS.

The second: a peer hands over a memfd it only sized (ftruncate), so that its
pages do not exist yet. Whoever touches a missing page of a tmpfs file
allocates it, and the page is charged to the memory cgroup of the toucher:
the reader, which a memory-limited reader does not survive. So a received
memfd must have every page allocated (`check_allocated`), unless the caller
opts in to sparse blobs (``allow_sparse=True``). The check is O(1): the
file's allocated blocks (st_blocks) must cover its size, less any pages
allocated beyond its end (fallocate with FALLOC_FL_KEEP_SIZE puts them
there, and st_blocks counts them too), which cachestat(2) counts.

It holds from the check on only if nobody can punch holes afterwards:
F_SEAL_WRITE or F_SEAL_FUTURE_WRITE forbid that (fallocate(PUNCH_HOLE) and
MADV_REMOVE fail), and every blob, pool slot and broker blob blobplane makes
carries one of them. A memfd sealed against resizing only stays writable by
its owner, who could also free pages after the check.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat

from blobplane.backends.kernel import cached_pages
from blobplane.errors import DescriptorTooShort, NotSealed, SparseBlob, WrongKind, os_errors
from blobplane.sizes import format_size

F_SEAL_FUTURE_WRITE = 0x0010
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
PAGE_SIZE = mmap.PAGESIZE
BLOCK_SIZE = 512  # the unit of st_blocks, whatever the filesystem's own block size

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


def allocated_bytes(fd: int, info: os.stat_result) -> int:
    """Bytes of the file allocated between its start and its end (page-rounded), at most.

    st_blocks counts every allocated page, also those past the end (fallocate
    with FALLOC_FL_KEEP_SIZE) and the whole of a huge page that straddles the
    end, so the pages past the end are taken off as cachestat counts them.
    Where cachestat is missing (before Linux 6.5, hugetlbfs) st_blocks alone
    is the figure: only a peer that allocated past the end can fool it.
    """
    end = -(-info.st_size // PAGE_SIZE) * PAGE_SIZE
    held = info.st_blocks * BLOCK_SIZE
    if held >= end and end:
        beyond = cached_pages(fd, end, 0)
        if beyond:
            held -= beyond * PAGE_SIZE
    return max(0, min(held, end))


def fully_allocated(fd: int, info: os.stat_result) -> bool:
    """Whether every page of the file exists already: reading it allocates nothing (O(1))."""
    end = -(-info.st_size // PAGE_SIZE) * PAGE_SIZE
    held = info.st_blocks * BLOCK_SIZE
    # The usual answer in one comparison: a sparse file holds fewer blocks than its size.
    if held < end:
        return False
    if not end:
        return True
    # `allocated_bytes`, inline: a channel runs this for every handoff.
    beyond = cached_pages(fd, end, 0)
    return not beyond or held - beyond * PAGE_SIZE >= end


def check_allocated(fd: int, size: int, what: str, *, info: os.stat_result | None = None) -> None:
    """`SparseBlob` unless reading the first *size* bytes of *fd* allocates no memory.

    Every page of the file must be allocated (or, for a file longer than
    *size*, every page of those first bytes, counted exactly by cachestat).
    Zero bytes need nothing. *info* is the fd's fstat, when the caller has it.
    """
    if size <= 0:
        return
    if info is None:
        with os_errors(f"inspecting {what}"):
            info = os.fstat(fd)
    if fully_allocated(fd, info):
        return
    if size < info.st_size:
        present = cached_pages(fd, 0, size)
        if present is not None and present * PAGE_SIZE >= size:
            return
    held = allocated_bytes(fd, info)
    raise SparseBlob(
        f"{what} is sparse: {format_size(held)} of its {format_size(info.st_size)} are "
        "allocated, and reading the rest would allocate it here, charged to this process's "
        "memory limit. The sender must allocate it whole (posix_fallocate, or write every "
        "page) before sending; pass allow_sparse=True to accept sparse blobs"
    )


def check_received_fd(fd: int, size: int, *, allow_sparse: bool = False) -> os.stat_result:
    """Refuse an fd from another process unless it is a size-sealed memfd of >= *size* bytes.

    And unless its pages are all allocated, so that reading it costs this
    process no memory; *allow_sparse* drops that last check. Returns its
    fstat, for `mapping.map_readonly`.
    """
    # A channel runs this for every handoff, on the way to its answer: the
    # usual verdict, "fine", first, from the same checks in the same order
    # (seals before size) in as few steps as they take. Anything else, or any
    # OSError, goes through the steps below, which say what is wrong.
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SIZE_SEALS == SIZE_SEALS:
            info = os.fstat(fd)
            if (
                stat.S_ISREG(info.st_mode)
                and info.st_size >= size
                and (allow_sparse or size <= 0 or fully_allocated(fd, info))
            ):
                return info
    except OSError:
        pass
    what = f"fd {fd}"
    check_regular_and_size(fd, 0, what)
    with os_errors(f"reading the seals of {what}"):
        seals = get_seals(fd)
    # The size only after the seals: a sender that keeps its own fd could otherwise shrink
    # the file between our size check and its sealing, and the first read past the new end
    # would be a SIGBUS. Once F_SEAL_SHRINK is there, the size read now is final.
    info = check_regular_and_size(fd, size, what)
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
    if not allow_sparse:
        check_allocated(fd, size, what, info=info)
    return info
