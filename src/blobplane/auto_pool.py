"""`AutoPool`: the pool behind the calls that copy (`send_bytes`, `send_obj`), managed for you.

A fresh memfd costs a page fault per 4 KiB page it is filled through; a
`BlobPool` slot pays that once. The calls that copy the caller's bytes into
shared memory anyway take a slot of this pool instead of a fresh blob:

- **By size class.** A payload takes a slot of its class: its size rounded up
  to a quarter of its power of two (at most 25% more) and to whole pages.
  A class grows by one slot whenever all of its slots are in use.
- **One owner per slot.** A slot is loaned again only to the owner it was
  first loaned for (a channel, a broker client: `SlotOwner`), and is closed
  when that owner is done (`retire`): whoever read it may keep its mapping,
  so it never carries another peer's bytes.
- **Bounded.** All slots together hold at most `max_bytes` (by default an
  eighth of the host's memory, at most 4 GiB), and there are at most
  `max_slots` of them (64 by default: each holds two fds). A payload that
  finds no room, even after the idle slots of other classes are dropped, is
  not pooled: the caller sends a fresh blob instead. So is one under
  `MIN_POOLED_BYTES` (64 KiB), whose page faults cost less than a slot's fds.
- **Shrunk when idle.** A slot that nobody holds and nobody took for
  `idle_seconds` is closed, by a thread that looks every half of that
  period (started when a slot first comes back). A reader's mapping of it
  goes when the reader's slot cache lets it go (its channel closes, or
  newer slots push it out).
- **One slot, one first cost.** A slot is made when first needed, so a
  process that sends once pays what one fresh blob of the class costs.

Each slot is a one-slot `BlobPool`, with that pool's protections: readers can
never map it writable or resize it; its contents are not frozen by the kernel
(the producer, this library, could still write), which a caller that needs
immutability enforced against its own process avoids with ``sealed=True``.
Its slots can take one more seal (`BlobPool(sealable=True)`): a broker that
keeps one published after its producer went seals it against every write.
A process forked from one holding a pool starts with an empty one: the
slots' mappings are not inherited (MADV_DONTFORK), the child lets go of
their fds at the fork without touching the holes they left, and parent and
child never share a slot.
"""

from __future__ import annotations

import _thread
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import overload

from blobplane.backends.mapping import physical_memory
from blobplane.errors import BlobError, InvalidSize
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import is_int, is_number

__all__ = [
    "DEFAULT_IDLE_SECONDS",
    "DEFAULT_MAX_SLOTS",
    "MIN_POOLED_BYTES",
    "AutoPool",
    "PoolSetting",
    "SlotOwner",
    "default_auto_pool",
    "slot_class",
]

DEFAULT_IDLE_SECONDS = 30.0
DEFAULT_MAX_SLOTS = 64
MIN_POOLED_BYTES = 64 << 10
_MAX_DEFAULT_BYTES = 4 << 30


