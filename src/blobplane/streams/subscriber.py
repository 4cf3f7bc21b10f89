"""Subscribers: frames received in order as read-only views into the publisher's slots.

`SubscriberCore` holds everything both flavours share (the slot mappings,
claims, generation checks, what to answer); `Subscriber` drives it over a
blocking channel and `AsyncSubscriber` over an asyncio one.

A receipt's view is valid until the receipt is closed: then the slot goes
back to the publisher, who will write the next frame into it. Copy what you
need to keep (numpy arrays made from the view share its memory).
"""

from __future__ import annotations

import os
import struct
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
    ConnectionClosed,
    RemoteProtocolError,
    SlotRewritten,
    StreamEnded,
)
from blobplane.slot_claims import claim_shared, unclaim
from blobplane.streams.protocol import Backpressure, End, Frame, Hello, Release, decode, encode
from blobplane.types import UnixFd
from blobplane.wire import Message, UserPayload

__all__ = ["AsyncReceipt", "AsyncSubscriber", "Receipt", "Subscriber", "SubscriberCore"]

_GENERATION = struct.Struct("<Q")


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


class SubscriberCore:
    """The I/O-free half of a subscriber: fed messages, it yields frames and releases."""

    def __init__(self, *, check: bool) -> None:
        self.check = check
        self.policy: Backpressure | None = None
        self.slot_size = 0
        self._control: MappedRead | None = None
        self._claims_fd = -1
        self._slots: dict[int, MappedRead] = {}
        self._missed = 0
        self._ended: StreamEnded | None = None

    def on_hello(self, message: Message, fds: tuple[int, ...]) -> None:
        """Take the stream's Hello and the control block fd that comes with it."""
        try:
            hello = self._decode(message)
            if not isinstance(hello, Hello) or len(fds) != 1:
                raise RemoteProtocolError(
                    "a stream starts with a Hello carrying the pool's control block"
                )
            self.policy = hello.policy
            self.slot_size = hello.slot_size
            self._control = map_descriptor(UnixFd(fds[0]), hello.slots * _GENERATION.size)
            if hello.policy is Backpressure.DROP_OLDEST:
                self._claims_fd = reopen_readonly(fds[0])
        finally:
            _close_fds(fds)

    def on_message(self, message: Message, fds: tuple[int, ...]) -> Frame | None:
        """A frame to hand to the user, or None (a frame taken back before we got to it)."""
        try:
            decoded = self._decode(message)
            if isinstance(decoded, End):
                raise self.end(decoded.reason or "the publisher closed the stream")
            if not isinstance(decoded, Frame):
                raise RemoteProtocolError(f"unexpected {type(decoded).__name__} in a stream")
            frame = decoded
            if fds:
                self._map_slot(frame, fds[0])
            elif frame.slot not in self._slots:
                raise RemoteProtocolError(f"frame {frame.seq} uses slot {frame.slot} unannounced")
        finally:
            _close_fds(fds)
        if frame.length > self.slot_size:
            raise RemoteProtocolError(f"frame {frame.seq} is longer than its slot")
        self._missed += frame.unsent
        if self._claims_fd >= 0:
            claim_shared(self._claims_fd, frame.slot)
            if self.generation(frame.slot) != frame.generation:
                unclaim(self._claims_fd, frame.slot)
                self._missed += 1
                return None
        return frame

    def view(self, frame: Frame) -> memoryview:
        with self._slots[frame.slot].as_slice() as whole:
            return whole[: frame.length]

    def take_missed(self) -> int:
        missed, self._missed = self._missed, 0
        return missed

    def finish(self, frame: Frame) -> bytes:
        """Let go of *frame*'s slot; return the Release to send. Checks it in check mode."""
        rewritten = self.check and self.generation(frame.slot) != frame.generation
        if self._claims_fd >= 0:
            unclaim(self._claims_fd, frame.slot)
        if rewritten:
            raise SlotRewritten(
                f"slot {frame.slot} was rewritten while frame {frame.seq} was being read: "
                "the producer reused a slot a reader held (a bug in the producer)"
            )
        return encode(Release(frame.seq))

    def generation(self, slot: int) -> int:
        if self._control is None:
            raise BlobClosed("the subscriber has no stream")
        with self._control.as_slice() as control:
            return int(_GENERATION.unpack_from(control, slot * _GENERATION.size)[0])

    def end(self, reason: str, cause: BaseException | None = None) -> StreamEnded:
        if self._ended is None:
            self._ended = StreamEnded(reason)
            self._ended.__cause__ = cause
        return self._ended

    @property
    def ended(self) -> StreamEnded | None:
        return self._ended

    def close(self) -> None:
        for mapped in self._slots.values():
            mapped.close()
        self._slots.clear()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._claims_fd >= 0:
            os.close(self._claims_fd)
            self._claims_fd = -1

    def _map_slot(self, frame: Frame, fd: int) -> None:
        if frame.slot in self._slots:
            raise RemoteProtocolError(f"slot {frame.slot} announced twice")
        if self._control is None or frame.slot * _GENERATION.size >= len(self._control):
            raise RemoteProtocolError(f"frame {frame.seq} names slot {frame.slot}, out of range")
        self._slots[frame.slot] = map_descriptor(UnixFd(fd), self.slot_size)

    @staticmethod
    def _decode(message: Message) -> Hello | Frame | Release | End:
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

    def _finish(self) -> bytes | None:
        if self._done:
            return None
        self._done = True
        try:
            self.view.release()
        except BufferError:
            pass  # arrays made from it live on; the docs say they must not be trusted
        return self._core.finish(self.frame)

    def __repr__(self) -> str:
        return f"<Receipt frame {self.seq}, {len(self.view)} bytes, missed {self.missed}>"


