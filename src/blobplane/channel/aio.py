"""The asyncio flavour: the same operations, waiting with loop.add_reader / add_writer.

Use a channel from the event loop's thread only. Closing it (or a failure)
wakes every task waiting on it, which then raises `BlobClosed` (or the
failure). One task receives and one task sends at a time; a second gets
`BlobBusy` rather than a silent queue.
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from collections.abc import Callable, Container, Sequence
from types import TracebackType
from typing import Self, TypeVar

from blobplane.blobs import MappedRead, ProducerBlob
from blobplane.channel import ops
from blobplane.channel.base import (
    DEFAULT,
    ChannelBase,
    ListenerBase,
    TimeoutArg,
    as_message,
    channel_pair,
    connect_limit,
)
from blobplane.channel.core import DEFAULT_TIMEOUT, ChannelCore, Op, Wait
from blobplane.channel.ops import Handoff
from blobplane.channel.transport import Transport, adopt_fd
from blobplane.errors import BlobClosed, BlobError, Timeout
from blobplane.fds import close_fds
from blobplane.pool import BlobPool, PoolLoan
from blobplane.wire import MAX_FDS_PER_MESSAGE, MAX_FRAME_SIZE, Message, Received, UserPayload

__all__ = [
    "AsyncChannel",
    "AsyncListener",
    "ChannelReader",
    "connect",
    "from_socket",
    "listen",
    "socketpair",
]

T = TypeVar("T")

_BACKOFF_S = 0.002


class _Expired(Exception):
    """A wait reached the operation's deadline (turned into `Timeout` by `run`)."""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_Expired())


class _Waiter:
    __slots__ = ("fd", "future", "loop")

    def __init__(self, fd: int, future: asyncio.Future[None], loop: asyncio.AbstractEventLoop):
        self.fd = fd
        self.future = future
        self.loop = loop


class _Waits:
    """The readiness waits on one socket, so that closing can end them all.

    Readability is what a channel waits for all the time (a server's reader
    task waits for the next request as soon as it answered one), so its
    reader callback stays registered with the event loop from the first wait
    until the socket closes, instead of an add_reader/remove_reader pair (two
    epoll_ctl calls and a handle) per wait. Two rules keep that correct with
    the loop's level-triggered polling:

    - readiness that arrives while nobody waits pauses the callback (removed
      until the next wait), or the loop would report it on every iteration;
    - the report that follows a wake-up is most likely stale: the loop polled
      before the woken task read. It is ignored once; if the data is still
      there, the next poll reports it again, so nothing is lost.

    Writability is rarely waited for (only while the peer does not read): a
    writer is registered per wait.
    """

    __slots__ = ("_loop", "_readers", "_reading", "_skip", "_writers")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = -1  # the fd our reader callback is registered for, or -1
        self._readers: list[asyncio.Future[None]] = []
        self._skip = False
        self._writers: set[_Waiter] = set()

    async def wait(
        self, wait: Wait, fileno: Callable[[], int] | None, deadline: float | None
    ) -> None:
        """Wait for *wait* on the socket; raise `_Expired` at *deadline* (loop time)."""
        loop = asyncio.get_running_loop()
        if deadline is not None and loop.time() >= deadline:
            raise _Expired
        if wait is Wait.BACKOFF:
            pause = _BACKOFF_S if deadline is None else min(_BACKOFF_S, deadline - loop.time())
            await asyncio.sleep(max(0.0, pause))
            return
        fd = -1 if fileno is None else fileno()
        if fd < 0:
            return  # closed meanwhile: the operation's next step reports it
        future: asyncio.Future[None] = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _expire, future)
        if wait is Wait.READABLE:
            if self._reading != fd or self._loop is not loop:
                self._unwatch()
                loop.add_reader(fd, self._on_readable)
                self._loop, self._reading = loop, fd
            self._readers.append(future)
            try:
                await future
            finally:
                if timer is not None:
                    timer.cancel()
                # Woken by readiness, the future has left the list already.
                if self._readers and future in self._readers:
                    self._readers.remove(future)
            return
        loop.add_writer(fd, _wake, future)
        waiter = _Waiter(fd, future, loop)
        self._writers.add(waiter)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            # Unregister only if close() has not: the fd number may be reused by now.
            if waiter in self._writers:
                self._writers.discard(waiter)
                loop.remove_writer(fd)

    def _on_readable(self) -> None:
        if self._skip:
            self._skip = False  # most likely polled before the woken task read (see above)
            return
        readers = self._readers
        if readers:
            self._readers = []
            woke = False
            for future in readers:
                if not future.done():
                    future.set_result(None)
                    woke = True
            if woke:
                self._skip = True
                return
        self._unwatch()  # nobody waits: pause until somebody does

    def unwatch(self) -> None:
        """Take the reader callback off (a `ChannelReader` takes the fd over)."""
        self._unwatch()

    def _unwatch(self) -> None:
        fd, loop = self._reading, self._loop
        self._reading, self._skip = -1, False
        if fd >= 0 and loop is not None and not loop.is_closed():
            loop.remove_reader(fd)

    def end_all(self) -> None:
        """Unregister everything before the socket closes, and wake the waiting tasks."""
        self._unwatch()
        readers, self._readers = self._readers, []
        for future in readers:
            _wake(future)
        writers, self._writers = self._writers, set()
        for waiter in writers:
            if not waiter.loop.is_closed():
                waiter.loop.remove_writer(waiter.fd)
            _wake(waiter.future)


