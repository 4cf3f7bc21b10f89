"""Transparent huge pages for shared memory, where the kernel allows them.

A fresh memfd costs a page fault per 4 KiB page: filled and read, a 64 MiB
blob moves at about 1 GB/s, against 10+ GB/s for memory already faulted in.
With 2 MiB pages the same blob takes 32 faults instead of 16,384. Whether
shared memory (memfd, /dev/shm) gets them is the kernel's setting
/sys/kernel/mm/transparent_hugepage/shmem_enabled:

- ``never`` (the usual default): 4 KiB pages whatever blobplane asks;
- ``advise``: huge pages for mappings marked ``MADV_HUGEPAGE``;
- ``always``, ``within_size``: huge pages for every shmem file (within its
  size, for the latter), allocated by fallocate too;
- ``deny``, ``force``: testing settings, off and on for everything.

So every mapping blobplane makes of a blob of at least one huge page is
marked `MADV_HUGEPAGE` (`advise_huge`: a no-op under ``never``), and under
``advise`` a memfd's pages are allocated through such a mapping rather than
by fallocate, which has no mapping to take the advice from
(`allocate_pages`). ``blobplane doctor`` reports the setting and the command
to change it.

Reserved huge pages (hugetlbfs, ``vm.nr_hugepages``) are another matter:
memory an administrator set aside, which no other use of memory takes. A
memfd made with ``MFD_HUGETLB`` draws on them, in whole pages of the
default huge page size: blobplane makes one only for a caller that asks
(`SharedMemoryBlobs(reserved_huge_pages=True)`) and only while enough are
free (`ReservedHugePages.free`); see `memfd.allocate_reserved_memfd`.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass

from blobplane.errors import os_errors

__all__ = [
    "HUGE_PAGE_SIZE",
    "MADV_POPULATE_WRITE",
    "ReservedHugePages",
    "advise_huge",
    "allocate_pages",
    "read_shmem_thp_mode",
    "reserved_huge_pages",
    "shmem_thp_mode",
]

SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
_PMD_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
# MADV_POPULATE_WRITE (Linux 5.14): fault every page in one syscall.
MADV_POPULATE_WRITE = 23
# How long a reading of shmem_enabled is trusted: a setting changed by an
# administrator applies to the blobs made a second later, and a process making
# many large blobs does not read sysfs for each.
MODE_TTL_S = 1.0


def _read_pmd_size() -> int:
    try:
        with open(_PMD_SIZE, "rb") as file:
            return int(file.read().strip() or 0) or 2 << 20
    except (OSError, ValueError):
        return 2 << 20


HUGE_PAGE_SIZE = _read_pmd_size()
_mode: tuple[float, str] = (-MODE_TTL_S, "")


def read_shmem_thp_mode() -> str:
    """The bracketed word of shmem_enabled (``never``, ``advise``, ...), read now; "" if none."""
    try:
        with open(SHMEM_ENABLED, "rb") as file:
            text = file.read().decode("ascii", "replace")
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def shmem_thp_mode() -> str:
    """`read_shmem_thp_mode`, read again at most once every `MODE_TTL_S`."""
    global _mode
    now = time.monotonic()
    if now - _mode[0] >= MODE_TTL_S:
        _mode = (now, read_shmem_thp_mode())
    return _mode[1]


def advise_huge(mapped: mmap.mmap, size: int) -> None:
    """Ask for huge pages on *mapped* if it spans one; silently nothing where there are none."""
    if size < HUGE_PAGE_SIZE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    try:
        mapped.madvise(mmap.MADV_HUGEPAGE)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a kernel built without THP
            raise


def allocate_pages(fd: int, size: int) -> None:
    """Allocate the first *size* bytes of the memfd *fd*, in huge pages where the kernel allows.

    posix_fallocate, except under ``advise`` for a size of at least one huge
    page: there the pages are faulted in through a mapping marked
    `MADV_HUGEPAGE`, which fallocate has none of. Either way a full /dev/shm
    or memory cgroup fails here (`OutOfSharedMemory`), not with SIGBUS later.
    """
    if size >= HUGE_PAGE_SIZE and shmem_thp_mode() == "advise":
        with os_errors(f"allocating {size} bytes for a memfd"):
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
            try:
                advise_huge(mapped, size)
                mapped.madvise(MADV_POPULATE_WRITE)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # A kernel without MADV_POPULATE_WRITE: fallocate below.
            finally:
                mapped.close()
    with os_errors(f"allocating {size} bytes for a memfd"):
        os.posix_fallocate(fd, 0, size)


@dataclass(frozen=True, slots=True)
class ReservedHugePages:
    """The host's reserved huge pages of the default size, as /proc/meminfo says now."""

    total: int
    free: int  # neither in use nor promised to a mapping already
    page_size: int  # bytes; 0 where the kernel has none


def reserved_huge_pages() -> ReservedHugePages:
    """/proc/meminfo's HugePages_Total, HugePages_Free less HugePages_Rsvd, Hugepagesize."""
    fields: dict[bytes, int] = {}
    try:
        with open("/proc/meminfo", "rb") as file:
            for line in file:
                name, _, rest = line.partition(b":")
                if name.startswith(b"HugePages_") or name == b"Hugepagesize":
                    fields[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    free = fields.get(b"HugePages_Free", 0) - fields.get(b"HugePages_Rsvd", 0)
    return ReservedHugePages(
        total=fields.get(b"HugePages_Total", 0),
        free=max(0, free),
        page_size=fields.get(b"Hugepagesize", 0) * 1024,
    )