class Receipt(_ReceiptBase):
    """One received frame: `view` (read-only), `header`, `seq`, `missed`, `latency_s`.

    Close it (or leave its `with` block) as soon as you are done: that gives
    the slot back to the publisher.
    """

    __slots__ = ("_subscriber",)

    def __init__(self, subscriber: Subscriber, frame: Frame, missed: int) -> None:
        super().__init__(subscriber._core, frame, missed)
        self._subscriber = subscriber

    def close(self) -> None:
        release = self._finish()
        if release is not None:
            self._subscriber._send_release(release)

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
    """Receives a publisher's frames, in order, over a blocking channel."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check: bool = False,
        timeout: float | None = 30.0,
        allowed_uids: Container[int] | None = None,
    ) -> None:
        self._core = SubscriberCore(check=check)
        self._channel = sync_channel.connect(path, timeout=timeout, allowed_uids=allowed_uids)
        try:
            self._core.on_hello(*self._channel.recv())
        except BaseException:
            self.close()
            raise

    @property
    def policy(self) -> Backpressure | None:
        return self._core.policy

    def receive(self, timeout: float | None = None) -> Receipt:
        """The next frame, waiting up to *timeout* seconds (None: the channel's timeout).

        Raises `StreamEnded` when the publisher closed the stream or went away.
        """
        while True:
            if self._core.ended is not None:
                raise self._core.ended
            try:
                if timeout is None:
                    message, fds = self._channel.recv()
                else:
                    message, fds = self._channel.recv(timeout=timeout)
            except ConnectionClosed as exc:
                raise self._core.end("the publisher went away", exc) from exc
            frame = self._core.on_message(message, fds)
            if frame is not None:
                return Receipt(self, frame, self._core.take_missed())

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Receipt:
        try:
            return self.receive()
        except StreamEnded:
            raise StopIteration from None

    def _send_release(self, release: bytes) -> None:
        try:
            self._channel.send(UserPayload(data=release))
        except (ConnectionClosed, BlobClosed):
            pass  # the publisher is gone: nothing left to give back to

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

    __slots__ = ("_subscriber",)

    def __init__(self, subscriber: AsyncSubscriber, frame: Frame, missed: int) -> None:
        super().__init__(subscriber._core, frame, missed)
        self._subscriber = subscriber

    async def close(self) -> None:
        release = self._finish()
        if release is not None:
            await self._subscriber._send_release(release)

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
    """Receives frames over an asyncio channel; made by ``await AsyncSubscriber.connect()``."""

    def __init__(self, core: SubscriberCore, channel: aio.AsyncChannel) -> None:
        self._core = core
        self._channel = channel

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        check: bool = False,
        timeout: float | None = 30.0,
        allowed_uids: Container[int] | None = None,
    ) -> AsyncSubscriber:
        channel = await aio.connect(path, timeout=timeout, allowed_uids=allowed_uids)
        core = SubscriberCore(check=check)
        try:
            core.on_hello(*await channel.recv())
        except BaseException:
            channel.close()
            core.close()
            raise
        return cls(core, channel)

    @property
    def policy(self) -> Backpressure | None:
        return self._core.policy

    async def receive(self, timeout: float | None = None) -> AsyncReceipt:
        """The next frame; raises `StreamEnded` when the stream is over."""
        while True:
            if self._core.ended is not None:
                raise self._core.ended
            try:
                if timeout is None:
                    message, fds = await self._channel.recv()
                else:
                    message, fds = await self._channel.recv(timeout=timeout)
            except ConnectionClosed as exc:
                raise self._core.end("the publisher went away", exc) from exc
            frame = self._core.on_message(message, fds)
            if frame is not None:
                return AsyncReceipt(self, frame, self._core.take_missed())

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AsyncReceipt:
        try:
            return await self.receive()
        except StreamEnded:
            raise StopAsyncIteration from None

    async def _send_release(self, release: bytes) -> None:
        try:
            await self._channel.send(UserPayload(data=release))
        except (ConnectionClosed, BlobClosed):
            pass

    def close(self) -> None:
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
