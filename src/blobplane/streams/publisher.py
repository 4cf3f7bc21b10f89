"""`Publisher`: frames from a `BlobPool` to every subscriber connected at a socket path.

The publisher is single-threaded: it accepts subscribers and collects their
releases whenever it is called (`loan`, `publish`, `pump`), and waits in
poll() on their sockets and bells when it needs a free slot. A frame goes to
each subscriber as an entry in that subscriber's ring in shared memory plus
a byte on its bell (see `streams.ring`), and comes back as a release mark in
the subscriber's release area: no message, no fd, per frame.
A subscriber that goes away (closed, killed) hangs up its socket and gives
back every slot it held at the next call.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Container
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from blobplane import channel
from blobplane.errors import BlobClosed, BlobError, InvalidSize, Timeout
from blobplane.pool import BlobPool, PoolLoan
from blobplane.streams.protocol import (
    MAX_HEADER,
    MAX_STREAM_SLOTS,
    Backpressure,
    End,
    Frame,
    Hello,
    Slots,
    encode,
)
from blobplane.streams.ring import (
    RELEASED_WORD,
    PublisherRing,
    answer_bell,
    require_ordered_memory,
    spin,
    spin_ns_of,
)
from blobplane.wire import MAX_FDS_PER_MESSAGE, UserPayload

__all__ = ["MAX_STREAM_SLOTS", "Publisher"]


@dataclass(eq=False)
class _Subscriber:
    channel: channel.Channel
    fd: int  # its socket's fd, registered in the publisher's pollers
    ring: PublisherRing
    # seq -> (slot, generation) of every frame handed to it and not yet released.
    outstanding: dict[int, tuple[int, int]] = field(default_factory=dict)
    unsent: int = 0


class Publisher:
    """Publishes frames through a pool of *slots* slots of *slot_size* bytes at *path*.

    ``policy`` decides what happens when every slot is taken:
    `Backpressure.BLOCK` waits (up to the timeout) for a release, so no
    frame is lost; `Backpressure.DROP_OLDEST` takes back the oldest frame
    that no subscriber is reading yet, and the subscribers that had not got
    to it are told how many frames they missed.

    ``spin_us``: when no slot is free, look for a release this many
    microseconds before sleeping in poll(). Off by default: waking a process
    asleep on another CPU costs ~30 µs on a VM, and a short spin saves that
    when the publisher and its subscribers each have a CPU of their own, but
    on a machine with fewer free CPUs than spinners the spin only takes the
    CPU the subscriber needs to release the slot. Past the first 5 µs the
    spinner yields its CPU at every look at the clock, so that a subscriber
    waiting for that CPU gets it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        slot_size: int,
        slots: int = 8,
        policy: Backpressure = Backpressure.BLOCK,
        timeout: float | None = 30.0,
        allowed_uids: Container[int] | None = None,
        spin_us: float = 0.0,
    ) -> None:
        if isinstance(slots, int) and slots > MAX_STREAM_SLOTS:
            raise InvalidSize(f"a stream pool has at most {MAX_STREAM_SLOTS} slots, not {slots}")
        require_ordered_memory()
        self.policy = Backpressure(policy)
        self.timeout = timeout
        self.spin_ns = spin_ns_of(spin_us)
        self._pool = BlobPool(slot_size, slots)
        try:
            self._listener = channel.listen(path, timeout=timeout, allowed_uids=allowed_uids)
        except BaseException:
            self._pool.close()
            raise
        self._subscribers: list[_Subscriber] = []
        self._by_fd: dict[int, _Subscriber] = {}
        # One poller for the publisher's life: pump() asks it which sockets have
        # something (a connection, a hang-up) and touches only those.
        self._poller = select.poll()
        self._listener_fd = self._listener.fileno()
        self._poller.register(self._listener_fd, select.POLLIN)
        # Waiting for a slot also wakes on releases; pump() must not, as the
        # bells are readable after nearly every frame.
        self._waiter = select.poll()
        self._waiter.register(self._listener_fd, select.POLLIN)
        self._by_bell: dict[int, _Subscriber] = {}
        self._seq = 0
        self._closed = False

    @property
    def path(self) -> str:
        return self._listener.path

    @property
    def pool(self) -> BlobPool:
        return self._pool

    @property
    def subscribers(self) -> int:
        """How many subscribers are connected (as of the last call)."""
        return len(self._subscribers)

    def wait_for_subscribers(self, count: int, timeout: float | None = None) -> None:
        """Block until at least *count* subscribers are connected."""
        deadline = _deadline(timeout)
        while len(self._subscribers) < count:
            self._wait(deadline, f"waiting for {count} subscribers")
            self.pump()

    def loan(self, timeout: float | None = None) -> PoolLoan:
        """A free slot to fill; under BLOCK waits up to *timeout* seconds for one."""
        self._check_open()
        deadline = _deadline(timeout)
        while True:
            self.pump()
            self._collect()
            loan = self._pool.try_loan()
            if loan is not None:
                return loan
            if self.policy is Backpressure.DROP_OLDEST and self._revoke_oldest():
                continue
            if self.spin_ns and self._spin():
                continue
            self._wait(deadline, "waiting for a free slot")

    def publish(self, loan: PoolLoan, header: bytes = b"", *, length: int | None = None) -> int:
        """Send the loaned slot to every subscriber, close the loan, return the frame's number."""
        self._check_open()
        if loan.pool is not self._pool:
            raise BlobError("this loan belongs to another pool; loan() it from this publisher")
        header = bytes(header)
        if len(header) > MAX_HEADER:
            raise InvalidSize(f"a frame header has at most {MAX_HEADER} bytes, not {len(header)}")
        if length is not None:
            loan.set_length(length)
        self._seq = seq = self._seq + 1
        slot, generation, size = loan.slot, loan.generation, loan.length
        frame = Frame(seq, slot, generation, size, time.monotonic_ns(), header=header)
        retain = self._pool.retain
        try:
            for subscriber in self._subscribers:
                ring = subscriber.ring
                if ring.full() and not self._may_overwrite(subscriber, ring.next_overwritten()):
                    # Its ring is full of frames it may still read: it is far
                    # behind. Skip it; it hears how many.
                    subscriber.unsent += 1
                    continue
                ring.write(frame, subscriber.unsent)
                retain(slot)
                subscriber.outstanding[seq] = (slot, generation)
                subscriber.unsent = 0
        finally:
            loan.close()
        return seq

    def pump(self) -> None:
        """Accept new subscribers, notice the ones that left; never blocks."""
        self._check_open()
        for fd, _ in self._poller.poll(0):
            if fd == self._listener_fd:
                self._accept_one()
                continue
            subscriber = self._by_fd.get(fd)
            if subscriber is not None:
                self._read_socket(subscriber)

    def _accept_one(self) -> None:
        # The listener is readable: a connection is waiting (more show up at the next poll).
        try:
            accepted = self._listener.accept(timeout=0)
        except BlobError:
            return  # gone meanwhile (Timeout), or a refused peer: the listener carries on
        self._welcome(accepted)

    def close(self, reason: str = "the publisher closed the stream") -> None:
        """Tell every subscriber the stream ended, then free the pool; closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        for subscriber in self._subscribers:
            try:
                subscriber.channel.send(UserPayload(data=encode(End(reason))), timeout=0)
            except BlobError:
                pass
            subscriber.channel.close()
            subscriber.ring.close()
        self._subscribers.clear()
        self._by_fd.clear()
        self._by_bell.clear()
        self._listener.close()
        self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _welcome(self, accepted: channel.Channel) -> None:
        pool = self._pool
        try:
            ring = PublisherRing(f"blobplane-stream:{pool.id}", pool.slots)
        except BaseException:
            accepted.close()
            raise
        hello = Hello(pool.id.uuid, pool.slot_size, pool.slots, self.policy, ring.entries)
        try:
            accepted.send(
                UserPayload(data=encode(hello)),
                (pool.control_fileno(), *ring.hello_fds()),
                timeout=0,
            )
            for first in range(0, pool.slots, MAX_FDS_PER_MESSAGE):
                fds = [
                    pool.slot_fileno(slot)
                    for slot in range(first, min(pool.slots, first + MAX_FDS_PER_MESSAGE))
                ]
                accepted.send(UserPayload(data=encode(Slots(first))), fds, timeout=self.timeout)
        except BlobError:
            accepted.close()
            ring.close()
            return
        ring.forget_fds()
        subscriber = _Subscriber(accepted, accepted.fileno(), ring)
        self._subscribers.append(subscriber)
        self._by_fd[subscriber.fd] = subscriber
        self._poller.register(subscriber.fd, select.POLLIN)
        self._waiter.register(subscriber.fd, select.POLLIN)
        self._waiter.register(ring.bell.fileno(), select.POLLIN)
        self._by_bell[ring.bell.fileno()] = subscriber

    def _read_socket(self, subscriber: _Subscriber) -> None:
        # A subscriber sends nothing after connecting: what comes is its hang-up,
        # or a message the protocol has no room for. Either way it leaves.
        try:
            message, fds = subscriber.channel.recv(timeout=0)
        except Timeout:
            return
        except BlobError:
            self._drop(subscriber)
            return
        for fd in fds:
            os.close(fd)
        del message
        self._drop(subscriber)

    def _collect(self) -> None:
        """Take in every release the subscribers marked since the last look (no syscall)."""
        for subscriber in self._subscribers:
            outstanding = subscriber.outstanding
            if not outstanding:
                continue
            marks = subscriber.ring.release_words
            for seq, held in list(outstanding.items()):
                if marks[RELEASED_WORD + held[0]] == held[1]:
                    del outstanding[seq]
                    self._give_back(held)

    def _may_overwrite(self, subscriber: _Subscriber, seq: int) -> bool:
        """Whether an unread ring entry may be reused (DROP_OLDEST only).

        It may once its frame was taken back: the subscriber would only skip
        it. If its frame is still live, take it back now unless someone is
        reading it: this subscriber is the slow one, and it must get the
        newest frames, not the oldest, as the policy promises.
        """
        if self.policy is not Backpressure.DROP_OLDEST:
            return False
        held = subscriber.outstanding.get(seq)
        return held is None or self._revoke(held)

    def _spin(self) -> bool:
        """Look for a release for up to `spin_ns` (see `ring.spin`); whether a slot came free."""
        collect, pool = self._collect, self._pool

        def freed() -> bool:
            collect()
            return pool.free_slots > 0

        return spin(freed, self.spin_ns)

    def _give_back(self, held: tuple[int, int] | None) -> None:
        # A hold on a slot that was since taken back (generation moved on) is void.
        if held is not None and self._pool.generation(held[0]) == held[1]:
            self._pool.release(held[0])

    def _drop(self, subscriber: _Subscriber) -> None:
        self._subscribers.remove(subscriber)
        del self._by_fd[subscriber.fd]
        self._poller.unregister(subscriber.fd)
        self._waiter.unregister(subscriber.fd)
        self._waiter.unregister(subscriber.ring.bell.fileno())
        del self._by_bell[subscriber.ring.bell.fileno()]
        subscriber.channel.close()
        subscriber.ring.close()
        for held in subscriber.outstanding.values():
            self._give_back(held)
        subscriber.outstanding.clear()

    def _revoke_oldest(self) -> bool:
        """Take back the slot of the oldest frame that no subscriber is reading now."""
        oldest: dict[tuple[int, int], int] = {}
        for subscriber in self._subscribers:
            for seq, held in subscriber.outstanding.items():
                oldest[held] = min(seq, oldest.get(held, seq))
        return any(self._revoke(held) for held in sorted(oldest, key=oldest.__getitem__))

    def _revoke(self, held: tuple[int, int]) -> bool:
        """Take back one frame from every subscriber, unless one of them is reading it."""
        slot, generation = held
        if self._pool.generation(slot) != generation or not self._pool.try_revoke(slot):
            return False
        for subscriber in self._subscribers:
            outstanding = subscriber.outstanding
            for seq in [seq for seq, other in outstanding.items() if other == held]:
                del outstanding[seq]
        return True

    def _wait(self, deadline: float | None, what: str) -> None:
        """Sleep until a connection, a hang-up or a release (or the deadline)."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise Timeout(
                f"{what}: nothing within the timeout"
                + (
                    f" (every one of the {self._pool.slots} slots is held by a subscriber)"
                    if "slot" in what
                    else ""
                )
            )
        # A bell may still hold wake-ups for releases collected already: then
        # this returns at once, the caller looks again and comes back to sleep.
        for fd, _ in self._waiter.poll(
            None if remaining is None else max(1, int(remaining * 1000))
        ):
            subscriber = self._by_bell.get(fd)
            if subscriber is not None and not answer_bell(subscriber.ring.bell):
                # It hung up its bell: it left, or broke it. Either way it would
                # keep poll() returning at once, so it goes now.
                self._drop(subscriber)

    def _check_open(self) -> None:
        if self._closed:
            raise BlobClosed("this Publisher is closed")


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout
