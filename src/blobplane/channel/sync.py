"""The blocking flavour: runs the shared operations, waiting with poll()."""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import select
import socket
import time
from collections.abc import Callable, Container, Sequence
from stat import S_ISREG
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from blobplane.backends.checks import SIZE_SEALS, fully_allocated
from blobplane.blobs import MappedRead, ProducerBlob
from blobplane.channel import ops
from blobplane.channel.base import (
    DEFAULT,
    ChannelBase,
    ListenerBase,
    TimeoutArg,
    as_message,
    channel_pair,
    check_timeout,
)
from blobplane.channel.core import DEFAULT_TIMEOUT, Op, Wait
from blobplane.channel.ops import Handoff
from blobplane.channel.transport import Transport, adopt_fd
from blobplane.errors import BlobBusy, BlobClosed, ConnectionClosed, Timeout
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import BlobToken
from blobplane.wire import (
    MAX_FDS_PER_MESSAGE,
    MAX_FRAME_SIZE,
    Ack,
    BlobHandoff,
    Message,
    Received,
    UserPayload,
)
from blobplane.wire.messages import MAX_META

if TYPE_CHECKING:
    from blobplane.objects.allowlist import AllowList

__all__ = ["Channel", "Listener", "connect", "from_socket", "listen", "socketpair"]

T = TypeVar("T")

_BACKOFF_S = 0.002
# `recv_handoff`'s inline sealing checks read these as module globals, as `ops.map_sealed` does.
_fstat = os.fstat
_fully_allocated = fully_allocated
_fcntl = fcntl.fcntl
_F_GET_SEALS = fcntl.F_GET_SEALS
_SIZE_SEALS = SIZE_SEALS
_S_ISREG = S_ISREG
_mmap = mmap.mmap
_ACCESS_READ = mmap.ACCESS_READ
_EVENTS = {Wait.READABLE: select.POLLIN, Wait.WRITABLE: select.POLLOUT}