async def run(
    op: Op[T], fileno: Callable[[], int] | None, timeout: float | None, what: str, waits: _Waits
) -> T:
    """Drive *op* to its result, awaiting readiness of *fileno* while it waits.

    The clock starts at the first wait: what completes at once takes microseconds.
    """
    deadline = None
    try:
        while True:
            try:
                wait = op.send(None)
            except StopIteration as stop:
                result: T = stop.value
                return result
            if deadline is None and timeout is not None:
                deadline = asyncio.get_running_loop().time() + timeout
            await waits.wait(wait, fileno, deadline)
    except _Expired:
        raise Timeout(f"{what} did not complete within {timeout} s") from None
    finally:
        op.close()


class ChannelReader:
    """A channel's receive side handed to callbacks for good: see `AsyncChannel.read_forever`.

    Made by `read_forever`; use it from the loop's thread only.
    """

    __slots__ = (
        "_core",
        "_draining",
        "_ended",
        "_holding",
        "_loop",
        "_notified",
        "_on_error",
        "_on_message",
        "_paused",
        "_watching",
    )

    def __init__(
        self,
        core: ChannelCore,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[Message, tuple[int, ...]], object],
        on_error: Callable[[Exception], object],
    ) -> None:
        self._core = core
        self._loop = loop
        self._on_message = on_message
        self._on_error = on_error
        self._holding = True  # the caller acquired `core.receiving` for us
        self._ended = False
        self._notified = False
        self._paused = False
        self._watching = False
        self._draining = False
        core.add_release_hook(self._released)
        self._start()

    @property
    def active(self) -> bool:
        """Whether messages may still come (not ended by an error, a close or `stop`)."""
        return not self._ended

    @property
    def paused(self) -> bool:
        return self._paused

    def _start(self) -> None:
        self._loop.add_reader(self._core.fileno(), self._drain)
        self._watching = True
        # What the core already holds (put aside by `defer`, or bytes the wire
        # buffered) raises no readiness: look once without waiting for any.
        self._loop.call_soon(self._drain)

    def pause(self) -> None:
        """Deliver nothing more until `resume()`; the peer's sends back up in the socket.

        Cheap enough to call per message: the loop's callback stays registered
        and is only taken off if readiness comes while paused (or the loop
        would report it on every turn).
        """
        if not self._ended:
            self._paused = True

    def resume(self) -> None:
        """Deliver again, from the next turn of the loop on (never from inside this call)."""
        if self._ended or not self._paused:
            return
        self._paused = False
        if not self._watching:
            self._loop.add_reader(self._core.fileno(), self._drain)
            self._watching = True
        # Messages may sit in the core, where readiness does not report them.
        self._loop.call_soon(self._drain)

    def stop(self) -> None:
        """End reading without calling *on_error*; the channel stays open (`recv()` works)."""
        self._notified = True
        self._end()

    def _end(self) -> None:
        """Unregister and give the receive side back; idempotent."""
        self._ended = True
        if self._watching:
            self._watching = False
            fd = self._core.fileno()
            # A release hook runs before the socket closes, so fd is still ours.
            if fd >= 0 and not self._loop.is_closed():
                self._loop.remove_reader(fd)
        if self._holding:
            self._holding = False
            self._core.receiving.release()

    def _finish(self, error: Exception) -> None:
        self._end()
        if not self._notified:
            self._notified = True
            self._on_error(error)

    def _released(self) -> None:
        """The channel's release hook: it closed or failed (maybe inside `_drain`)."""
        if self._ended:
            return
        self._end()
        if self._draining:
            return  # `_drain` reports what poll_received raises, or `_closed_later` does
        if not self._loop.is_closed():
            self._loop.call_soon(self._closed_later)

    def _closed_later(self) -> None:
        if self._notified:
            return
        self._notified = True
        try:
            self._core.check_usable()
        except BlobError as exc:
            self._on_error(exc)
        else:  # released without a close or a failure: not expected, still an end
            self._on_error(BlobClosed("this channel is closed"))

    def _drain(self) -> None:
        if self._ended:
            return
        if self._paused:
            if self._watching:
                self._watching = False
                self._loop.remove_reader(self._core.fileno())
            return
        core = self._core
        on_message = self._on_message
        self._draining = True
        try:
            while True:
                try:
                    received = core.poll_received()
                except BlobError as exc:
                    self._finish(exc)
                    return
                if received is None:
                    return
                fds = received.fds
                try:
                    on_message(received.message, fds)
                except Exception as exc:
                    # A callback that broke the rule and closed one must not stop the end.
                    close_fds(fds)
                    self._finish(exc)
                    return
                except BaseException:
                    close_fds(fds)
                    self._notified = True
                    self._end()
                    raise
                if self._paused or self._ended:
                    break
        finally:
            self._draining = False
        if self._ended and not self._notified:
            # on_message closed the channel: report it as a close seen from outside.
            self._loop.call_soon(self._closed_later)


