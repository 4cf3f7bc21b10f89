"""How much memory a blob may still take, judged before the first page is taken.

Shared memory is charged to the memory cgroup of the process that allocates
its pages, and a cgroup that goes over its limit is not told so: the kernel's
OOM killer ends one of its processes (posix_fallocate on a memfd does not
fail with ENOMEM first). So every `create()` compares the size with what is
left before it allocates, and asks for more are `OutOfSharedMemory`:

- for each memory cgroup from this process's own up to the highest one it can
  see that has a limit: the limit less the usage (cgroup v2: ``memory.max -
  memory.current``; v1: ``memory.limit_in_bytes - memory.usage_in_bytes``,
  for hosts that still mount the memory controller there);
- the host's ``MemAvailable`` (/proc/meminfo), the kernel's own estimate of
  what can be allocated without swapping, reclaimable caches included.

The least of them is what is available. Only when that falls short of the
size is a second, slower look taken (``memory.stat`` of each limited
cgroup): its file cache (active and inactive file pages), which the kernel
reclaims before it OOM-kills, is counted in, so a process that has read large
files is not refused a blob its cgroup can make room for. Swap is not
counted: it errs towards refusing, and hosts that set memory limits seldom
have swap.

The figure is an estimate of one moment: other allocations, of this process
or of others in the cgroup, may take the room between the check and the
blob's allocation. It stops the clear case, a blob larger than what is left.

Cost: the first look reads /proc/meminfo and one or two small files per
cgroup level, 8-15 us on a host with three levels. Blobs below
`CHECK_THRESHOLD` (1 MiB) are not checked: at that size the process's own
heap allocations are of the same order, so a cgroup that close to its limit
is OOM-killed whatever the blob does, and small blobs, whose creation takes
a few microseconds, do not pay for a check that cannot save them.

Cached: where this process's cgroups are (read once from /proc/self/cgroup
and /proc/self/mountinfo). Limits, usage and MemAvailable are read afresh on
every call.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from blobplane.backends.kernel import HUGETLBFS_MAGIC, TMPFS_MAGIC, filesystem_magic
from blobplane.backends.mapping import physical_memory
from blobplane.errors import OutOfSharedMemory
from blobplane.sizes import format_size

__all__ = [
    "CHECK_THRESHOLD",
    "available_memory",
    "check_can_allocate",
    "check_can_store",
    "memory_ceiling",
]

CHECK_THRESHOLD = 1 << 20
# A limit at or above this is "no limit" (cgroup v1 writes 2**63 less a page for it).
_UNLIMITED = 1 << 62
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_MEMORY_FILESYSTEMS = frozenset({TMPFS_MAGIC, HUGETLBFS_MAGIC})


@dataclass(frozen=True, slots=True)
class _Cgroup:
    """One level of this process's memory cgroups: its folder and the files read there."""

    folder: str
    limit: str
    usage: str
    stat: str
    cache_keys: tuple[bytes, ...]  # the memory.stat lines of its reclaimable file cache


_V2 = ("memory.max", "memory.current", "memory.stat", (b"active_file", b"inactive_file"))
_V1 = (
    "memory.limit_in_bytes",
    "memory.usage_in_bytes",
    "memory.stat",
    (b"total_active_file", b"total_inactive_file"),
)


def _read(path: str, limit: int = 65536) -> bytes | None:
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_limit(path: str) -> int | None:
    """A byte count from a cgroup file; None if absent, unreadable or unlimited."""
    data = _read(path, 64)
    if data is None:
        return None
    data = data.strip()
    if not data.isdigit():
        return None  # "max"
    value = int(data)
    return None if value >= _UNLIMITED else value


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes come as octal escapes."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def _relative(path: str, root: str) -> str | None:
    """*path* (from /proc/self/cgroup) relative to a mount whose root is *root*; None if outside."""
    if ".." in path.split("/"):
        return None  # a cgroup outside this cgroup namespace: not visible here
    if root == "/":
        return path
    if path == root:
        return "/"
    if path.startswith(root + "/"):
        return path[len(root) :]
    return None


