"""The blocking flavour: runs the shared operations, waiting with poll()."""

from __future__ import annotations

import math
import os
import select
import socket
import time
from collections.abc import Callable, Container, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from blobplane.blobs import MappedRead, ProducerBlob
from blobplane.channel import ops
from blobplane.channel.base import (
    DEFAULT,
    ChannelBase,
    ListenerBase,
    TimeoutArg,
    as_message,
    check_timeout,
)
from blobplane.channel.core import DEFAULT_TIMEOUT, Op, Wait
from blobplane.channel.ops import Handoff
from blobplane.channel.transport import Transport, adopt_fd, default_transport, socket_pair
from blobplane.errors import BlobClosed, Timeout
from blobplane.pool import BlobPool, PoolLoan
from blobplane.wire import Message

if TYPE_CHECKING:
    from blobplane.objects.allowlist import AllowList

__all__ = ["Channel", "Listener", "connect", "from_socket", "listen", "socketpair"]

T = TypeVar("T")

_BACKOFF_S = 0.002
_EVENTS = {Wait.READABLE: select.POLLIN, Wait.WRITABLE: select.POLLOUT}


def run(op: Op[T], fileno: Callable[[], int] | None, timeout: float | None, what: str) -> T:
    """Drive *op* to its result, blocking in poll() on *fileno* while it waits."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                wait = op.send(None)
            except StopIteration as stop:
                result: T = stop.value
                return result
            _block(wait, fileno, deadline, timeout, what)
    finally:
        op.close()


def _block(
    wait: Wait,
    fileno: Callable[[], int] | None,
    deadline: float | None,
    timeout: float | None,
    what: str,
) -> None:
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise Timeout(f"{what} did not complete within {timeout} s")
    if wait is Wait.BACKOFF:
        time.sleep(_BACKOFF_S if remaining is None else min(_BACKOFF_S, remaining))
        return
    fd = -1 if fileno is None else fileno()
    if fd < 0:
        return  # closed meanwhile: the operation's next step reports it
    poller = select.poll()
    poller.register(fd, _EVENTS[wait])
    ready = poller.poll(None if remaining is None else math.ceil(remaining * 1000))
    if not ready and deadline is not None and time.monotonic() >= deadline:
        raise Timeout(f"{what} did not complete within {timeout} s")


class Channel(ChannelBase):
    """A blocking channel. Every call takes ``timeout=`` (seconds, None: forever);
    by default the channel's `timeout` attribute (30 s unless set)."""

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
        op = ops.transmit(self._core, as_message(message), tuple(fds))
        return run(op, self._core.fileno, self._timeout(timeout), "send")

    def recv(self, *, timeout: TimeoutArg = DEFAULT) -> tuple[Message, tuple[int, ...]]:
        """The next message of any kind and its fds; the caller owns (and closes) the fds."""
        return run(ops.receive(self._core), self._core.fileno, self._timeout(timeout), "recv")

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
        op = ops.send_blob(self._core, blob, meta, wait)
        return run(op, self._core.fileno, self._timeout(timeout), "send_blob")

    def loan(self, pool: BlobPool, *, timeout: TimeoutArg = DEFAULT) -> PoolLoan:
        """A free slot of *pool*, taking in the peer's releases while it waits for one.

        Use it instead of `pool.loan()` when the slots come back over this channel.
        """
        op = ops.loan_slot(self._core, pool)
        return run(op, self._core.fileno, self._timeout(timeout), "loan")

    def recv_handoff(self, *, timeout: TimeoutArg = DEFAULT) -> Handoff:
        """The next blob with its token and metadata, mapped read-only and acknowledged."""
        op = ops.receive_handoff(self._core)
        return run(op, self._core.fileno, self._timeout(timeout), "recv_handoff")

    def recv_blob(self, *, timeout: TimeoutArg = DEFAULT) -> MappedRead:
        """The next blob, mapped read-only after the sealing checks, and acknowledged."""
        return self.recv_handoff(timeout=timeout).blob

    def send_obj(
        self, obj: object, *, pool: BlobPool | None = None, timeout: TimeoutArg = DEFAULT
    ) -> None:
        """Send any picklable object, its large buffers through shared memory.

        See `blobplane.objects`: a fresh blob, or a slot of *pool*.
        """
        # blobplane.objects sits above the channel layer: imported when used.
        from blobplane.objects.transfer import send_obj

        send_obj(self, obj, pool=pool, timeout=self._timeout(timeout))

    def recv_obj(
        self, *, restricted: bool | AllowList = False, timeout: TimeoutArg = DEFAULT
    ) -> Any:
        """The next object sent with `send_obj`; its arrays are read-only views of the blob."""
        from blobplane.objects.transfer import recv_obj

        return recv_obj(self, restricted=restricted, timeout=self._timeout(timeout))

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

    def accept(self, *, timeout: TimeoutArg = DEFAULT) -> Channel:
        """The next connection as a channel (with this listener's timeout and allowed uids).

        A peer of a refused uid is disconnected and `ForbiddenPeer` raised; the
        listener carries on.
        """
        sock = self._socket.sock
        if sock is None:
            raise BlobClosed(f"the listener at {self.path} is closed")
        limit = self._timeout(timeout)
        accepted = run(ops.accept(sock), self._socket.fileno, limit, "accept")
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
) -> Channel:
    """Connect to the listener at *path* (SEQPACKET, or STREAM if that is what listens)."""
    limit = check_timeout(timeout)
    sock = run(ops.connect(os.fspath(path), transport), None, limit, "connect")
    return Channel(sock, timeout=timeout, allowed_uids=allowed_uids)


def socketpair(
    *, transport: Transport | None = None, timeout: float | None = DEFAULT_TIMEOUT
) -> tuple[Channel, Channel]:
    """Two connected channels, e.g. to hand one end to a child process (see `from_socket`)."""
    left, right = socket_pair(transport or default_transport())
    try:
        first = Channel(left, timeout=timeout)
    except BaseException:
        right.close()
        raise
    return first, Channel(right, timeout=timeout)


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
