"""Pool slots a reader has mapped: one mapping per slot, reused by every later read of it.

A pool slot is published again and again (a channel's pooled handoffs, the
broker's pooled blobs): mapping it anew each time costs an mmap and a page
fault per page read. The first time a slot's memfd arrives it passes the
checks every received fd passes (`check_received_fd`) and is mapped whole;
later arrivals reuse that mapping once one fstat proves the fd is the same
memfd (the same inode: the mapping keeps it alive, so no other file can take
its identity) and large enough, and its seals can only have grown since. A
sender cannot slip another file under a cached slot: another file is another
inode, checked and mapped on its own.

Bounded in slots and in bytes: the least recently used slot goes first, a
producer's slots when it is known to have gone (`forget`), and all of them
at `close`. Dropping never unmaps under a reader: a read made from the
mapping keeps it until it goes.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from blobplane.backends.checks import check_received_fd
from blobplane.backends.mapping import map_readonly, physical_memory
from blobplane.blobs import MappedRead
from blobplane.errors import os_errors

__all__ = ["DEFAULT_MAX_SLOTS", "MAX_GONE_REMEMBERED", "SlotCache"]

DEFAULT_MAX_SLOTS = 64
# Owners remembered as gone (`forget`): only the last few matter, those whose
# slots a read already answered may still be mapping.
MAX_GONE_REMEMBERED = 1024


@dataclass(slots=True)
class _Entry:
    mapped: mmap.mmap | None
    size: int
    owner: Hashable


class SlotCache:
    """Mapped pool slots by memfd identity: at most *max_slots*, *max_bytes* in all.

    *max_bytes* None: a quarter of the host's memory.
    """

    def __init__(self, max_slots: int = DEFAULT_MAX_SLOTS, max_bytes: int | None = None) -> None:
        self.max_slots = max_slots
        self.max_bytes = physical_memory() // 4 if max_bytes is None else max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._gone: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def mapping(
        self, fd: int, size: int, owner: Hashable = None, *, allow_sparse: bool = False
    ) -> mmap.mmap | None:
        """A read-only mapping of the slot behind *fd* (borrowed), at least *size* bytes long.

        *owner* names who published it, for `forget`. A slot larger than the
        whole cache, or whose owner is known to be gone, is mapped for this
        read only.
        """
        with os_errors("inspecting a pool slot"):
            info = os.fstat(fd)
        identity = (info.st_dev, info.st_ino)
        entry = self._entries.get(identity)
        if entry is not None and entry.size >= size:
            self._entries.move_to_end(identity)
            entry.owner = owner  # the same memfd may be published by another owner now
            return entry.mapped
        check_received_fd(fd, size, allow_sparse=allow_sparse)
        if entry is not None:
            self._drop(identity)
        mapped = map_readonly(fd, info.st_size, info)
        if info.st_size > self.max_bytes or (owner is not None and owner in self._gone):
            return mapped
        self._entries[identity] = _Entry(mapped, info.st_size, owner)
        self.bytes += info.st_size
        while len(self._entries) > self.max_slots or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return mapped

    def view(
        self,
        fd: int,
        size: int,
        on_close: Callable[[], None] | None = None,
        owner: Hashable = None,
        *,
        allow_sparse: bool = False,
    ) -> MappedRead:
        """`mapping()` as a `MappedRead` of *size* bytes that borrows the cached mapping."""
        mapped = self.mapping(fd, size, owner, allow_sparse=allow_sparse)
        return MappedRead(mapped, size, on_close, owned=False)

    def forget(self, owner: Hashable) -> None:
        """Drop the slots *owner* published: it has gone, and its pools with it."""
        self._gone[owner] = None
        if len(self._gone) > MAX_GONE_REMEMBERED:
            self._gone.popitem(last=False)
        for identity in [key for key, entry in self._entries.items() if entry.owner == owner]:
            self._drop(identity)

    def close(self) -> None:
        while self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, identity: tuple[int, int]) -> None:
        # No close(): reads that borrowed the mapping keep it until they go, and
        # CPython unmaps it the moment the last reference does.
        self.bytes -= self._entries.pop(identity).size