class AsyncChannel(ChannelBase):
    """An asyncio channel. Every call takes ``timeout=`` (seconds, None: forever);
    by default the channel's `timeout` attribute (30 s unless set)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        allowed_uids: Container[int] | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_fds: int = MAX_FDS_PER_MESSAGE,
    ) -> None:
        super().__init__(
            sock,
            timeout=timeout,
            allowed_uids=allowed_uids,
            max_frame_size=max_frame_size,
            max_fds=max_fds,
        )
        self._waits = _Waits()
        self._core.add_release_hook(self._waits.end_all)
        # The reader stays registered between calls: a channel dropped without
        # close() must unregister it before its socket closes and the fd number
        # is reused.
        weakref.finalize(self, self._waits.end_all).atexit = False

    async def send(
        self,
        message: Message | bytes | bytearray | memoryview,
        fds: Sequence[int] = (),
        *,
        timeout: TimeoutArg = DEFAULT,
    ) -> int:
        """Send a message (bytes travel as a `UserPayload`) with *fds*; return its request id.

        The fds are only borrowed: the caller still owns and closes them.
        """
        limit = self._timeout(timeout)
        built, validate = as_message(message)
        sent = ops.send(self._core, built, fds, validate=validate)
        return sent if isinstance(sent, int) else await self._run(sent, limit, "send")

    async def send_payload(
        self, data: bytes, fds: Sequence[int] = (), *, timeout: TimeoutArg = DEFAULT
    ) -> int:
        """Send *data* as a `UserPayload` with *fds* (borrowed); return its request id.

        What `try_send_payload` could not send at once, waiting for room.
        """
        limit = self._timeout(timeout)
        sent = ops.send(self._core, UserPayload(data=data), fds, validate=False)
        return sent if isinstance(sent, int) else await self._run(sent, limit, "send")

    async def recv(self, *, timeout: TimeoutArg = DEFAULT) -> tuple[Message, tuple[int, ...]]:
        """The next message of any kind and its fds; the caller owns (and closes) the fds."""
        limit = self._timeout(timeout)
        received = ops.receive(self._core)
        if not isinstance(received, Received):
            received = await self._run(received, limit, "recv")
        return received.message, received.fds

    def read_forever(
        self,
        on_message: Callable[[Message, tuple[int, ...]], object],
        on_error: Callable[[Exception], object],
    ) -> ChannelReader:
        """Hand every message from now on to *on_message*, from a callback of the loop.

        For a reader that receives for the channel's whole life (a server's
        connection, a client's replies): one reader callback drains what has
        arrived and calls ``on_message(message, fds)`` for each message
        synchronously, a loop turn and a task step per message fewer than
        awaiting `recv()` in a task. The receive side stays taken meanwhile
        (`recv()` raises `BlobBusy`) until it ends, which it does exactly once:

        - the peer hangs up, the channel fails (a protocol error) or closes:
          ``on_error(exc)`` with what `recv()` would have raised (for a close,
          `BlobClosed`, on a later turn of the loop);
        - *on_message* raises an `Exception`: ``on_error(that exception)``;
        - `ChannelReader.stop()`: no callback.

        *on_message* owns the fds once it returns; if it raises, the reader
        closes them, so it must not close or keep any of them and then raise.
        `ChannelReader.pause()` holds further messages back (for a reader that
        has to await something first), `resume()` lets them come again.
        Delivery starts on the loop's next turn.
        """
        core = self._core
        core.check_usable()
        loop = asyncio.get_running_loop()
        if not core.receiving.take():
            raise core.receiving.refused()
        try:
            self._waits.unwatch()  # the reader callback takes the fd over
            return ChannelReader(core, loop, on_message, on_error)
        except BaseException:
            core.receiving.release()
            raise

    async def send_blob(
        self,
        blob: ProducerBlob | PoolLoan,
        *,
        meta: bytes = b"",
        wait: bool = True,
        timeout: TimeoutArg = DEFAULT,
    ) -> int:
        """Hand a sealed memfd blob or a pool slot to the peer; return the handoff's request id.

        With *wait* (the default) it returns once the peer acknowledged it and
        raises `PeerRefused` if the peer refused it; without, the reply comes
        later through `recv()`. A pool slot is acknowledged when the peer
        releases it (closes its `MappedRead`), and stays held for the peer
        until then: close the loan whenever you like.
        """
        limit = self._timeout(timeout)
        sent = ops.send_blob(self._core, blob, meta, wait)
        return sent if isinstance(sent, int) else await self._run(sent, limit, "send_blob")

    async def send_bytes(
        self, data: object, *, sealed: bool = False, timeout: TimeoutArg = DEFAULT
    ) -> int:
        """`Channel.send_bytes`, awaited: *data* inside the message, in an `auto_pool` slot, or
        (*sealed*, or no room in the pool) in a fresh write-sealed memfd the peer maps first."""
        limit = self._timeout(timeout)
        sent = ops.send_bytes(self._core, data, sealed=sealed)
        return sent if isinstance(sent, int) else await self._run(sent, limit, "send_bytes")

    async def send_filled(
        self,
        size: int,
        write: Callable[[memoryview], None],
        *,
        sealed: bool = False,
        timeout: TimeoutArg = DEFAULT,
    ) -> int:
        """`Channel.send_filled`, awaited: *size* bytes laid out by *write(view)* in place."""
        limit = self._timeout(timeout)
        sent = ops.send_filled(self._core, size, write, sealed=sealed)
        return sent if isinstance(sent, int) else await self._run(sent, limit, "send_filled")

    async def loan(self, pool: BlobPool, *, timeout: TimeoutArg = DEFAULT) -> PoolLoan:
        """A free slot of *pool*, taking in the peer's releases while it waits for one.

        Use it instead of `pool.loan()` when the slots come back over this channel.
        """
        limit = self._timeout(timeout)
        loan = ops.loan_slot(self._core, pool)
        return loan if isinstance(loan, PoolLoan) else await self._run(loan, limit, "loan")

    async def recv_handoff(self, *, timeout: TimeoutArg = DEFAULT) -> Handoff:
        """The next blob with its token and metadata, mapped read-only and acknowledged."""
        limit = self._timeout(timeout)
        handoff = ops.receive_handoff(self._core)
        if isinstance(handoff, Handoff):
            return handoff
        return await self._run(handoff, limit, "recv_handoff")

    async def recv_bytes(self, *, timeout: TimeoutArg = DEFAULT) -> MappedRead:
        """What the peer's `send_bytes` sent: read-only, zero copy; close it when done."""
        limit = self._timeout(timeout)
        received = ops.receive_bytes(self._core)
        if isinstance(received, MappedRead):
            return received
        return await self._run(received, limit, "recv_bytes")

    async def recv_blob(self, *, timeout: TimeoutArg = DEFAULT) -> MappedRead:
        """The next blob, mapped read-only after the sealing checks, and acknowledged."""
        return (await self.recv_handoff(timeout=timeout)).blob

    async def _run(self, op: Op[T], timeout: float | None, what: str) -> T:
        return await run(op, self._core.fileno, timeout, what, self._waits)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncListener(ListenerBase):
    """A listening socket at `path` (mode 0600 in a private folder); `await accept()`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        transport: Transport | None = None,
        backlog: int = socket.SOMAXCONN,
        timeout: float | None = DEFAULT_TIMEOUT,
        allowed_uids: Container[int] | None = None,
    ) -> None:
        super().__init__(
            path, transport=transport, backlog=backlog, timeout=timeout, allowed_uids=allowed_uids
        )
        self._waits = _Waits()
        weakref.finalize(self, self._waits.end_all).atexit = False

    async def accept(self, *, timeout: TimeoutArg = None) -> AsyncChannel:
        """The next connection as a channel (with this listener's timeout and allowed uids).

        Waits until a client comes (*timeout* None, the default), as a server
        waits until told otherwise; a number of seconds gives up with `Timeout`.

        A peer of a refused uid is disconnected and `ForbiddenPeer` raised; the
        listener carries on.
        """
        sock = self._socket.sock
        if sock is None:
            raise BlobClosed(f"the listener at {self.path} is closed")
        limit = self._timeout(timeout)
        accepted = await run(ops.accept(sock), self._socket.fileno, limit, "accept", self._waits)
        return AsyncChannel(accepted, timeout=self.timeout, allowed_uids=self.allowed_uids)

    def close(self) -> None:
        """Stop listening and remove the socket file; a task in `accept()` gets `BlobClosed`."""
        self._waits.end_all()
        self._socket.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def listen(
    path: str | os.PathLike[str],
    *,
    transport: Transport | None = None,
    backlog: int = socket.SOMAXCONN,
    timeout: float | None = DEFAULT_TIMEOUT,
    allowed_uids: Container[int] | None = None,
) -> AsyncListener:
    """Listen at *path* (binding does not block, so this is not a coroutine)."""
    return AsyncListener(
        path, transport=transport, backlog=backlog, timeout=timeout, allowed_uids=allowed_uids
    )


async def connect(
    path: str | os.PathLike[str],
    *,
    transport: Transport | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    allowed_uids: Container[int] | None = None,
    wait: float = 0.0,
) -> AsyncChannel:
    """`channel.connect` for asyncio (*wait*: seconds to wait for the listener to appear)."""
    limit = connect_limit(timeout, wait)
    op = ops.connect(os.fspath(path), transport, wait=wait)
    sock = await run(op, None, limit, "connect", _Waits())
    return AsyncChannel(sock, timeout=timeout, allowed_uids=allowed_uids)


def socketpair(
    *, transport: Transport | None = None, timeout: float | None = DEFAULT_TIMEOUT
) -> tuple[AsyncChannel, AsyncChannel]:
    """Two connected asyncio channels."""
    return channel_pair(lambda sock: AsyncChannel(sock, timeout=timeout), transport)


def from_socket(
    sock: socket.socket | int,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    allowed_uids: Container[int] | None = None,
) -> AsyncChannel:
    """Wrap a connected AF_UNIX socket, or an fd of one (inherited from a parent); owns it."""
    if isinstance(sock, int):
        sock = adopt_fd(sock)
    return AsyncChannel(sock, timeout=timeout, allowed_uids=allowed_uids)
