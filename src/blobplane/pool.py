"""`BlobPool`: memfd slots created, mapped and pre-faulted once, then loaned out again and again.

Fresh shared memory costs a page fault per 4 KiB page; a pool pays that once.
Each slot is a memfd sealed with F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_FUTURE_WRITE | F_SEAL_SEAL right after the producer mapped it
writable: nobody can ever shrink or grow it (so readers are safe from SIGBUS)
and no process can map it writable again, while the producer keeps its own
mapping. Unlike `ProducerBlob.seal()`, the kernel does not make the contents
immutable: the producer could still write while a reader looks. The library
never does: a slot goes back to the free list only when the producer's loan
is closed and every reader it was handed to has released it.

A control block (one more memfd, sealed the same way) holds a generation
counter per slot, bumped at every loan. A reader maps it read-only and, in
check mode, compares the generation it was told with the live one to detect
a slot rewritten while it held it, which only a broken producer can cause.
Generations are read and written as whole aligned u64s (a "Q" memoryview),
never with `struct.pack_into`: that zeroes the bytes before writing them, so
a reader on another CPU could see 0, or old and new bytes mixed, and take a
revoked slot's stale generation for the current one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from blobplane.backends.checks import F_SEAL_FUTURE_WRITE
from blobplane.backends.mapping import (
    map_writable,
    physical_memory,
    unmap_when_unused,
    write_into,
)
from blobplane.backends.memfd import create_sealable_memfd
from blobplane.backends.memlimit import check_can_allocate
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    InvalidSize,
    OutOfBounds,
    Timeout,
    os_errors,
)
from blobplane.fds import close_fds
from blobplane.slot_claims import try_claim_exclusive, unclaim
from blobplane.types import BlobId, BlobToken, UnixFd, is_int

__all__ = ["GENERATION_SIZE", "POOL_SEALS", "BlobPool", "PoolLoan", "sealed_memfd"]

POOL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
GENERATION_SIZE = 8  # one u64 per slot in the control block


def _round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def sealed_memfd(name: str, size: int, seals: int = POOL_SEALS) -> tuple[int, mmap.mmap]:
    """A pre-faulted writable mapping of a new memfd, then sealed with *seals*.

    With the default (`POOL_SEALS`) nobody else can ever map it writable, and
    nobody can shrink or grow it, while this mapping stays writable. Its pages
    are allocated (posix_fallocate) before it is mapped, so a reader finds
    no hole to fault in at its own expense (`checks.check_allocated`), even
    on kernels that cannot pre-fault.
    """
    fd = create_sealable_memfd(name)
    try:
        with os_errors(f"allocating {size} bytes of pool memory"):
            os.posix_fallocate(fd, 0, size)
        mapped = map_writable(fd, size, prefault=True)
        assert mapped is not None  # size > 0: pools round up to whole pages
        try:
            with os_errors("sealing pool memory"):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except BaseException:
            mapped.close()
            raise
    except BaseException:
        os.close(fd)
        raise
    return fd, mapped


@dataclass(slots=True)
class _Slot:
    fd: int
    mapped: mmap.mmap
    loaned: bool = False
    holders: int = 0


class BlobPool:
    """*slots* reusable memfds of *slot_size* bytes each, owned by the producer.

    `loan()` a slot, fill it through `loan.buffer`, hand it over (a channel
    calls `retain()` per receiver and the pool hears of each release), close
    the loan. Thread-safe; `loan(timeout=...)` waits for a free slot.

    *sealable* leaves out F_SEAL_SEAL: a broker that keeps a slot published
    after its producer went seals it against every write then (the kernel
    allows that only once no writable mapping of it is left). *on_free* is
    called, under the pool's lock, whenever a slot comes back to the free
    list: it must be quick and must not use the pool.
    """

    def __init__(
        self,
        slot_size: int,
        slots: int,
        *,
        sealable: bool = False,
        on_free: Callable[[], None] | None = None,
    ) -> None:
        if not is_int(slot_size) or slot_size <= 0:
            raise InvalidSize(f"slot_size must be a positive int, got {slot_size!r}")
        if not is_int(slots) or slots <= 0:
            raise InvalidSize(f"slots must be a positive int, got {slots!r}")
        mapped_size = _round_up(slot_size, mmap.PAGESIZE)
        if mapped_size * slots > physical_memory():
            raise InvalidSize(f"{slots} slots of {slot_size} bytes exceed this host's memory")
        control_size = _round_up(GENERATION_SIZE * slots, mmap.PAGESIZE)
        check_can_allocate(mapped_size * slots + control_size, f"a pool of {slots} slots")
        self.id = BlobId.new()
        self.slot_size = slot_size
        self._lock = threading.Condition()
        self._slots: list[_Slot] = []
        # Free slots, the most recently freed last: loans take from that end,
        # so a stream keeps reusing the slots whose pages are still in the CPU's
        # caches (a 64 MiB frame ran 3-5% faster than taking the oldest).
        self._free: deque[int] = deque()
        self._on_free = on_free
        self._closed = False
        try:
            self._control_fd, self._control = sealed_memfd(
                f"blobplane-pool:{self.id}:control", control_size
            )
            self._generations = memoryview(self._control).cast("Q")
            seals = POOL_SEALS & ~fcntl.F_SEAL_SEAL if sealable else POOL_SEALS
            for index in range(slots):
                name = f"blobplane-pool:{self.id}:{index}"
                fd, mapped = sealed_memfd(name, mapped_size, seals)
                self._slots.append(_Slot(fd, mapped))
                self._free.appendleft(index)  # slot 0 is loaned first
        except BaseException:
            self._control_fd = getattr(self, "_control_fd", -1)
            self.close()
            raise

    @property
    def slots(self) -> int:
        return len(self._slots)

    @property
    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def closed(self) -> bool:
        return self._closed

    def loan(self, timeout: float | None = None) -> PoolLoan:
        """Take a free slot, waiting up to *timeout* seconds (None: forever) for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._free:
                self._check_open()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Timeout(
                        f"no free slot in this pool of {self.slots} within {timeout} s: "
                        "every slot is loaned or still held by a reader"
                    )
                self._lock.wait(remaining)
            self._check_open()
            index = self._free.pop()
            slot = self._slots[index]
            slot.loaned = True
            generation = self._bump_generation(index)
        return PoolLoan(self, index, generation)

    def try_loan(self) -> PoolLoan | None:
        """A free slot now, or None."""
        # Not loan(timeout=0): a stream asks this for every frame, and an empty
        # pool is its usual way of finding out it must wait, not an error.
        with self._lock:
            self._check_open()
            if not self._free:
                return None
            index = self._free.pop()
            self._slots[index].loaned = True
            generation = self._bump_generation(index)
        return PoolLoan(self, index, generation)

    def generation(self, slot: int) -> int:
        """The slot's current generation (bumped at every loan)."""
        return self._generations[slot]

    def control_fileno(self) -> int:
        """The control block's memfd (generations), for readers to map read-only."""
        self._check_open()
        return self._control_fd

    def slot_fileno(self, slot: int) -> int:
        self._check_open()
        return self._slots[slot].fd

    def slot_mapping(self, slot: int) -> mmap.mmap:
        """The producer's writable mapping of *slot* (what a loan's `buffer` views)."""
        return self._slots[slot].mapped

    def retain(self, slot: int) -> None:
        """One more reader holds *slot*; it stays out of the free list until released."""
        with self._lock:
            self._slots[slot].holders += 1

    def release(self, slot: int) -> None:
        """A reader let go of *slot*."""
        with self._lock:
            state = self._slots[slot]
            if state.holders <= 0:
                raise BlobBusy(f"slot {slot} released more often than it was handed out")
            state.holders -= 1
            self._maybe_free(slot)

    def try_revoke(self, slot: int) -> bool:
        """Take back a slot handed to readers none of whom is reading it now.

        Succeeds only if no reader holds a claim (`slot_claims.try_claim_shared`)
        on it; the generation is bumped under the exclusive claim, so a reader
        that comes to it later sees a stale generation and skips the frame.
        Readers that took part in a revoked handoff must not release it.
        """
        with self._lock:
            state = self._slots[slot]
            if state.loaned or state.holders == 0:
                return False
            if not try_claim_exclusive(self._control_fd, slot):
                return False
            try:
                self._bump_generation(slot)
            finally:
                unclaim(self._control_fd, slot)
            state.holders = 0
            self._maybe_free(slot)
            return True

    def holders(self, slot: int) -> int:
        with self._lock:
            return self._slots[slot].holders

    def close(self) -> None:
        """Unmap and close every slot (mappings with live views go when the views do)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
            slots, self._slots = self._slots, []
            self._free.clear()
        for slot in slots:
            unmap_when_unused(slot.mapped)
            os.close(slot.fd)
        if getattr(self, "_generations", None) is not None:
            self._generations.release()
        if getattr(self, "_control", None) is not None:
            unmap_when_unused(self._control)
        if self._control_fd >= 0:
            os.close(self._control_fd)
            self._control_fd = -1

    def abandon_after_fork(self) -> None:
        """In a forked child: close the pool's fds and leave its mappings alone.

        A slot mapped `MADV_DONTFORK` left a hole in the child, which the
        child's own memory may fill since: unmapping there would pull that
        from under it. The caller keeps this object for the child's life, so
        that no mapping is ever unmapped by its deallocation either.
        """
        self._lock = threading.Condition()  # the parent's may have been held at the fork
        self._closed = True
        self._free.clear()
        close_fds(slot.fd for slot in self._slots)
        if self._control_fd >= 0:
            close_fds([self._control_fd])
            self._control_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BlobPool {self.slots} x {self.slot_size} bytes, {self.free_slots} free>"

    def _bump_generation(self, slot: int) -> int:
        generation = self._generations[slot] + 1
        self._generations[slot] = generation
        return generation

    def return_loan(self, slot: int) -> None:
        """Take back a loaned slot (`PoolLoan.close` calls it); it is free once nobody holds it."""
        with self._lock:
            if self._closed:
                return
            self._slots[slot].loaned = False
            self._maybe_free(slot)

    def _maybe_free(self, slot: int) -> None:
        state = self._slots[slot]
        if not state.loaned and state.holders == 0:
            self._free.append(slot)
            self._lock.notify()
            if self._on_free is not None:
                self._on_free()

    def _check_open(self) -> None:
        if self._closed:
            raise BlobClosed("this BlobPool is closed")


class PoolLoan:
    """A slot on loan to the producer: write it, hand it over, close it.

    `length` (default: the whole slot) is how many bytes a receiver sees.
    Closing the loan gives the slot back once every receiver released it;
    views of `buffer` must be gone by then.
    """

    __slots__ = ("_closed", "_pool", "_token", "generation", "length", "slot")

    def __init__(self, pool: BlobPool, slot: int, generation: int) -> None:
        self._pool = pool
        self.slot = slot
        self.generation = generation
        self.length = pool.slot_size
        self._token: BlobToken | None = None  # made on first use: streams never need one
        self._closed = False

    @property
    def token(self) -> BlobToken:
        if self._token is None:
            self._token = BlobToken(BlobId.new(), self.length)
        return self._token

    @property
    def pool(self) -> BlobPool:
        return self._pool

    @property
    def buffer(self) -> memoryview:
        """A writable, page-aligned view of the whole slot; write in place for full speed."""
        self._check_open()
        return memoryview(self._pool.slot_mapping(self.slot))[: self._pool.slot_size]

    @property
    def id(self) -> BlobId:
        return self.token.id

    @property
    def size(self) -> int:
        """Bytes a receiver sees: the same as `length`."""
        return self.length

    @property
    def descriptor(self) -> UnixFd:
        return UnixFd(self.fileno())

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        self._check_open()
        return self._pool.slot_fileno(self.slot)

    def write_all(self, data: object, offset: int = 0) -> None:
        """Copy *data* into the slot at *offset*, bounds-checked."""
        self._check_open()
        write_into(self._pool.slot_mapping(self.slot), self._pool.slot_size, data, offset, "slot")

    def set_length(self, length: int) -> None:
        """Hand over only the first *length* bytes of the slot."""
        if not 0 <= length <= self._pool.slot_size:
            raise OutOfBounds(f"length {length} outside this {self._pool.slot_size}-byte slot")
        self.length = length
        self._token = BlobToken(self.token.id, length)

    def close(self) -> None:
        """Give the slot back to the pool (it is reused once every reader released it)."""
        if self._closed:
            return
        self._closed = True
        self._pool.return_loan(self.slot)

    def _check_open(self) -> None:
        if self._closed:
            raise BlobClosed(f"the loan of slot {self.slot} was closed; loan() a new one")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PoolLoan slot {self.slot} generation {self.generation} {self.length} bytes>"
