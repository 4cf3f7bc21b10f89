"""`Publisher`: frames from a `BlobPool` to every subscriber connected at a socket path.

The publisher is single-threaded: it accepts subscribers and reads their
releases whenever it is called (`loan`, `publish`, `pump`), and waits in
poll() on all their sockets when it needs a free slot. A subscriber that
goes away (closed, killed) gives back every slot it held at the next call.
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
from blobplane.errors import BlobClosed, BlobError, InvalidSize, ProtocolError, Timeout
from blobplane.pool import BlobPool, PoolLoan
from blobplane.streams.protocol import Backpressure, End, Frame, Hello, Release, decode, encode
from blobplane.wire import UserPayload

__all__ = ["Publisher"]

# One Frame carries at most one fd, and the hello one: well inside the
# channel's per-message limit. Pools larger than this would need many fds
# per subscriber for little gain.
MAX_STREAM_SLOTS = 1024


@dataclass(eq=False)
class _Subscriber:
    channel: channel.Channel
    fd: int  # its socket's fd, registered in the publisher's poller
    known_slots: set[int] = field(default_factory=set)
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
    ) -> None:
        if slots > MAX_STREAM_SLOTS:
            raise InvalidSize(f"a stream pool has at most {MAX_STREAM_SLOTS} slots, not {slots}")
        self.policy = Backpressure(policy)
        self.timeout = timeout
        self._pool = BlobPool(slot_size, slots)
        try:
            self._listener = channel.listen(path, timeout=timeout, allowed_uids=allowed_uids)
        except BaseException:
            self._pool.close()
            raise
        self._subscribers: list[_Subscriber] = []
        self._by_fd: dict[int, _Subscriber] = {}
        # One poller for the publisher's life: pump() asks it which sockets have
        # something (a connection, releases, a hang-up) and touches only those.
        self._poller = select.poll()
        self._listener_fd = self._listener.fileno()
        self._poller.register(self._listener_fd, select.POLLIN)
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
            loan = self._pool.try_loan()
            if loan is not None:
                return loan
            if self.policy is Backpressure.DROP_OLDEST and self._revoke_oldest():
                continue
            self._wait(deadline, "waiting for a free slot")

    def publish(self, loan: PoolLoan, header: bytes = b"", *, length: int | None = None) -> int:
        """Send the loaned slot to every subscriber, close the loan, return the frame's number."""
        self._check_open()
        if loan.pool is not self._pool:
            raise BlobError("this loan belongs to another pool; loan() it from this publisher")
        if length is not None:
            loan.set_length(length)
        self._seq += 1
        seq = self._seq
        slot, generation = loan.slot, loan.generation
        slot_fd = loan.fileno()
        sent_ns = time.monotonic_ns()
        try:
            for subscriber in list(self._subscribers):
                fds = () if slot in subscriber.known_slots else (slot_fd,)
                frame = Frame(
                    seq, slot, generation, loan.length, sent_ns, subscriber.unsent, header
                )
                self._pool.retain(slot)
                try:
                    subscriber.channel.send(UserPayload(data=encode(frame)), fds, timeout=0)
                except Timeout:
                    # Its socket is full: it is far behind. Skip it; it hears how many.
                    self._pool.release(slot)
                    subscriber.unsent += 1
                    continue
                except BlobError:
                    self._pool.release(slot)
                    self._drop(subscriber)
                    continue
                subscriber.unsent = 0
                subscriber.known_slots.add(slot)
                subscriber.outstanding[seq] = (slot, generation)
        finally:
            loan.close()
        return seq

    def pump(self) -> None:
        """Accept new subscribers and take in every release that arrived; never blocks."""
        self._check_open()
        for fd, _ in self._poller.poll(0):
            if fd == self._listener_fd:
                self._accept_one()
                continue
            subscriber = self._by_fd.get(fd)
            if subscriber is not None:
                self._read_releases(subscriber)

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
        self._subscribers.clear()
        self._by_fd.clear()
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
        hello = Hello(self._pool.id.uuid, self._pool.slot_size, self._pool.slots, self.policy)
        try:
            accepted.send(
                UserPayload(data=encode(hello)), (self._pool.control_fileno(),), timeout=0
            )
        except BlobError:
            accepted.close()
            return
        subscriber = _Subscriber(accepted, accepted.fileno())
        self._subscribers.append(subscriber)
        self._by_fd[subscriber.fd] = subscriber
        self._poller.register(subscriber.fd, select.POLLIN)

    def _read_releases(self, subscriber: _Subscriber) -> None:
        while True:
            try:
                message, fds = subscriber.channel.recv(timeout=0)
            except Timeout:
                return
            except BlobError:
                self._drop(subscriber)
                return
            for fd in fds:
                os.close(fd)
            try:
                if not isinstance(message, UserPayload):
                    raise ProtocolError(f"a subscriber sent {type(message).__name__}")
                release = decode(message.data)
                if not isinstance(release, Release):
                    raise ProtocolError(f"a subscriber sent {type(release).__name__}")
            except ProtocolError:
                self._drop(subscriber)
                return
            self._give_back(subscriber.outstanding.pop(release.seq, None))

    def _give_back(self, held: tuple[int, int] | None) -> None:
        # A hold on a slot that was since taken back (generation moved on) is void.
        if held is not None and self._pool.generation(held[0]) == held[1]:
            self._pool.release(held[0])

    def _drop(self, subscriber: _Subscriber) -> None:
        self._subscribers.remove(subscriber)
        del self._by_fd[subscriber.fd]
        self._poller.unregister(subscriber.fd)
        subscriber.channel.close()
        for held in subscriber.outstanding.values():
            self._give_back(held)
        subscriber.outstanding.clear()

    def _revoke_oldest(self) -> bool:
        """Take back the slot of the oldest frame that no subscriber is reading now."""
        oldest: dict[tuple[int, int], int] = {}
        for subscriber in self._subscribers:
            for seq, held in subscriber.outstanding.items():
                oldest[held] = min(seq, oldest.get(held, seq))
        for slot, generation in sorted(oldest, key=oldest.__getitem__):
            if self._pool.generation(slot) != generation:
                continue
            if self._pool.try_revoke(slot):
                for subscriber in self._subscribers:
                    for seq in [
                        seq
                        for seq, held in subscriber.outstanding.items()
                        if held == (slot, generation)
                    ]:
                        del subscriber.outstanding[seq]
                return True
        return False

    def _wait(self, deadline: float | None, what: str) -> None:
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
        self._poller.poll(None if remaining is None else max(1, int(remaining * 1000)))

    def _check_open(self) -> None:
        if self._closed:
            raise BlobClosed("this Publisher is closed")


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout
