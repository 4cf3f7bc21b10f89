"""Counting what a test could leak: fds, mappings, shm names and private files."""

from __future__ import annotations

import os
from dataclasses import dataclass

from blobplane.auto_pool import default_auto_pool
from blobplane.backends.private_dir import SHM_ROOT, shm_root, temp_root


def open_fds(pid: int | str = "self") -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


def blob_mappings(pid: int | str = "self") -> int:
    """Mapped regions of blobplane blobs (memfds and files in the private folders)."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum(
            1
            for line in maps
            if "blobplane" in line and ("/memfd:" in line or "/blobplane-" in line)
        )


def _target(fd: int) -> str:
    """What an open fd of this process is, for a leak's message."""
    try:
        return f"{fd}: {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return f"{fd}: closed since"


def _entries(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()


@dataclass(frozen=True)
class Snapshot:
    fds: frozenset[int]
    mappings: int
    dev_shm: frozenset[str]
    shm_private: frozenset[str]
    temp_private: frozenset[str]

    @classmethod
    def take(cls) -> Snapshot:
        # The process's AutoPool keeps free slots on purpose, for the next send:
        # dropped first, so that only what someone still holds counts.
        default_auto_pool().shrink(0)
        return cls(
            fds=frozenset(open_fds()),
            mappings=blob_mappings(),
            # Only names this library could have made (other programs use /dev/shm
            # too), less the private folders of concurrent test sessions.
            dev_shm=frozenset(
                n
                for n in _entries(SHM_ROOT)
                if n.startswith("blobplane") and not n.startswith("blobplane-tests-")
            ),
            shm_private=frozenset(_entries(shm_root())),
            temp_private=frozenset(_entries(temp_root())),
        )

    def leaks_since(self, before: Snapshot) -> list[str]:
        found = []
        if extra := self.fds - before.fds:
            targets = ", ".join(_target(fd) for fd in sorted(extra))
            found.append(f"fds {sorted(extra)} left open ({targets})")
        if self.mappings > before.mappings:
            found.append(f"{self.mappings - before.mappings} blob mappings left")
        for label in ("dev_shm", "shm_private", "temp_private"):
            extra_names = getattr(self, label) - getattr(before, label)
            if extra_names:
                found.append(f"{label}: {sorted(extra_names)} left behind")
        return found
