"""The blocking flavour: runs the shared operations, waiting with poll() or in recvmsg."""

from __future__ import annotations

import math
import os
import select
import socket
import time
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
from blobplane.errors import BlobClosed, Timeout
from blobplane.pool import BlobPool, PoolLoan
from blobplane.wire import MAX_FDS_PER_MESSAGE, MAX_FRAME_SIZE, Message, Received, UserPayload

__all__ = ["Channel", "Listener", "connect", "from_socket", "listen", "socketpair"]

T = TypeVar("T")

_BACKOFF_S = 0.002
_EVENTS = {Wait.READABLE: select.POLLIN, Wait.WRITABLE: select.POLLOUT}


class _Waits:
    """The waits of the operations on one socket: poll(), or a back-off sleep.

    On a channel's datagram socket (*core*), a wait for readability is a
    blocking recvmsg instead (`ChannelCore.wait_received`): woken with the
    message, one syscall. Readability is waited for by the holder of
    `receiving` only, so one poll object serves the channel's life.
    """

    def __init__(self, fileno: Callable[[], int] | None, core: ChannelCore | None = None) -> None:
        self._fileno = fileno
        self._reader = core if core is not None and core.read_in_waits() else None
        self._readable: select.poll | None = None

    def wait(self, wait: Wait, until: float) -> bool:
        """Wait for *wait* until *until* (`time.monotonic()`, math.inf: forever).

        False if that time has passed and nothing came. It may return early:
        the operation tries again and waits once more.
        """
        remaining = None if until == math.inf else until - time.monotonic()
        if self._reader is not None and wait is Wait.READABLE:
            if remaining is not None and remaining <= 0:
                return self._reader.wait_received(0)  # what has arrived is still taken
            self._reader.wait_received(remaining)
            return True
        if remaining is not None and remaining <= 0:
            return False
        if wait is Wait.BACKOFF:
            time.sleep(_BACKOFF_S if remaining is None else min(_BACKOFF_S, remaining))
            return True
        fd = -1 if self._fileno is None else self._fileno()
        if fd < 0:
            return True  # closed meanwhile: the operation's next step reports it
        if wait is Wait.READABLE:
            if self._readable is None:
                self._readable = select.poll()
                # A channel closed meanwhile leaves its fd registered: poll() then
                # returns at once (POLLNVAL) and the next step reports it.
                self._readable.register(fd, select.POLLIN)
            poller = self._readable
        else:
            poller = select.poll()
            poller.register(fd, _EVENTS[wait])
        ready = poller.poll(None if remaining is None else math.ceil(remaining * 1000))
        return bool(ready) or time.monotonic() < until


def deadline(timeout: float | None) -> float:
    """The `time.monotonic()` at which *timeout* (seconds, None: never) runs out."""
    return math.inf if timeout is None else time.monotonic() + timeout


def run(op: Op[T], waits: _Waits, until: float, timeout: float | None, what: str) -> T:
    """Drive *op* to its result by *until* (see `deadline`), blocking in *waits* while it waits.

    *timeout* is what the caller asked for, for the error's message.
    """
    try:
        while True:
            try:
                wait = op.send(None)
            except StopIteration as stop:
                result: T = stop.value
                return result
            if not waits.wait(wait, until):
                raise Timeout(f"{what} did not complete within {timeout} s")
    finally:
        op.close()


