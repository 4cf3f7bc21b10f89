"""Subscribers: frames received in order as read-only views into the publisher's slots.

`SubscriberCore` holds everything both flavours share (the slot mappings,
the ring, claims, generation checks); `Subscriber` waits for it in poll()
and `AsyncSubscriber` in the event loop. Either waits on two things: the
ring's bell and the channel socket, so that a publisher that closes or dies
ends the stream even while no frame comes.

A receipt's view is valid until the receipt is closed: then the slot goes
back to the publisher, who will write the next frame into it. Copy what you
need to keep (numpy arrays made from the view share its memory).
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from collections.abc import Container
from types import TracebackType
from typing import Self

from blobplane.backends.memfd import reopen_readonly
from blobplane.blobs import MappedRead, map_descriptor
from blobplane.channel import aio
from blobplane.channel import sync as sync_channel
from blobplane.errors import (
    BlobClosed,
    BlobError,
    ConnectionClosed,
    RemoteProtocolError,
    SlotRewritten,
    StreamEnded,
    Timeout,
)
from blobplane.fds import close_fds
from blobplane.pool import GENERATION_SIZE
from blobplane.slot_claims import try_claim_shared, unclaim
from blobplane.streams.protocol import (
    HELLO_FDS,
    Backpressure,
    End,
    Frame,
    Hello,
    Slots,
    StreamMessage,
    decode,
)
from blobplane.streams.ring import (
    SubscriberRing,
    answer_bell,
    require_ordered_memory,
    spin_ns_of,
)
from blobplane.types import UnixFd
from blobplane.wire import Message, UserPayload

__all__ = ["AsyncReceipt", "AsyncSubscriber", "Receipt", "Subscriber", "SubscriberCore"]


class SubscriberCore:
    """The I/O-free half of a subscriber: fed the channel's messages, it reads the ring."""

    def __init__(self, *, check: bool) -> None:
        require_ordered_memory()
        self.check = check
        self.policy: Backpressure | None = None
        self.slot_size = 0
        self.slots = 0
        self._control: MappedRead | None = None
        # Whole u64 loads (see `pool`): a byte-wise read could mix two generations.
        self._generations: memoryview | None = None
        self._claims_fd = -1
        self._slots: list[MappedRead] = []
        self._ring: SubscriberRing | None = None
        self._missed = 0
        self._ended: StreamEnded | None = None
        self._broken = False

    @property
    def ready(self) -> bool:
        """Whether every slot is mapped (the stream's setup is over)."""
        return self._ring is not None and len(self._slots) == self.slots

    @property
    def bell_fd(self) -> int:
        """The bell to wait on for frames."""
        if self._ring is None or self._ring.bell is None:
            raise BlobClosed("the subscriber has no stream")
        return self._ring.bell.fileno()

    def answer_bell(self) -> bool:
        """Drain the bell; False once the publisher hung it up (stop watching it then)."""
        ring = self._ring
        return ring is not None and ring.bell is not None and answer_bell(ring.bell)

    def on_setup(self, message: Message, fds: tuple[int, ...]) -> None:
        """Take Hello (the ring, the control block) and then the Slots messages that follow."""
        try:
            decoded = self._decode(message)
            if self._ring is None:
                if not isinstance(decoded, Hello) or len(fds) != HELLO_FDS:
                    raise RemoteProtocolError(
                        f"a stream starts with a Hello carrying {HELLO_FDS} fds"
                    )
                self._on_hello(decoded, fds)
            elif not isinstance(decoded, Slots) or decoded.first != len(self._slots):
                raise RemoteProtocolError(
                    f"expected the fds of slots from {len(self._slots)} on, "
                    f"got {type(decoded).__name__}"
                )
            elif not fds or len(self._slots) + len(fds) > self.slots:
                raise RemoteProtocolError(
                    f"{len(fds)} more slot fds for a pool of {self.slots} with "
                    f"{len(self._slots)} known"
                )
            else:
                for fd in fds:
                    self._slots.append(map_descriptor(UnixFd(fd), self.slot_size))
        finally:
            close_fds(fds)

    def _on_hello(self, hello: Hello, fds: tuple[int, ...]) -> None:
        self.policy = hello.policy
        self.slot_size = hello.slot_size
        self.slots = hello.slots
        self._control = map_descriptor(UnixFd(fds[0]), hello.slots * GENERATION_SIZE)
        self._generations = self._control.as_slice().cast("Q")
        if hello.policy is Backpressure.DROP_OLDEST:
            self._claims_fd = reopen_readonly(fds[0])
        self._ring = SubscriberRing(
            fds[1:],
            hello.ring_entries,
            hello.slots,
            hello.slot_size,
            overwrites=hello.policy is Backpressure.DROP_OLDEST,
        )

    def on_message(self, message: Message, fds: tuple[int, ...]) -> None:
        """A message on the channel once set up: only End may come."""
        close_fds(fds)
        decoded = self._decode(message)
        if isinstance(decoded, End):
            self.end(decoded.reason or "the publisher closed the stream")
            return
        raise RemoteProtocolError(f"unexpected {type(decoded).__name__} in a stream")

    def pending(self) -> bool:
        return self._ring is not None and self._ring.pending()

    def spin(self, spin_ns: int) -> bool:
        """Watch the ring for up to *spin_ns*; whether a frame (or an overwrite) came."""
        return self._ring is not None and not self._broken and self._ring.spin(spin_ns)

    def take(self) -> Frame | None:
        """The next frame to hand to the user, or None when there is none now.

        A bad ring entry ends the stream (`RemoteProtocolError`, then
        `StreamEnded` on later calls): the publisher is broken.
        """
        ring = self._ring
        if ring is None or self._broken:
            return None
        while True:
            try:
                frame, lost = ring.take()
            except RemoteProtocolError as exc:
                self._broken = True
                self.end(f"the publisher broke the stream: {exc}", exc)
                raise
            self._missed += lost
            if frame is None:
                return None
            self._missed += frame.unsent
            if self._claims_fd >= 0:
                # DROP_OLDEST: a frame being taken back (claim refused) or taken
                # back before we got to it (generation moved on) is missed, and
                # never released by us.
                if not try_claim_shared(self._claims_fd, frame.slot):
                    self._missed += 1
                    continue
                if self.generation(frame.slot) != frame.generation:
                    unclaim(self._claims_fd, frame.slot)
                    self._missed += 1
                    continue
            return frame

    def view(self, frame: Frame) -> memoryview:
        with self._slots[frame.slot].as_slice() as whole:
            return whole[: frame.length]

    def take_missed(self) -> int:
        missed, self._missed = self._missed, 0
        return missed

    def finish(self, frame: Frame) -> None:
        """Let go of *frame*'s slot: the publisher sees the release. Checks it in check mode."""
        if self._ring is None:
            return  # the subscriber left: the publisher took every frame back at the hang-up
        rewritten = self.check and self.generation(frame.slot) != frame.generation
        if self._claims_fd >= 0:
            unclaim(self._claims_fd, frame.slot)
        if rewritten:
            raise SlotRewritten(
                f"slot {frame.slot} was rewritten while frame {frame.seq} was being read: "
                "the producer reused a slot a reader held (a bug in the producer)"
            )
        self._ring.mark_released(frame.slot, frame.generation)

    def generation(self, slot: int) -> int:
        if self._generations is None:
            raise BlobClosed("the subscriber has no stream")
        return self._generations[slot]

    def end(self, reason: str, cause: BaseException | None = None) -> StreamEnded:
        if self._ended is None:
            self._ended = StreamEnded(reason)
            self._ended.__cause__ = cause
        return self._ended

    @property
    def ended(self) -> StreamEnded | None:
        return self._ended

    def close(self) -> None:
        for mapped in self._slots:
            mapped.close()
        self._slots.clear()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._generations is not None:
            self._generations.release()
            self._generations = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._claims_fd >= 0:
            os.close(self._claims_fd)
            self._claims_fd = -1

    @staticmethod
    def _decode(message: Message) -> StreamMessage:
        if not isinstance(message, UserPayload):
            raise RemoteProtocolError(f"unexpected {type(message).__name__} in a stream")
        return decode(message.data)