def default_max_bytes() -> int:
    """An eighth of the host's memory, at most 4 GiB."""
    return min(_MAX_DEFAULT_BYTES, physical_memory() // 8)


def slot_class(size: int) -> int:
    """The slot size that holds *size* bytes: up to a quarter more, in whole pages."""
    step = max(1, 1 << max(0, size.bit_length() - 3))  # a quarter of size's power of two
    rounded = -(-size // step) * step
    return -(-rounded // mmap.PAGESIZE) * mmap.PAGESIZE


@dataclass(slots=True)
class _Slot:
    pool: BlobPool
    used: float  # time.monotonic() of its last loan
    owner: object  # what it was loaned for: only that one gets it again (`try_loan`)


class AutoPool:
    """Pooled slots by size class: at most *max_bytes* and *max_slots* in all, each dropped
    after *idle_seconds* unused.

    Thread-safe. `try_loan(size)` gives a slot of at least *size* bytes (its
    `length` set to *size*), or None when the bounds leave no room.
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        *,
        max_slots: int = DEFAULT_MAX_SLOTS,
    ) -> None:
        if max_bytes is None:
            max_bytes = default_max_bytes()
        if not is_int(max_bytes) or max_bytes < 0:
            raise InvalidSize(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        if not is_int(max_slots) or max_slots < 0:
            raise InvalidSize(f"max_slots must be an int >= 0, got {max_slots!r}")
        if not is_number(idle_seconds) or not idle_seconds > 0:
            raise InvalidSize(f"idle_seconds must be a number > 0, got {idle_seconds!r}")
        self.max_bytes = max_bytes
        self.max_slots = max_slots
        self.idle_seconds = float(idle_seconds)
        self._lock = threading.Lock()
        self._classes: dict[int, list[_Slot]] = {}
        self._bytes = 0
        self._slots = 0
        self._closed = False
        # Bumped whenever the counts are reset (`close`, a fork): a slot made meanwhile
        # outside the lock then has no room reserved any more.
        self._generation = 0
        _every_pool.add(self)
        # What the slots call when one comes back (`BlobPool(on_free=)`): the reaper
        # looks after the pool from then on. Not before: a slot in use is no reaper's
        # business, and a process that sends once and exits never pays for the thread.
        ref = weakref.ref(self)

        def came_back() -> None:
            pool = ref()
            if pool is not None:
                _watch(pool)

        self._came_back = came_back

    @property
    def bytes(self) -> int:
        """Bytes of every slot the pool holds now, in use or not."""
        return self._bytes

    @property
    def slots(self) -> int:
        """Slots the pool holds now, in use or not."""
        return self._slots

    def try_loan(self, size: int, owner: object = None) -> PoolLoan | None:
        """A slot holding *size* bytes for *owner*, its `length` set; None if the bounds leave
        no room.

        A slot is loaned again only to the owner it was first loaned to (a
        channel, a broker client): whoever read it before may keep a mapping of
        it, so it must never carry another peer's bytes. `retire(owner)` when
        that owner is done.
        """
        if size < MIN_POOLED_BYTES:
            return None
        size_class = slot_class(size)
        if size_class > self.max_bytes:
            return None
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return None
            slots = self._classes.setdefault(size_class, [])
            for slot in reversed(slots):  # the most recently used first: its pages are warm
                if slot.owner is not owner:
                    continue
                loan = slot.pool.try_loan()
                if loan is not None:
                    slot.used = now
                    loan.set_length(size)
                    return loan
            if self._bytes + size_class > self.max_bytes or self._slots >= self.max_slots:
                self._drop_idle(
                    now,
                    need=self._bytes + size_class - self.max_bytes,
                    slots=self._slots + 1 - self.max_slots,
                )
                if self._bytes + size_class > self.max_bytes or self._slots >= self.max_slots:
                    return None
            # Its room is taken now; the slot is made outside the lock (faulting in a
            # large one takes long), so that other owners' loans go on meanwhile.
            self._bytes += size_class
            self._slots += 1
            generation = self._generation
        try:
            pool = BlobPool(size_class, 1, sealable=True, on_free=self._came_back)
        except BlobError:
            pool = None  # no memory for it: the caller's fresh blob says why, if it fails too
        with self._lock:
            if self._generation != generation:  # closed (or forked) meanwhile: room is gone
                if pool is not None:
                    pool.close()
                return None
            if pool is None:
                self._bytes -= size_class
                self._slots -= 1
                return None
            # Not inherited by a forked child: the slot is this process's alone, and a
            # broker can seal one it keeps once this process lets go.
            pool.slot_mapping(0).madvise(mmap.MADV_DONTFORK)
            # Looked up again: dropping idle slots may have removed the (empty) class.
            self._classes.setdefault(size_class, []).append(_Slot(pool, now, owner))
            loan = pool.try_loan()
        assert loan is not None  # a new pool's one slot is free
        loan.set_length(size)
        return loan

    def shrink(self, idle_seconds: float | None = None) -> int:
        """Close the slots that nobody holds and nobody took for *idle_seconds* (default: the
        pool's; 0: every slot nobody holds); the bytes freed."""
        with self._lock:
            before = self._bytes
            self._drop_idle(time.monotonic(), idle_seconds=idle_seconds)
            return before - self._bytes

    def retire(self, owner: object) -> None:
        """Close every slot loaned for *owner*, free or not: it is done (its channel closed).

        None is ever loaned again: its peer may keep a mapping of it (readers'
        mappings keep the memory), and a broker that keeps a blob put from it
        seals it once this process let go of its mapping.
        """
        with self._lock:
            for size_class, slots in self._classes.items():
                for slot in [slot for slot in slots if slot.owner is owner]:
                    self._remove(size_class, slot)

    def drop(self, pool: BlobPool) -> bool:
        """Close the slot *pool* (a `PoolLoan.pool` of this pool's) for good: someone who may
        keep it must not see another blob in it. Whether it was one of this pool's."""
        with self._lock:
            for size_class, slots in self._classes.items():
                for slot in slots:
                    if slot.pool is pool:
                        self._remove(size_class, slot)
                        return True
        return False

    def close(self) -> None:
        """Close every slot, and make no more: readers keep the mappings they hold."""
        with self._lock:
            self._closed = True
            classes, self._classes = self._classes, {}
            self._bytes = self._slots = 0
            self._generation += 1
        for slots in classes.values():
            for slot in slots:
                slot.pool.close()

    def __repr__(self) -> str:
        return f"<AutoPool {self.slots} slots, {self._bytes} of {self.max_bytes} bytes>"

    def _drop_idle(
        self,
        now: float,
        need: int = 0,
        idle_seconds: float | None = None,
        slots: int = 0,
    ) -> None:
        """Close idle free slots, the longest idle first; and any free ones, until *need*
        bytes and *slots* slots are gone."""
        if idle_seconds is None:
            idle_seconds = self.idle_seconds
        candidates = sorted(
            (
                (slot.used, size_class, slot)
                for size_class, members in self._classes.items()
                for slot in members
                if slot.pool.free_slots
            ),
            key=lambda candidate: candidate[0],
        )
        for used, size_class, slot in candidates:
            if now - used < idle_seconds and need <= 0 and slots <= 0:
                break
            self._remove(size_class, slot)
            need -= size_class
            slots -= 1
        for size_class in [size for size, slots in self._classes.items() if not slots]:
            del self._classes[size_class]

    def _remove(self, size_class: int, slot: _Slot) -> None:
        """Close *slot* of *size_class* and give its room back (under the lock)."""
        self._classes[size_class].remove(slot)
        slot.pool.close()
        self._bytes -= size_class
        self._slots -= 1

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's slots, which are the parent's to use."""
        self._lock = threading.Lock()  # the parent's may have been held at the fork
        for slots in self._classes.values():
            for slot in slots:
                slot.pool.abandon_after_fork()
                _inherited.append(slot.pool)
        self._classes.clear()
        self._bytes = self._slots = 0
        self._generation += 1


class SlotOwner:
    """What a channel or a broker client takes auto-pool slots as (`AutoPool.try_loan`'s
    owner), with the pools it took them from: `retire()` closes them all when it is done."""

    __slots__ = ("_pools",)

    def __init__(self) -> None:
        self._pools: list[AutoPool] = []

    def loan(self, pool: AutoPool, size: int) -> PoolLoan | None:
        loan = pool.try_loan(size, self)
        if loan is not None and pool not in self._pools:
            self._pools.append(pool)
        return loan

    def retire(self) -> None:
        for pool in self._pools:
            pool.retire(self)
        self._pools.clear()


class PoolSetting:
    """The `auto_pool` attribute of a channel or a client, kept by the object its owner holds
    under *core* (the I/O-free core both of its drivers share), checked when set."""

    def __init__(self, doc: str, *, core: str = "_core") -> None:
        self.__doc__ = doc
        self._core = core

    @overload
    def __get__(self, owner: None, kind: type) -> PoolSetting: ...

    @overload
    def __get__(self, owner: object, kind: type) -> AutoPool | None: ...

    def __get__(self, owner: object, kind: type) -> PoolSetting | AutoPool | None:
        if owner is None:
            return self
        pool: AutoPool | None = getattr(owner, self._core).auto_pool
        return pool

    def __set__(self, owner: object, pool: AutoPool | None) -> None:
        if pool is not None and not isinstance(pool, AutoPool):
            raise TypeError(f"auto_pool is an AutoPool or None, not {type(pool).__name__}")
        getattr(owner, self._core).auto_pool = pool


_default: AutoPool | None = None
_default_lock = threading.Lock()
# Every pool of the process, for a forked child to reset (`_after_fork_in_child`), and
# the slots a child inherited: kept for its life, so their mappings are never unmapped.
_every_pool: weakref.WeakSet[AutoPool] = weakref.WeakSet()
_inherited: list[BlobPool] = []


def default_auto_pool() -> AutoPool:
    """The process's pool, made on first use: what channels use unless told otherwise."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = AutoPool()
    return _default


# -- the idle reaper: one daemon thread for every pool of the process ----------------------

_watched: weakref.WeakSet[AutoPool] = weakref.WeakSet()
_reaper_pid = 0  # the process the reaper runs in (none: 0)
_reaper_lock = threading.Lock()
_reaper_woken = threading.Event()  # a pool joined: its period may be shorter


def _watch(pool: AutoPool) -> None:
    """Have the reaper look after *pool* (which has slots now)."""
    global _reaper_pid
    with _reaper_lock:
        if pool in _watched and _reaper_pid == os.getpid():
            return
        _watched.add(pool)
        if _reaper_pid != os.getpid():
            _reaper_pid = os.getpid()
            # A bare thread: `threading.Thread.start` waits for the thread to run,
            # which cost a one-off send 0.3 ms, more than the slot itself. Like a
            # daemon thread, it never holds up the interpreter's exit.
            _thread.start_new_thread(_reap, ())
    _reaper_woken.set()  # its period may be shorter


def _reap() -> None:
    while True:
        with _reaper_lock:
            pools = list(_watched)
        period = min((pool.idle_seconds for pool in pools), default=DEFAULT_IDLE_SECONDS) / 2
        del pools  # the set is weak: a pool dropped meanwhile goes
        if _reaper_woken.wait(period):
            _reaper_woken.clear()
            continue  # a pool joined: wait by the periods of them all
        with _reaper_lock:
            pools = list(_watched)
        for pool in pools:
            pool.shrink()
        del pools


def _after_fork_in_child() -> None:
    global _default_lock, _reaper_lock, _reaper_woken, _reaper_pid
    _default_lock = threading.Lock()
    _reaper_lock = threading.Lock()
    _reaper_woken = threading.Event()
    _reaper_pid = 0  # none runs here: the next slot starts one
    for pool in list(_every_pool):
        pool._after_fork()  # noqa: SLF001 - the module's own class


os.register_at_fork(after_in_child=_after_fork_in_child)