def run(op: Op[T], fileno: Callable[[], int] | None, timeout: float | None, what: str) -> T:
    """Drive *op* to its result, blocking in poll() on *fileno* while it waits."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return run_until(op, fileno, deadline, timeout, what)


def run_until(
    op: Op[T],
    fileno: Callable[[], int] | None,
    deadline: float | None,
    timeout: float | None,
    what: str,
) -> T:
    """`run` with the deadline of a call that began earlier (its fast lane went first)."""
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
    """Wait for *wait* on *fileno* (a general operation's wait; see `Channel._next` for reads)."""
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


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


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
        # A receive on a stream socket waits for readability (a datagram
        # socket's waits in recvmsg, see `_next`): one poll object for the
        # channel's life instead of one per wait. Used only by the holder of
        # `receiving` (a poll object must not be polled from two threads).
        self._readable = select.poll()
        self._readable.register(self._core.fileno(), select.POLLIN)

    # The operations below run `ops` through a fast lane first: the same steps
    # as the generators, called directly, for the common case (a datagram
    # socket, a message that goes out whole or is already there). Whenever a
    # step would wait, or anything is unusual, the rest runs as the generator
    # (`ops`), on the same deadline, so the rules stay written once.

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
        core = self._core
        busy = core.send_lock
        if not busy.acquire(False):  # `with core.sending`, inline
            raise BlobBusy(core.sending.message)
        try:
            if type(message) is bytes and not fds:
                # The usual small message, framed and sent in one step when
                # nothing is unusual (`ChannelCore.payload_now`).
                sent = core.payload_now(message)
                if sent is not None:
                    payload, frame, count = sent
                    if count != len(frame):  # the socket is full: wait for room
                        rest = ops.send_frame(core, payload, frame, (), count or 0)
                        run(rest, core.fileno, limit, "send")
                    return payload.id
            # A payload made here from bytes is valid by construction.
            validate = not isinstance(message, bytes | bytearray | memoryview)
            built = as_message(message)
            borrowed = tuple(fds)
            if not validate:  # its id now, under `sending` (cheaper than a replace later)
                built = UserPayload(id=core.wire.next_id(), data=built.data)  # type: ignore[union-attr]
            return self._transmit(
                built,
                borrowed,
                validate=validate,
                deadline=None,
                timeout=limit,
                what="send",
            )
        finally:
            busy.release()

    def _transmit(
        self,
        message: Message,
        fds: Sequence[int],
        *,
        validate: bool,
        deadline: float | None,
        timeout: float | None,
        what: str,
    ) -> int:
        """`ops.transmit_locked`, its first sendmsg tried at once (the caller holds `sending`).

        A *deadline* of None starts the clock only when the send has to wait
        (nothing else of the call has waited before).
        """
        core = self._core
        framed = core.frame_now(message, fds, validate=validate)
        if framed is None:
            op = ops.transmit_locked(core, message, fds, validate=validate)
            if deadline is None:
                deadline = _deadline(timeout)
            return run_until(op, core.fileno, deadline, timeout, what)
        message, data = framed
        try:
            sent = core.send_checked(data, fds)  # frame_now checked the channel
        except BaseException:
            core.interrupted_send(message, sent_any=False)
            raise
        if sent != len(data):  # the socket is full: wait for room
            rest = ops.send_frame(core, message, data, fds, sent or 0)
            if deadline is None:
                deadline = _deadline(timeout)
            run_until(rest, core.fileno, deadline, timeout, what)
        return message.id

    def _next(
        self, queued: bool, deadline: float | None, timeout: float | None, what: str
    ) -> Received:
        """The next message, waiting for it (the caller holds `receiving`).

        A datagram socket is waited on in recvmsg itself (`wait_received`),
        which returns with the message; a stream socket in poll().
        """
        core = self._core
        if not core.intact:
            core.check_usable()  # raises, as poll_received would
        received = None
        # With nothing queued for it, a datagram socket is read by the blocking
        # recvmsg alone, which returns at once if the message is there: a
        # non-blocking try first would mostly just raise BlockingIOError.
        if (queued and core.pending) or not core.can_wait_received:
            received = core.poll_received(queued=queued)
        while received is None:
            if core.can_wait_received:
                remaining = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        # Out of time: what has arrived may still be taken.
                        received = core.poll_received(queued=queued)
                        if received is None:
                            raise Timeout(f"{what} did not complete within {timeout} s")
                        break
                received = core.wait_received(remaining)
                if received is None:
                    received = core.poll_received(queued=queued)
            else:
                self._wait_readable(deadline, timeout, what)
                received = core.poll_received(queued=queued)
        return received

    def recv(self, *, timeout: TimeoutArg = DEFAULT) -> tuple[Message, tuple[int, ...]]:
        """The next message of any kind and its fds; the caller owns (and closes) the fds."""
        core = self._core
        limit = self._timeout(timeout)
        core.check_usable()
        busy = core.receive_lock
        if not busy.acquire(False):  # `with core.receiving`, inline
            raise BlobBusy(core.receiving.message)
        try:
            received = self._next(True, _deadline(limit), limit, "recv")
        finally:
            busy.release()
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
        core = self._core
        limit = self.timeout if timeout is DEFAULT else check_timeout(timeout)
        if type(blob) is not ProducerBlob:
            # A pool slot's bookkeeping (retain, pooled_out) lives in the generator.
            op = ops.send_blob(core, blob, meta, wait)
            return run(op, core.fileno, limit, "send_blob")
        # `ops.handoff_fd`'s checks as two plain tests: it raises their errors.
        # `blob.sendable` without the property's frame: (fd, token) of a live, sealed memfd blob.
        sendable = blob._state.sendable
        if sendable is None or len(meta) > MAX_META:
            ops.handoff_fd(blob, meta)  # raises
            raise AssertionError("a blob without `sendable` passed handoff_fd")  # pragma: no cover
        fd, token = sendable
        meta = bytes(meta)
        if wait:
            if not core.intact:
                core.check_usable()  # raises: closed or broken beats busy
            receiving = core.receive_lock
            if not receiving.acquire(False):  # `with core.receiving`, inline
                raise BlobBusy(core.receiving.message)
        try:
            sending = core.send_lock
            if not sending.acquire(False):  # `with core.sending`, inline
                raise BlobBusy(core.sending.message)
            try:
                # The id is taken under `sending`, so that no other send slips in between.
                sent = core.handoff_now(token, meta, fd)
                if sent is None or sent[2] != len(sent[1]):
                    request_id = self._send_handoff(sent, token, meta, fd, limit)
                else:
                    request_id = sent[0].id
                    if wait:  # while the peer works on it (`Connection.expect_ack`)
                        core.wire.expect_ack(request_id)
            finally:
                sending.release()
            if not wait:
                return request_id
            # The clock starts after the send: a send that had to wait for room
            # took from the same timeout, and one that did not took microseconds.
            deadline = None if limit is None else time.monotonic() + limit
            received: Received | None = None
            if core.datagram and core.intact and (limit is None or limit > 0):
                # Straight into the blocking recvmsg: the reply cannot be there
                # yet, and the peer may be waiting for this CPU (`_next` is
                # the same wait, after the checks this call made already).
                received = core.wait_received(limit)
            while True:
                if received is None:
                    received = self._next(False, deadline, limit, "send_blob")
                message = received.message
                if type(message) is Ack and message.reply_to == request_id:
                    return request_id  # the usual answer, without is_reply's match
                if ops.is_reply(core, received, request_id, blob):
                    return request_id
                received = None
        finally:
            if wait:
                receiving.release()

    def _send_handoff(
        self,
        sent: tuple[BlobHandoff, bytearray, int | None] | None,
        token: BlobToken,
        meta: bytes,
        fd: int,
        limit: float | None,
    ) -> int:
        """`send_blob`'s send where `handoff_now` declined (*sent* None) or sent only part."""
        core = self._core
        if sent is None:
            # Built from a live token and checked meta: valid already.
            handoff = BlobHandoff(id=core.wire.next_id(), token=token, meta=meta)
            op = ops.transmit_locked(core, handoff, (fd,), validate=False)
            return run(op, core.fileno, limit, "send_blob")
        handoff, frame, count = sent  # the socket is full: wait for room
        rest = ops.send_frame(core, handoff, frame, (fd,), count or 0)
        run(rest, core.fileno, limit, "send_blob")
        return handoff.id

    def _wait_readable(self, deadline: float | None, timeout: float | None, what: str) -> None:
        """`_block(Wait.READABLE, ...)` on the channel's own poll object (holding `receiving`).

        A channel closed meanwhile leaves its fd number registered: poll()
        then returns at once (POLLNVAL) and the receive that follows reports it.
        """
        if deadline is None:
            self._readable.poll(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{what} did not complete within {timeout} s")
        if not self._readable.poll(math.ceil(remaining * 1000)) and time.monotonic() >= deadline:
            raise Timeout(f"{what} did not complete within {timeout} s")

    def loan(self, pool: BlobPool, *, timeout: TimeoutArg = DEFAULT) -> PoolLoan:
        """A free slot of *pool*, taking in the peer's releases while it waits for one.

        Use it instead of `pool.loan()` when the slots come back over this channel.
        """
        op = ops.loan_slot(self._core, pool)
        return run(op, self._core.fileno, self._timeout(timeout), "loan")

    def recv_handoff(self, *, timeout: TimeoutArg = DEFAULT) -> Handoff:
        """The next blob with its token and metadata, mapped read-only and acknowledged."""
        core = self._core
        limit = self.timeout if timeout is DEFAULT else check_timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        if not core.intact:
            core.check_usable()  # raises: closed or broken beats busy
        if not core.receive_lock.acquire(False):  # `with core.receiving`, inline
            raise BlobBusy(core.receiving.message)
        try:
            received = None
            if core.datagram and not core.pending and (limit is None or limit > 0):
                core.wire.prepare_ack()  # while nothing has come (`Connection.prepare_ack`)
                received = core.wait_received(limit)  # `_next`'s wait, its checks made above
            if received is None:
                received = self._next(True, deadline, limit, "recv_handoff")
            handoff = received.message
            if type(handoff) is not BlobHandoff or handoff.slot is not None:
                return self._take_handoff(received, deadline, limit)
            # A plain blob: map it if it passes the sealing checks as one
            # predicate, acknowledge at once, and leave the rest (closing the
            # fd, the handles) until the Ack is out. Anything else takes
            # `_take_handoff`, whose full checks say precisely what is wrong.
            fd = received.fds[0]  # the wire checked: a memfd handoff has exactly one
            size = handoff.token.size
            # `ops.map_sealed`, inline (a frame fewer before the Ack): seals before
            # size, a regular file of at least *size* (> 0) bytes; any doubt or
            # OSError takes `_take_handoff`, which checks again and says why.
            try:
                if (
                    size
                    and _fcntl(fd, _F_GET_SEALS) & _SIZE_SEALS == _SIZE_SEALS
                    and _S_ISREG((info := _fstat(fd)).st_mode)
                    and info.st_size >= size
                    and (core.allow_sparse or _fully_allocated(fd, info))
                ):
                    mapped = _mmap(fd, size, access=_ACCESS_READ)
                else:
                    mapped = None
            except (OSError, ValueError, OverflowError):
                mapped = None
            if mapped is None:
                return self._take_handoff(received, deadline, limit)
            try:
                sending = core.send_lock
                if not sending.acquire(False):  # `with core.sending`, inline
                    raise BlobBusy(core.sending.message)
                try:
                    sent = core.ack_now(handoff.id)
                    if sent is None or sent[2] != len(sent[1]):
                        self._send_ack(sent, handoff.id, deadline, limit)
                finally:
                    sending.release()
            except ConnectionClosed:
                pass  # the sender is gone; a mapped blob stays valid (see ops.receive_handoff)
            except BaseException:
                mapped.close()
                raise
            finally:
                os.close(fd)
        finally:
            core.receive_lock.release()
        return Handoff(handoff.token, handoff.meta, MappedRead(mapped, size), handoff.id)

    def _send_ack(
        self,
        sent: tuple[Ack, bytearray, int | None] | None,
        reply_to: int,
        deadline: float | None,
        limit: float | None,
    ) -> None:
        """`recv_handoff`'s Ack where `ack_now` declined (*sent* None) or sent only part."""
        core = self._core
        if sent is None:
            ack = Ack(id=core.wire.next_id(), reply_to=reply_to)
            op = ops.transmit_locked(core, ack, (), validate=False)
            run_until(op, core.fileno, deadline, limit, "recv_handoff")
        else:  # the socket is full: wait for room
            ack, frame, count = sent
            rest = ops.send_frame(core, ack, frame, (), count or 0)
            run_until(rest, core.fileno, deadline, limit, "recv_handoff")

    def _take_handoff(
        self, received: Received, deadline: float | None, limit: float | None
    ) -> Handoff:
        """`recv_handoff` for anything but a plain blob that passed the fast checks."""
        op = ops.settle_handoff(self._core, received)
        return run_until(op, self._core.fileno, deadline, limit, "recv_handoff")

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