class _ReceiptBase:
    __slots__ = ("_core", "_done", "frame", "missed", "received_ns", "view")

    def __init__(self, core: SubscriberCore, frame: Frame, missed: int) -> None:
        self._core = core
        self.frame = frame
        self.missed = missed
        self.received_ns = time.monotonic_ns()
        self.view = core.view(frame)
        self._done = False

    @property
    def seq(self) -> int:
        return self.frame.seq

    @property
    def header(self) -> bytes:
        return self.frame.header

    @property
    def latency_s(self) -> float:
        """Seconds from `publish()` to `receive()` returning (both clocks are CLOCK_MONOTONIC)."""
        return (self.received_ns - self.frame.sent_ns) / 1e9

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.view.release()
        except BufferError:
            pass  # arrays made from it live on; the docs say they must not be trusted
        self._core.finish(self.frame)

    def __repr__(self) -> str:
        return f"<Receipt frame {self.seq}, {len(self.view)} bytes, missed {self.missed}>"


class Receipt(_ReceiptBase):
    """One received frame: `view` (read-only), `header`, `seq`, `missed`, `latency_s`.

    Close it (or leave its `with` block) as soon as you are done: that gives
    the slot back to the publisher.
    """

    __slots__ = ()

    def close(self) -> None:
        self._finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Subscriber:
    """Receives a publisher's frames, in order, over a blocking channel.

    ``spin_us``: before sleeping in poll() for the next frame, look at the
    ring this many microseconds. Off by default: waking a process asleep on
    another CPU costs ~30 µs on a VM, which a short spin saves when the
    publisher and each subscriber have a CPU of their own; with fewer free
    CPUs than spinning processes the spin only takes the CPU the publisher
    needs to write the frame, and costs latency instead. Past the first 5 µs
    the spinner yields its CPU at every look at the clock, so that a
    publisher waiting for that CPU gets it.

    ``wait``: seconds to wait for a publisher that is not listening yet
    (default: `ConnectionRefused` at once). ``timeout`` bounds connecting and
    the stream's setup; `receive` waits for frames as long as the stream lasts.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check: bool = False,
        timeout: float | None = 30.0,
        allowed_uids: Container[int] | None = None,
        spin_us: float = 0.0,
        wait: float = 0.0,
    ) -> None:
        self.timeout = timeout
        self.spin_ns = spin_ns_of(spin_us)
        self._core = SubscriberCore(check=check)
        self._channel = sync_channel.connect(
            path, timeout=timeout, allowed_uids=allowed_uids, wait=wait
        )
        try:
            while not self._core.ready:
                self._core.on_setup(*self._channel.recv())
            self._poller = select.poll()
            self._bell_fd = self._core.bell_fd
            self._poller.register(self._bell_fd, select.POLLIN)
            self._poller.register(self._channel.fileno(), select.POLLIN)
        except BaseException:
            self.close()
            raise

    @property
    def policy(self) -> Backpressure | None:
        return self._core.policy

    def receive(self, timeout: float | None = None) -> Receipt:
        """The next frame, waiting up to *timeout* seconds (None: as long as the stream lasts).

        A subscriber waits for frames as a server waits for clients: until told
        otherwise. (The subscriber's own `timeout` bounds connecting only.)

        Raises `StreamEnded` when the publisher closed the stream or went away
        (after every frame it published before that).
        """
        core = self._core
        frame = core.take()
        if frame is not None:
            return Receipt(core, frame, core.take_missed())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if core.ended is not None:
                raise core.ended
            if self.spin_ns and core.spin(self.spin_ns):
                frame = core.take()
                if frame is not None:
                    return Receipt(core, frame, core.take_missed())
                # An entry being rewritten (DROP_OLDEST): sleep until its bell.
            self._wait(deadline)
            frame = core.take()
            if frame is not None:
                return Receipt(core, frame, core.take_missed())

    def _wait(self, deadline: float | None) -> None:
        """Sleep until the bell or the channel has something (or the deadline)."""
        if deadline is None:
            timeout_ms = None
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout("receive: no frame within the timeout")
            timeout_ms = max(1, int(remaining * 1000))
        # The bell may still hold wake-ups for frames already taken: then poll()
        # returns at once, receive() finds nothing and comes back here to sleep.
        for fd, _ in self._poller.poll(timeout_ms):
            if fd != self._bell_fd:
                self._read_channel()
            elif not self._core.answer_bell():
                # Hung up (the publisher closed or died, which the channel says
                # too): watched any longer, it would wake every poll() at once.
                self._poller.unregister(fd)

    def _read_channel(self) -> None:
        try:
            message, fds = self._channel.recv(timeout=0)
        except Timeout:
            return
        except (ConnectionClosed, BlobClosed) as exc:
            self._core.end("the publisher went away", exc)
            return
        except BlobError as exc:
            self._core.end(f"the stream's channel failed: {exc}", exc)
            raise
        try:
            self._core.on_message(message, fds)
        except RemoteProtocolError as exc:
            self._core.end(f"the publisher broke the stream: {exc}", exc)
            raise

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Receipt:
        try:
            return self.receive()
        except StreamEnded:
            raise StopIteration from None

    def close(self) -> None:
        """Leave the stream; every frame still held is given back when the publisher notices."""
        self._channel.close()
        self._core.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncReceipt(_ReceiptBase):
    """A frame received by an `AsyncSubscriber`; ``await receipt.close()`` or ``async with``."""

    __slots__ = ()

    async def close(self) -> None:
        self._finish()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncSubscriber:
    """Receives frames in an event loop; made by ``await AsyncSubscriber.connect()``.

    The loop watches the ring's bell (a reader callback) and the
    channel (one `recv` task for the stream's life, which only End or the
    publisher's hang-up completes). ``spin_us`` is `Subscriber`'s; the spin
    runs in the event loop's thread, which it holds for up to that long.
    """

    def __init__(
        self,
        core: SubscriberCore,
        channel: aio.AsyncChannel,
        timeout: float | None = 30.0,
        *,
        spin_us: float = 0.0,
    ) -> None:
        self.spin_ns = spin_ns_of(spin_us)
        self._core = core
        self._channel = channel
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._bell_fd = core.bell_fd
        self._loop.add_reader(self._bell_fd, self._on_bell)
        self._watch: asyncio.Task[tuple[Message, tuple[int, ...]]] | None = None
        self._watch = self._loop.create_task(self._channel.recv(timeout=None))
        self._watch.add_done_callback(self._on_channel)

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        check: bool = False,
        timeout: float | None = 30.0,
        allowed_uids: Container[int] | None = None,
        spin_us: float = 0.0,
        wait: float = 0.0,
    ) -> AsyncSubscriber:
        spin_ns_of(spin_us)  # refused before connecting
        channel = await aio.connect(path, timeout=timeout, allowed_uids=allowed_uids, wait=wait)
        core = SubscriberCore(check=check)
        try:
            while not core.ready:
                core.on_setup(*await channel.recv())
        except BaseException:
            channel.close()
            core.close()
            raise
        return cls(core, channel, timeout, spin_us=spin_us)

    @property
    def policy(self) -> Backpressure | None:
        return self._core.policy

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_bell(self) -> None:
        if not self._core.answer_bell():
            # Hung up: the channel's watch ends the stream; stop hearing it ring.
            self._loop.remove_reader(self._bell_fd)
        self._wake()

    def _on_channel(self, task: asyncio.Task[tuple[Message, tuple[int, ...]]]) -> None:
        core = self._core
        if task.cancelled():
            core.end("the subscriber closed")
        elif (exc := task.exception()) is not None:
            if isinstance(exc, ConnectionClosed | BlobClosed):
                core.end("the publisher went away", exc)
            else:
                core.end(f"the stream's channel failed: {exc}", exc)
        else:
            try:
                core.on_message(*task.result())
            except RemoteProtocolError as protocol_error:
                core.end(f"the publisher broke the stream: {protocol_error}", protocol_error)
        self._wake()

    async def receive(self, timeout: float | None = None) -> AsyncReceipt:
        """The next frame, waiting up to *timeout* s (None: as long as the stream lasts).

        Raises `StreamEnded` when the stream is over.
        """
        core = self._core
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            frame = core.take()
            if frame is not None:
                return AsyncReceipt(core, frame, core.take_missed())
            if core.ended is not None:
                raise core.ended
            if self.spin_ns and core.spin(self.spin_ns):
                continue  # a frame came (or an entry is being rewritten: take() says which)
            # No await between the look at the ring and here: a frame published
            # since makes the bell readable, and _on_bell runs once we wait.
            self._waiter = waiter = self._loop.create_future()
            try:
                if deadline is None:
                    await waiter
                else:
                    remaining = deadline - self._loop.time()
                    if remaining <= 0:
                        raise Timeout("receive: no frame within the timeout")
                    await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise Timeout("receive: no frame within the timeout") from None
            finally:
                self._waiter = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AsyncReceipt:
        try:
            return await self.receive()
        except StreamEnded:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if self._bell_fd >= 0:
            self._loop.remove_reader(self._bell_fd)
            self._bell_fd = -1
        if self._watch is not None:
            self._watch.remove_done_callback(self._on_channel)
            self._watch.cancel()
            self._watch = None
        self._channel.close()
        self._core.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
