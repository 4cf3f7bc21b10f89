"""`blobplane doctor`: the settings of this host that decide blobplane's speed and limits.

Each finding says what the setting is, what it does to blobplane, and the
command that changes it. It only reads: /sys, /proc, rlimits, statvfs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from dataclasses import asdict, dataclass

import click
from rich.console import Console
from rich.table import Table

from blobplane.backends.hugepages import (
    HUGE_PAGE_SIZE,
    SHMEM_ENABLED,
    reserved_huge_pages,
    shmem_thp_mode,
)
from blobplane.backends.kernel import cached_pages
from blobplane.backends.mapping import physical_memory
from blobplane.backends.memlimit import available_memory, memory_ceiling
from blobplane.sizes import format_size

__all__ = ["Finding", "diagnose", "doctor"]

# Below this many fds a broker serving a few hundred blobs runs into its reserve.
_FEW_FDS = 4096
_SHM = "/dev/shm"


@dataclass(frozen=True, slots=True)
class Finding:
    """One setting: its value, whether it is as blobplane wants it, why it matters, the fix."""

    setting: str
    value: str
    ok: bool
    effect: str
    fix: str = ""


def _huge_pages() -> Finding:
    mode = shmem_thp_mode()
    size = format_size(HUGE_PAGE_SIZE)
    if not mode:
        return Finding(
            "shmem huge pages",
            "unknown",
            True,
            f"{SHMEM_ENABLED} is missing: this kernel has no transparent huge pages, so "
            "blobs use 4 KiB pages",
        )
    if mode in ("advise", "always", "within_size", "force"):
        return Finding(
            "shmem huge pages",
            mode,
            True,
            f"blobs of {size} or more are made of {size} pages: a fresh blob is filled "
            "several times faster than with 4 KiB pages",
        )
    return Finding(
        "shmem huge pages",
        mode,
        False,
        f"every blob is made of 4 KiB pages: a fresh blob costs a page fault per 4 KiB "
        f"(about 1 GB/s). With 'advise', blobplane asks for {size} pages for its blobs "
        "and nothing else on the host changes",
        f"echo advise | sudo tee {SHMEM_ENABLED}",
    )


def _reserved_huge_pages() -> Finding:
    reserved = reserved_huge_pages()
    pages = f"{reserved.total} pages"
    if reserved.page_size:
        pages += f" of {format_size(reserved.page_size)}"
    value = f"{pages} ({reserved.free} free)"
    return Finding(
        "reserved huge pages",
        value,
        True,
        "memory set aside for huge pages (hugetlbfs): blobplane makes blobs of them only "
        "for SharedMemoryBlobs(..., reserved_huge_pages=True), while enough are free; "
        "transparent huge pages (above) need none set aside",
        "echo 512 | sudo tee /proc/sys/vm/nr_hugepages  (1 GiB of 2 MiB pages, if asked for)",
    )


def _open_files() -> Finding:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def shown(limit: int) -> str:
        return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)

    usable = hard if hard != resource.RLIM_INFINITY else 1 << 20
    value = f"{shown(soft)} (hard {shown(hard)})"
    effect = (
        "each blob a broker holds, and each one in flight on a channel, is an open fd; "
        "a broker raises its limit to the hard limit and keeps 1/16 of it in reserve"
    )
    if usable >= _FEW_FDS:
        return Finding("open files", value, True, effect)
    return Finding(
        "open files",
        value,
        False,
        f"{effect}: with {usable}, a broker refuses new blobs after about "
        f"{usable - max(64, usable // 16)}",
        "raise the hard limit: 'ulimit -Hn 65536' as root, LimitNOFILE= in a systemd unit, "
        "or --ulimit nofile= for a container",
    )


def _memory() -> Finding:
    ceiling = memory_ceiling()
    ram = physical_memory()
    left = available_memory()
    limited = ceiling < ram
    where = f"memory cgroup limit {format_size(ceiling)}" if limited else "no memory cgroup limit"
    return Finding(
        "memory",
        f"{where}, RAM {format_size(ram)}, {format_size(left)} available",
        True,
        "blobs are charged to the memory cgroup of the process that allocates them; "
        f"a broker's default --memory-limit is half of {format_size(ceiling)}, and "
        "creates beyond what is available are refused before they could OOM-kill",
        "" if not limited else "MemoryMax= in a systemd unit, or --memory for a container",
    )


def _dev_shm() -> Finding:
    try:
        space = os.statvfs(_SHM)
    except OSError:
        return Finding(
            _SHM,
            "missing",
            True,
            "memfd blobs (the default) do not need it; the posix_shm backend and "
            "multiprocessing.shared_memory do",
        )
    size = space.f_blocks * space.f_frsize
    free = space.f_bavail * space.f_frsize
    value = f"{format_size(size)}, {format_size(free)} free" if size else "no size limit"
    small = 0 < size < min(physical_memory() // 4, 1 << 30)
    return Finding(
        _SHM,
        value,
        not small,
        "memfd blobs (the default) do not live here; the posix_shm backend, file-backed "
        "pools in it and multiprocessing.shared_memory do, and are refused beyond its size",
        f"sudo mount -o remount,size={format_size(physical_memory() // 2)} {_SHM}" if small else "",
    )


def _kernel() -> Finding:
    release = platform.release()
    if _has_cachestat():
        return Finding(
            "kernel",
            release,
            True,
            "cachestat(2) is there: a received memfd's allocated pages are counted exactly",
        )
    return Finding(
        "kernel",
        release,
        False,
        "no cachestat(2) (Linux 6.5): a received memfd's pages are judged from st_blocks "
        "alone, which a sender that allocates past the end of its file can fool",
        "a Linux 6.5 or newer kernel",
    )


def _has_cachestat() -> bool:
    fd = os.memfd_create("blobplane-doctor", os.MFD_CLOEXEC)
    try:
        return cached_pages(fd, 0, 0) is not None
    finally:
        os.close(fd)


def diagnose() -> list[Finding]:
    """Every finding, in the order `blobplane doctor` shows them."""
    return [_huge_pages(), _reserved_huge_pages(), _open_files(), _memory(), _dev_shm(), _kernel()]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(*, as_json: bool) -> None:
    """Report the settings of this host that decide blobplane's speed and limits.

    For each: its value, what it does to blobplane, and the command that
    changes it where a change would help.
    """
    findings = diagnose()
    if as_json:
        click.echo(json.dumps([asdict(finding) for finding in findings], indent=2))
        return
    table = Table(show_lines=True, expand=True)
    table.add_column("setting", ratio=1, overflow="fold")
    table.add_column("value", ratio=1, overflow="fold")
    table.add_column("what it does to blobplane", ratio=3)
    for finding in findings:
        mark = "[green]ok[/]" if finding.ok else "[yellow]could be better[/]"
        table.add_row(f"{finding.setting}\n{mark}", finding.value, finding.effect)
    Console().print(table)
    # The commands whole, never wrapped or cut: they are meant to be copied.
    for finding in findings:
        if finding.fix:
            click.echo(f"to change {finding.setting}: {finding.fix}")