def _mounts(mountinfo: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(root, mount point) of the cgroup v1 memory hierarchies and of the cgroup2 mounts."""
    v1: list[tuple[str, str]] = []
    v2: list[tuple[str, str]] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < separator + 3:
            continue
        mount = (_unescape(fields[3]), _unescape(fields[4]))
        kind = fields[separator + 1]
        if kind == "cgroup2":
            v2.append(mount)
        elif kind == "cgroup" and "memory" in fields[separator + 3].split(","):
            v1.append(mount)
    return v1, v2


@functools.cache
def _cgroups() -> tuple[_Cgroup, ...]:
    """This process's memory cgroup and its parents, innermost first; () without any.

    The memory controller lives in one hierarchy: cgroup v1's ``memory`` on
    hosts that still mount it (then its line in /proc/self/cgroup names it),
    else the unified cgroup v2 one.
    """
    cgroup_text = _read("/proc/self/cgroup")
    mountinfo = _read("/proc/self/mountinfo", 1 << 20)
    if cgroup_text is None or mountinfo is None:
        return ()
    v1_path = v2_path = None
    for line in cgroup_text.decode(errors="replace").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    v1_mounts, v2_mounts = _mounts(mountinfo.decode(errors="replace"))
    if v1_path is not None and v1_mounts:
        path, mounts, files = v1_path, v1_mounts, _V1
    elif v2_path is not None and v2_mounts:
        path, mounts, files = v2_path, v2_mounts, _V2
    else:
        return ()
    limit, usage, stat, keys = files
    for root, mount_point in mounts:
        relative = _relative(path, root)
        if relative is None:
            continue
        levels = []
        folder = os.path.normpath(mount_point + "/" + relative.strip("/"))
        while True:
            levels.append(
                _Cgroup(
                    folder,
                    os.path.join(folder, limit),
                    os.path.join(folder, usage),
                    os.path.join(folder, stat),
                    keys,
                )
            )
            if folder == mount_point or not folder.startswith(mount_point):
                break
            folder = os.path.dirname(folder)
        return tuple(levels)
    return ()


def _mem_available() -> int | None:
    data = _read("/proc/meminfo", 4096)
    if data is None:
        return None
    start = data.find(b"MemAvailable:")
    if start < 0:
        return None  # Linux before 3.14
    fields = data[start : data.find(b"\n", start)].split()
    try:
        return int(fields[1]) * 1024
    except (IndexError, ValueError):
        return None


def _file_cache(cgroup: _Cgroup) -> int:
    """Bytes of file cache the kernel can reclaim in *cgroup* before it OOM-kills."""
    data = _read(cgroup.stat)
    if data is None:
        return 0
    total = 0
    for line in data.splitlines():
        key, _, value = line.partition(b" ")
        if key in cgroup.cache_keys:
            try:
                total += int(value)
            except ValueError:
                pass
    return total


def _room(*, with_cache: bool) -> tuple[int, str]:
    """What can still be allocated, and where that figure comes from."""
    available = _mem_available()
    room, source = (
        (available, "MemAvailable in /proc/meminfo")
        if available is not None
        else (physical_memory(), "the host's RAM")
    )
    for cgroup in _cgroups():
        limit = _read_limit(cgroup.limit)
        if limit is None:
            continue
        usage = _read_limit(cgroup.usage) or 0
        left = limit - usage
        cache = _file_cache(cgroup) if with_cache else 0
        if left + cache < room:
            room = max(0, left + cache)
            reclaim = f", {format_size(cache)} of it file cache" if cache else ""
            source = (
                f"the memory cgroup {cgroup.folder}: limit {format_size(limit)}, "
                f"{format_size(usage)} in use{reclaim}"
            )
    return room, source


def available_memory() -> int:
    """Bytes this process can still allocate before a memory cgroup or the host runs out.

    The least, over this process's memory cgroups with a limit, of the limit
    less the usage plus the reclaimable file cache, and the host's
    MemAvailable (see the module's docstring).
    """
    return _room(with_cache=True)[0]


def memory_ceiling() -> int:
    """The most memory this process may ever use: its tightest cgroup limit, else the RAM."""
    ceiling = physical_memory()
    for cgroup in _cgroups():
        limit = _read_limit(cgroup.limit)
        if limit is not None:
            ceiling = min(ceiling, limit)
    return ceiling


def check_can_allocate(size: int, what: str) -> None:
    """`OutOfSharedMemory` if *size* bytes more do not fit in `available_memory()`.

    Called before allocating, so that the process is told instead of
    OOM-killed. Sizes below `CHECK_THRESHOLD` pass unchecked (see the
    module's docstring for why).
    """
    if size < CHECK_THRESHOLD:
        return
    room, _ = _room(with_cache=False)
    if size <= room:
        return
    room, source = _room(with_cache=True)
    if size <= room:
        return
    raise OutOfSharedMemory(
        f"{what} of {format_size(size)} ({size} bytes) does not fit: {format_size(room)} can "
        f"still be allocated, according to {source}. Refused before allocating, so that the "
        "OOM killer does not end this process; free memory, ask for less, or raise the limit"
    )


def check_can_store(size: int, folder: str, what: str) -> None:
    """`OutOfSharedMemory` if a file of *size* bytes does not fit in *folder*.

    Its filesystem must have the space free (statvfs), and a filesystem in
    memory (tmpfs, hugetlbfs) the memory too (`check_can_allocate`): the
    pages of /dev/shm are charged to the memory cgroup like any other.
    """
    if size <= 0:
        return
    try:
        space = os.statvfs(folder)
    except OSError:
        space = None
    # A tmpfs mounted without a size limit reports no blocks at all.
    if space is not None and space.f_blocks:
        free = space.f_bavail * space.f_frsize
        if size > free:
            raise OutOfSharedMemory(
                f"{what} of {format_size(size)} ({size} bytes) does not fit in {folder}: its "
                f"filesystem has {format_size(free)} free. Free blobs, or make the "
                "filesystem larger (for /dev/shm: mount -o remount,size=...)"
            )
    if size >= CHECK_THRESHOLD and filesystem_magic(folder) in _MEMORY_FILESYSTEMS:
        check_can_allocate(size, what)