class Channel(ChannelBase):
    """A blocking channel. Every call takes ``timeout=`` (seconds, None: forever);
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
        self._waits = _Waits(self._core.fileno, self._core)

    def send(
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
        if isinstance(sent, int):
            return sent
        return run(sent, self._waits, deadline(limit), limit, "send")

    def send_payload(
        self, data: bytes, fds: Sequence[int] = (), *, timeout: TimeoutArg = DEFAULT
    ) -> int:
        """Send *data* as a `UserPayload` with *fds* (borrowed); return its request id."""
        limit = self._timeout(timeout)
        sent = ops.send(self._core, UserPayload(data=data), fds, validate=False)
        if isinstance(sent, int):
            return sent
        return run(sent, self._waits, deadline(limit), limit, "send")

    def recv(self, *, timeout: TimeoutArg = DEFAULT) -> tuple[Message, tuple[int, ...]]:
        """The next message of any kind and its fds; the caller owns (and closes) the fds."""
        limit = self._timeout(timeout)
        until = deadline(limit)
        received = ops.receive(self._core, until)
        if not isinstance(received, Received):
            received = run(received, self._waits, until, limit, "recv")
        return received.message, received.fds

    def send_blob(
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
        until = deadline(limit)
        sent = ops.send_blob(self._core, blob, meta, wait, until)
        if isinstance(sent, int):
            return sent
        return run(sent, self._waits, until, limit, "send_blob")

    def send_bytes(
        self, data: object, *, sealed: bool = False, timeout: TimeoutArg = DEFAULT
    ) -> int:
        """Send *data* (any buffer) for the peer's `recv_bytes`; return its request id.

        Up to 64 KiB (`payload_limit`) it rides inside the message. Larger,
        it is copied into a slot of the channel's `auto_pool` and the call
        returns once it is sent; with *sealed* (or no room in the pool), into
        a fresh memfd sealed against every write, and the call returns once
        the peer mapped it.
        """
        limit = self._timeout(timeout)
        until = deadline(limit)
        sent = ops.send_bytes(self._core, data, until, sealed=sealed)
        if isinstance(sent, int):
            return sent
        return run(sent, self._waits, until, limit, "send_bytes")

    def send_filled(
        self,
        size: int,
        write: Callable[[memoryview], None],
        *,
        sealed: bool = False,
        timeout: TimeoutArg = DEFAULT,
    ) -> int:
        """`send_bytes` of *size* bytes that *write(view)* lays out in the memory they travel in.

        For a producer that builds its bytes in place (`send_obj` does):
        nothing is copied twice.
        """
        limit = self._timeout(timeout)
        until = deadline(limit)
        sent = ops.send_filled(self._core, size, write, until, sealed=sealed)
        if isinstance(sent, int):
            return sent
        return run(sent, self._waits, until, limit, "send_filled")

    def loan(self, pool: BlobPool, *, timeout: TimeoutArg = DEFAULT) -> PoolLoan:
        """A free slot of *pool*, taking in the peer's releases while it waits for one.

        Use it instead of `pool.loan()` when the slots come back over this channel.
        """
        limit = self._timeout(timeout)
        loan = ops.loan_slot(self._core, pool)
        if isinstance(loan, PoolLoan):
            return loan
        return run(loan, self._waits, deadline(limit), limit, "loan")

    def recv_handoff(self, *, timeout: TimeoutArg = DEFAULT) -> Handoff:
        """The next blob with its token and metadata, mapped read-only and acknowledged."""
        limit = self._timeout(timeout)
        until = deadline(limit)
        handoff = ops.receive_handoff(self._core, until)
        if isinstance(handoff, Handoff):
            return handoff
        return run(handoff, self._waits, until, limit, "recv_handoff")

    def recv_bytes(self, *, timeout: TimeoutArg = DEFAULT) -> MappedRead:
        """What the peer's `send_bytes` sent: read-only, zero copy; close it when done."""
        limit = self._timeout(timeout)
        until = deadline(limit)
        received = ops.receive_bytes(self._core, until)
        if isinstance(received, MappedRead):
            return received
        return run(received, self._waits, until, limit, "recv_bytes")

    def recv_blob(self, *, timeout: TimeoutArg = DEFAULT) -> MappedRead:
        """The next blob, mapped read-only after the sealing checks, and acknowledged."""
        return self.recv_handoff(timeout=timeout).blob

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Listener(ListenerBase):
    """A listening socket at `path` (mode 0600 in a private folder); `accept()` gives channels."""

    def accept(self, *, timeout: TimeoutArg = None) -> Channel:
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
        op = ops.accept(sock)
        accepted = run(op, _Waits(self._socket.fileno), deadline(limit), limit, "accept")
        return Channel(accepted, timeout=self.timeout, allowed_uids=self.allowed_uids)

    def close(self) -> None:
        """Stop listening and remove the socket file; closing twice is fine."""
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
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
) -> Listener:
    """Listen at *path*; its folder is created private (0700) if missing, and must be private."""
    return Listener(
        path, transport=transport, backlog=backlog, timeout=timeout, allowed_uids=allowed_uids
    )


def connect(
    path: str | os.PathLike[str],
    *,
    transport: Transport | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    allowed_uids: Container[int] | None = None,
    wait: float = 0.0,
) -> Channel:
    """Connect to the listener at *path* (SEQPACKET, or STREAM if that is what listens).

    *wait*: seconds to wait for a listener that is not there yet (default: none,
    `ConnectionRefused` at once).
    """
    limit = connect_limit(timeout, wait)
    op = ops.connect(os.fspath(path), transport, wait=wait)
    sock = run(op, _Waits(None), deadline(limit), limit, "connect")
    return Channel(sock, timeout=timeout, allowed_uids=allowed_uids)


def socketpair(
    *, transport: Transport | None = None, timeout: float | None = DEFAULT_TIMEOUT
) -> tuple[Channel, Channel]:
    """Two connected channels, e.g. to hand one end to a child process (see `from_socket`)."""
    return channel_pair(lambda sock: Channel(sock, timeout=timeout), transport)


def from_socket(
    sock: socket.socket | int,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    allowed_uids: Container[int] | None = None,
) -> Channel:
    """Wrap a connected AF_UNIX socket, or an fd of one (inherited from a parent); owns it."""
    if isinstance(sock, int):
        sock = adopt_fd(sock)
    return Channel(sock, timeout=timeout, allowed_uids=allowed_uids)
