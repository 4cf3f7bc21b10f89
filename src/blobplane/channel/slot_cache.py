"""The receiver's cache of pool slots it has mapped: one mapping per slot, reused per frame.

A pooled handoff names its slot (pool id, index). The first time a slot
arrives its fd passes the sealing checks and is mapped whole; later handoffs
of the same slot reuse that mapping, and their fd is closed at once after a
single fstat proves it is still the same memfd (a sender cannot slip another
file under a cached name). The cache is bounded: the least recently used
slot is dropped to make room (unmapped once its last reader is done).
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from blobplane.backends.checks import check_received_fd
from blobplane.backends.mapping import map_readonly
from blobplane.blobs import MappedRead
from blobplane.errors import os_errors
from blobplane.wire import SlotRef

DEFAULT_MAX_SLOTS = 64


@dataclass(slots=True)
class _Entry:
    mapped: mmap.mmap | None
    identity: tuple[int, int]  # (st_dev, st_ino) of the memfd
    size: int


class SlotCache:
    """Mapped pool slots by (pool, index), at most *max_slots* of them."""

    def __init__(self, max_slots: int = DEFAULT_MAX_SLOTS) -> None:
        self.max_slots = max_slots
        self._entries: OrderedDict[tuple[object, int], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def view(
        self,
        slot: SlotRef,
        fd: int,
        size: int,
        on_close: Callable[[], None] | None = None,
        *,
        allow_sparse: bool = False,
    ) -> MappedRead:
        """A read-only view of *size* bytes of the slot behind *fd* (borrowed: not closed)."""
        key = (slot.pool, slot.index)
        with os_errors("inspecting a pool slot"):
            info = os.fstat(fd)
        identity = (info.st_dev, info.st_ino)
        entry = self._entries.get(key)
        if entry is None or entry.identity != identity or entry.size < size:
            check_received_fd(fd, size, allow_sparse=allow_sparse)
            if entry is not None:
                self._drop(key)
            entry = _Entry(map_readonly(fd, info.st_size), identity, info.st_size)
            self._entries[key] = entry
            while len(self._entries) > self.max_slots:
                self._drop(next(iter(self._entries)))
        else:
            self._entries.move_to_end(key)
        # Borrowed: closing the reader leaves the cached mapping in place.
        return MappedRead(entry.mapped, size, on_close, owned=False)

    def close(self) -> None:
        while self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[object, int]) -> None:
        # No close(): readers that borrowed the mapping keep it until they go,
        # and CPython unmaps it the moment the last reference does.
        del self._entries[key]
