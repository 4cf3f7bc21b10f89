"""The shared heart of both channel flavours: one non-blocking socket driving one `Connection`.

Nothing here blocks. Each method either makes progress or says it would
block; the operations in `ops` turn that into "wait until readable or
writable", and the sync and asyncio drivers only implement the waiting.

Failure rules, in one place:

- `close()` (ours): every later call raises `BlobClosed`.
- The peer went away (end of stream, ECONNRESET, or the end of stream in
  the middle of a frame): `ConnectionClosed`, sticky. A send that meets
  EPIPE raises `ConnectionClosed` for every later send only: what the peer
  sent before it left is still read, up to the end of stream.
- The peer broke the protocol: `RemoteProtocolError`, sticky; the peer gets
  an `ErrorReply` saying why (best effort) and the socket is closed.
- The kernel dropped fds that came with a message (MSG_CTRUNC, usually the
  fd limit): `TooManyOpenFiles`, sticky, since that message cannot be
  completed.
- A stream-mode send interrupted half way (timeout, cancellation): the
  stream is out of step, `BrokenResource`, sticky.

A sticky failure releases the socket and every fd at once; the object stays
until `close()` so that the error keeps being reported.
"""

from __future__ import annotations

import array
import enum
import errno
import functools
import math
import os
import resource
import socket
import struct
import threading
import weakref
from collections import deque
from collections.abc import Callable, Container, Generator, Sequence
from typing import NoReturn, TypeVar

import msgspec

from blobplane.channel.slot_cache import SlotCache
from blobplane.channel.transport import (
    PeerCredentials,
    check_peer,
    framing_of,
    peer_credentials,
)
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    BlobError,
    BrokenResource,
    ConnectionClosed,
    RemoteProtocolError,
    TooManyOpenFiles,
    os_errors,
)
from blobplane.pool import BlobPool
from blobplane.types import BlobToken
from blobplane.wire import (
    MAX_FDS_PER_MESSAGE,
    MAX_FRAME_SIZE,
    NEED_DATA,
    Ack,
    BlobHandoff,
    Connection,
    ErrorCode,
    ErrorReply,
    Event,
    Message,
    PeerClosed,
    Received,
    UserPayload,
)
from blobplane.wire.messages import MAX_ERROR_TEXT

__all__ = ["DEFAULT_TIMEOUT", "ChannelCore", "Op", "Wait"]

T = TypeVar("T")

# Seconds a blocking call waits unless told otherwise (None: forever).
DEFAULT_TIMEOUT = 30.0
# Messages that may pile up unread while send_blob() waits for its reply.
MAX_QUEUED = 1024
_STREAM_CHUNK = 64 * 1024
# Plain ints: the socket module's flags are IntFlag members, slow on the hot path.
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_CUT = _MSG_TRUNC | _MSG_CTRUNC  # (recvmsg also reports MSG_CMSG_CLOEXEC back in its flags)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
# Every call but `wait_received` passes MSG_DONTWAIT: a datagram socket's fd
# is in blocking mode (see `ChannelCore`), a stream socket's is not.
_NOSIGNAL = int(socket.MSG_NOSIGNAL) | _MSG_DONTWAIT
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC) | _MSG_DONTWAIT
_TIMEVAL = struct.Struct("@ll")
_REPLIES = (Ack, ErrorReply)
_FD = struct.Struct("i")
_FD_SIZE = _FD.size
_FD_UNPACK = _FD.unpack
_DISCONNECTED = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED}


class Wait(enum.Enum):
    """What an operation waits for before its next step."""

    READABLE = "readable"
    WRITABLE = "writable"
    BACKOFF = "backoff"  # no readiness to wait for (a full listen backlog): retry shortly


Op = Generator[Wait, None, T]


def _fds_from(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    if len(ancillary) == 1:
        # The usual case, one SCM_RIGHTS entry with one fd (a handoff).
        level, kind, data = ancillary[0]
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS and len(data) == _FD.size:
            return [_FD.unpack(data)[0]]
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    return fds


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _fd_exhaustion() -> TooManyOpenFiles:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        now = f"{len(os.listdir('/proc/self/fd'))} open now"
    except OSError:
        now = "the count of open fds is unknown"
    return TooManyOpenFiles(
        "the kernel dropped fds that came with a message (MSG_CTRUNC): this process is "
        f"probably at its limit of open files (RLIMIT_NOFILE soft limit {soft}, hard limit "
        f"{hard}, {now}). Close received blobs sooner (each open MappedRead holds an fd) "
        "or raise the limit (ulimit -n); the channel is closed, as that message lost its fds"
    )


def _release(sock: socket.socket, wire: Connection, unread: deque[Received]) -> None:
    # Shared by close() and the finalizer, so it must not refer to the core.
    sock.close()
    wire.close()
    while unread:
        _close_all(unread.popleft().fds)


class Busy:
    """`with busy:` marks a use in progress; a second, concurrent one raises `BlobBusy`.

    Trio's rule: concurrent misuse is an error, never a silent queue.
    """

    __slots__ = ("lock", "message")

    def __init__(self, message: str) -> None:
        # Public for the sync driver's fast lane, which acquires it inline
        # (`lock.acquire(False)`, else `BlobBusy(message)`): cheaper than `with`.
        self.lock = threading.Lock()
        self.message = message

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise BlobBusy(self.message)

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()

    def try_enter(self) -> bool:
        """Enter if nobody is inside; never waits and never raises."""
        return self.lock.acquire(blocking=False)


class ChannelCore:
    """Socket, wire connection, unread messages, busy flags and the sticky failure.

    Takes ownership of *sock* at once: if the peer is refused (`ForbiddenPeer`)
    or the socket is unfit, it is closed before the error propagates.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        allowed_uids: Container[int] | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_fds: int = MAX_FDS_PER_MESSAGE,
    ) -> None:
        try:
            framing = framing_of(sock)
            self.peer: PeerCredentials = peer_credentials(sock)
            check_peer(self.peer, allowed_uids)
            # A datagram socket's fd blocks, so that the sync driver can wait in
            # recvmsg itself (`wait_received`): woken with the datagram, one
            # syscall, instead of poll() and then recvmsg. Every other call
            # passes MSG_DONTWAIT. A stream socket's fd does not block.
            sock.setblocking(framing == "datagram")
            self.wire = Connection(framing, max_frame_size=max_frame_size, max_fds=max_fds)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.framing = framing
        self._datagram = framing == "datagram"
        self.datagram = self._datagram  # read-only for the drivers: `wait_received` applies
        self._fd = sock.fileno()
        self._buffer_size = max_frame_size if framing == "datagram" else _STREAM_CHUNK
        # One slot more than allowed, to tell "too many fds" from "the kernel dropped some".
        self._fd_capacity = max_fds + 1
        self._ancillary_size = socket.CMSG_SPACE(self._fd_capacity * array.array("i").itemsize)
        self._receive_timeout: float | None = None  # SO_RCVTIMEO as set, None: none
        self._unread: deque[Received] = deque()
        # Read-only for the drivers: whether anything waits in it (`defer`, `unread`).
        self.pending = self._unread
        self.receiving = Busy(
            "another task or thread is already receiving on this channel; receive from one "
            "task at a time (recv, recv_blob, and send_blob while it awaits its reply)"
        )
        self.sending = Busy(
            "another task or thread is already sending on this channel and waiting for room; "
            "send from one task at a time (recv_blob sends its acknowledgement too)"
        )
        # Their locks, for the sync driver's fast lanes: one hop fewer, on every call.
        self.receive_lock = self.receiving.lock
        self.send_lock = self.sending.lock
        self._closed = False
        self._failure: BlobError | None = None
        # Neither closed nor failed: one attribute for the fast lanes to read
        # (`check_usable()` says why not).
        self.intact = True
        # The peer stopped reading (EPIPE): what it sent before may still be read.
        self._send_failure: BlobError | None = None
        self._eof_fed = False
        self._release_hooks: list[Callable[[], None]] = []
        # Pooled handoffs: slots we sent and hold until the peer's reply, and
        # the slots we received, mapped once each, with the replies owed for them.
        self.pooled_out: dict[int, tuple[BlobPool, int]] = {}
        self.slot_cache = SlotCache()
        # Whether handed-over memfds may have unallocated pages (`checks.check_allocated`).
        self.allow_sparse = False
        self._owed: deque[Message] = deque()
        self._owed_rest = memoryview(b"")
        self._finalizer = weakref.finalize(self, _release, sock, self.wire, self._unread)

    # -- state -------------------------------------------------------------------

    @functools.cached_property
    def _view(self) -> memoryview:
        # Made on the first receive, then an ordinary instance attribute (so receiving
        # pays nothing for the laziness): a server holds one channel per connection,
        # and a connection never heard from costs no buffer.
        return memoryview(bytearray(self._buffer_size))

    def fileno(self) -> int:
        return -1 if self._released else self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failure(self) -> BlobError | None:
        return self._failure

    @property
    def _released(self) -> bool:
        return not self._finalizer.alive

    def check_usable(self) -> None:
        if self._closed:
            raise BlobClosed("this channel is closed")
        if self._failure is not None:
            _raise_again(self._failure)

    def check_can_send(self) -> None:
        self.check_usable()
        if self._send_failure is not None:
            _raise_again(self._send_failure)

    def add_release_hook(self, hook: Callable[[], None]) -> None:
        """Call *hook* just before the socket closes (drivers unregister their waits)."""
        self._release_hooks.append(hook)

    def close(self) -> None:
        self._closed = True
        self.intact = False
        self._release_now()

    def fail(self, error: BlobError) -> BlobError:
        """Make *error* the sticky failure (the first one wins) and release everything."""
        if self._failure is None and not self._closed:
            self._failure = error
        self.intact = False
        self._release_now()
        return error

    def _release_now(self) -> None:
        if self._released:
            return
        hooks, self._release_hooks = self._release_hooks, []
        for hook in hooks:
            hook()
        self._finalizer()
        self.slot_cache.close()
        self._owed.clear()
        # No reply can come any more: the slots we lent are ours again.
        pooled, self.pooled_out = self.pooled_out, {}
        for pool, slot in pooled.values():
            _give_back(pool, slot)

    # -- receiving ---------------------------------------------------------------

    def poll_received(self, *, queued: bool = True) -> Received | None:
        """The next message, or None if it has not arrived yet. Never blocks.

        With *queued* False, skip the messages put aside by `defer()` (a
        reply being awaited is always newer than them).
        """
        if self._closed or self._failure is not None:
            self.check_usable()
        if queued and self._unread:
            return self._unread.popleft()
        wire = self.wire
        while True:
            event: Event = NEED_DATA
            if self._datagram:
                # Read first, without asking the wire whether it holds anything:
                # with datagrams it holds nothing between calls (each one read
                # is handed out at once), and a datagram read behind anything it
                # did hold would be queued after it (`receive_datagram`). The
                # usual datagram (neither cut short nor empty) goes straight
                # through the wire's fast lane: `_pump` inline, since a cold
                # path pays for every frame it enters.
                try:
                    size, ancillary, flags, _ = self.sock.recvmsg_into(
                        [self._view], self._ancillary_size, _RECV_FLAGS
                    )
                except (BlockingIOError, InterruptedError):
                    if not wire.has_buffered:
                        return None
                except OSError as exc:
                    raise self._os_failure(exc, "receiving") from exc
                else:
                    if size and not flags & _CUT:
                        try:
                            event = wire.receive_datagram(
                                self._view[:size], _fds_from(ancillary) if ancillary else []
                            )
                        except RemoteProtocolError as exc:
                            raise self._protocol_failure(exc) from None
                    else:
                        event = self._received_event(size, ancillary, flags)
            if event is NEED_DATA:
                if wire.has_buffered:
                    try:
                        event = wire.next_event()
                    except RemoteProtocolError as exc:
                        raise self._protocol_failure(exc) from None
                if event is NEED_DATA:
                    if self._datagram:
                        return None
                    # A stream: feed what the socket has, then ask the wire again.
                    pumped = self._pump()
                    if pumped is None:
                        return None
                    event = pumped
            if type(event) is Received:
                if self.pooled_out and type(event.message) in _REPLIES:
                    lent = self.pooled_out.pop(event.message.reply_to, None)  # type: ignore[union-attr]
                    if lent is not None:
                        _give_back(*lent)
                return event
            if type(event) is PeerClosed:
                raise self.fail(ConnectionClosed("the peer closed the channel"))

    @property
    def can_wait_received(self) -> bool:
        """Whether `wait_received` may be used: a datagram socket, nothing held by the wire."""
        return self._datagram and not self.wire.has_buffered

    def wait_received(self, timeout: float | None) -> Received | None:
        """Block in recvmsg for up to *timeout* (> 0) seconds, None: forever; None if nothing came.

        The one call here that blocks: the sync driver's wait, for a datagram
        socket (`can_wait_received`), once `poll_received` found nothing; the
        caller holds `receiving`. The kernel's SO_RCVTIMEO bounds the wait.
        It is set again only when it would end the wait more than a
        millisecond late, or before half of *timeout*: a wait that ends early
        returns None and the caller waits again for what remains. (A signal
        whose handler returns restarts the wait, as for a blocking socket.)
        What arrives goes through the same steps as in `poll_received`.
        While the channel is `intact`, a datagram wire holds nothing between
        calls (see `poll_received`): a driver that checked `datagram` and
        `intact` may call this without asking `can_wait_received`.
        """
        current = self._receive_timeout
        if (
            timeout is None or current is None or not timeout * 0.5 <= current <= timeout + 0.001
        ) and timeout != current:
            seconds = 0.0 if timeout is None else max(timeout, 1e-6)  # 0 would wait forever
            whole = int(seconds)
            micros = math.ceil((seconds - whole) * 1_000_000)
            if micros == 1_000_000:  # a hair under a whole second: the kernel says EDOM
                whole, micros = whole + 1, 0
            try:
                self.sock.setsockopt(_SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micros))
            except OSError as exc:
                raise self._os_failure(exc, "receiving") from exc
            self._receive_timeout = timeout
        try:
            size, ancillary, flags, _ = self.sock.recvmsg_into(
                [self._view], self._ancillary_size, _MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return None  # the time is up
        except OSError as exc:
            raise self._os_failure(exc, "receiving") from exc
        if size and not flags & _CUT:
            try:
                fds: list[int] = []
                if ancillary:
                    # `_fds_from`'s usual case inline (a handoff: one entry, one fd).
                    if len(ancillary) == 1:
                        level, kind, data = ancillary[0]
                        if level == _SOL_SOCKET and kind == _SCM_RIGHTS and len(data) == _FD_SIZE:
                            fds = [_FD_UNPACK(data)[0]]
                        else:
                            fds = _fds_from(ancillary)
                    else:
                        fds = _fds_from(ancillary)
                event = self.wire.receive_datagram(self._view[:size], fds)
            except RemoteProtocolError as exc:
                raise self._protocol_failure(exc) from None
        else:
            event = self._received_event(size, ancillary, flags)
        if type(event) is Received:
            if self.pooled_out and type(event.message) in _REPLIES:
                lent = self.pooled_out.pop(event.message.reply_to, None)  # type: ignore[union-attr]
                if lent is not None:
                    _give_back(*lent)
            return event
        if type(event) is PeerClosed:
            raise self.fail(ConnectionClosed("the peer closed the channel"))
        return None

    def _protocol_failure(self, exc: RemoteProtocolError) -> BlobError:
        if self._eof_fed:
            return self.fail(
                ConnectionClosed(f"the peer went away in the middle of a message: {exc}")
            )
        self._farewell(exc)
        return self.fail(exc)

    def defer(self, received: Received) -> None:
        """Keep *received* for a later `recv()` (it arrived while a reply was awaited)."""
        if len(self._unread) >= MAX_QUEUED:
            _close_all(received.fds)
            error = RemoteProtocolError(
                f"the peer sent more than {MAX_QUEUED} messages while this side waited "
                "for the reply to a handoff"
            )
            self._farewell(error)
            raise self.fail(error)
        self._unread.append(received)

    def unread(self, received: Received) -> None:
        """Put *received* back in front: the next receive returns it again."""
        self._unread.appendleft(received)

    def _pump(self) -> Event | None:
        """One non-blocking recvmsg into the wire: what it made of it, None if nothing came.

        A datagram goes through the wire's fast lane and comes back as its
        event; stream bytes are fed, and NEED_DATA says to ask the wire.
        """
        try:
            size, ancillary, flags, _ = self.sock.recvmsg_into(
                [self._view], self._ancillary_size, _RECV_FLAGS
            )
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise self._os_failure(exc, "receiving") from exc
        return self._received_event(size, ancillary, flags)

    def _received_event(
        self, size: int, ancillary: list[tuple[int, int, bytes]], flags: int
    ) -> Event:
        """What the wire makes of what one recvmsg returned (in `_view`)."""
        fds = _fds_from(ancillary) if ancillary else []
        if flags & _MSG_CTRUNC and len(fds) < self._fd_capacity:
            _close_all(fds)
            raise self.fail(_fd_exhaustion())
        if size == 0 and not fds:
            # A zero-length datagram reads like end of stream; ours never sends one.
            self._eof_fed = True
        if self._datagram:
            try:
                return self.wire.receive_datagram(
                    self._view[:size], fds, truncated=bool(flags & _MSG_TRUNC)
                )
            except RemoteProtocolError as exc:
                raise self._protocol_failure(exc) from None
        self.wire.receive_data(self._view[:size], fds)
        return NEED_DATA

    # -- sending -----------------------------------------------------------------

    def owe_reply(self, message: Message) -> None:
        """Queue a reply (a released pool slot's Ack) and send it now if the socket is free.

        Called from `MappedRead.close()`, which may run in any thread and
        outside any channel operation; what cannot go now goes with the next one.
        """
        if self._released:
            return
        self._owed.append(message)
        if self.sending.try_enter():
            try:
                self.send_owed()
            except BlobError:
                pass  # the failure is sticky: the next operation reports it
            finally:
                self.sending.__exit__()

    def send_owed(self) -> bool:
        """Send queued replies (the caller holds `sending`); False while the socket is full.

        Every send first calls this until it returns True, so that the rest of
        a reply a stream socket took only in part goes before anything else.
        """
        while self._owed_rest or self._owed:
            if not self._owed_rest:
                message, data = self.encode(self._owed[0], (), validate=False)
                sent = self.send_some(memoryview(data), ())
                if sent is None:
                    self.wire.abandon(message)
                    return False
                self._owed.popleft()
                self._owed_rest = memoryview(data)[sent:]
                continue
            sent = self.send_some(self._owed_rest, ())
            if sent is None:
                return False
            self._owed_rest = self._owed_rest[sent:]
        return True

    def frame_now(
        self, message: Message, fds: Sequence[int], *, validate: bool
    ) -> tuple[Message, bytearray] | None:
        """`encode()`'s fast lane (the caller holds `sending`), or None for the general path.

        Datagram framing with no owed reply in the way only: a stream frame
        may go out in parts, and owed replies go first (`send_owed`). Then
        the wire's `frame_trusted` either frames the message, recorded as
        sent, or declines with nothing recorded. Raises what `encode()` does
        for a closed or failed channel.
        """
        if not self._datagram or self._owed or self._owed_rest:
            return None
        if self._closed or self._failure is not None or self._send_failure is not None:
            self.check_can_send()  # raises
        if message.id == 0:
            message = msgspec.structs.replace(message, id=self.wire.next_id())
        frame = self.wire.frame_trusted(message, len(fds), validate=validate)
        return None if frame is None else (message, frame)

    # The two sends of a plain handoff's round trip, each framed and sent in
    # one step (the caller holds `sending`). They return None, with nothing
    # sent or recorded, unless the channel is in its usual state (datagrams,
    # no owed reply, neither closed nor failed) and the wire frames the
    # message (`Connection.frame_handoff` / `frame_ack`): the general path
    # (`ops.transmit_locked`) then applies every rule and raises its errors.
    # Otherwise (message, frame, bytes sent): None bytes if the socket was
    # full, and the caller sends the frame with `ops.send_frame`.

    def sends_now(self) -> bool:
        """Whether the fast lanes may send: datagrams, nothing owed, neither closed nor failed."""
        return (
            self.intact
            and self._datagram
            and not self._owed
            and not self._owed_rest
            and self._send_failure is None
        )

    def handoff_now(
        self, token: BlobToken, meta: bytes, fd: int
    ) -> tuple[BlobHandoff, bytearray, int | None] | None:
        """Hand *fd* over as the blob *token*: the fast lane of `ops.send_blob`'s send."""
        if not self.sends_now():
            return None
        framed = self.wire.frame_handoff(token, meta)
        if framed is None:
            return None
        handoff, frame = framed
        try:
            sent = self.sock.sendmsg([frame], [(_SOL_SOCKET, _SCM_RIGHTS, _FD.pack(fd))], _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return handoff, frame, None
        except BaseException as exc:
            self.wire.abandon(handoff)
            if isinstance(exc, OSError):
                raise self._os_failure(exc, "sending") from exc
            raise
        return handoff, frame, sent

    def ack_now(self, reply_to: int) -> tuple[Ack, bytearray, int | None] | None:
        """Acknowledge the peer's handoff *reply_to*: the fast lane of `ops.receive_handoff`'s."""
        if not self.sends_now():
            return None
        framed = self.wire.frame_ack(reply_to)
        if framed is None:
            return None
        ack, frame = framed
        try:
            sent = self.sock.send(frame, _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return ack, frame, None
        except OSError as exc:
            raise self._os_failure(exc, "sending") from exc
        return ack, frame, sent

    def payload_now(self, data: bytes) -> tuple[UserPayload, bytearray, int | None] | None:
        """Send *data* as a `UserPayload` without fds: the fast lane of a send of bytes."""
        if not self.sends_now():
            return None
        framed = self.wire.frame_payload(data)
        if framed is None:
            return None
        payload, frame = framed
        try:
            sent = self.sock.send(frame, _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return payload, frame, None
        except BaseException as exc:
            self.wire.abandon(payload)
            if isinstance(exc, OSError):
                raise self._os_failure(exc, "sending") from exc
            raise
        return payload, frame, sent

    def encode(
        self, message: Message, fds: Sequence[int], *, validate: bool
    ) -> tuple[Message, bytes]:
        """Give *message* its request id and encode it (see `Connection.send` for *validate*)."""
        self.check_can_send()
        if message.id == 0:
            message = msgspec.structs.replace(message, id=self.wire.next_id())
        data, _ = self.wire.send(message, fds, validate=validate)
        return message, data

    def send_some(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> int | None:
        """Send what the socket takes now (fds with the first byte); None if it takes nothing."""
        self.check_can_send()
        return self.send_checked(data, fds)

    def send_checked(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> int | None:
        """`send_some` right after a call that checked the channel (`frame_now`)."""
        try:
            if fds:
                packed = _FD.pack(fds[0]) if len(fds) == 1 else array.array("i", fds)
                rights = [(_SOL_SOCKET, _SCM_RIGHTS, packed)]
                return self.sock.sendmsg([data], rights, _NOSIGNAL)
            return self.sock.send(data, _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise self._os_failure(exc, "sending") from exc

    def interrupted_send(self, message: Message, *, sent_any: bool) -> None:
        """A send stopped before its last byte (timeout, cancellation, error)."""
        if not sent_any:
            self.wire.abandon(message)
            return
        self.fail(
            BrokenResource(
                f"sending {type(message).__name__} {message.id} was interrupted in the middle "
                "of a frame; the stream is out of step with the peer, so the channel is broken"
            )
        )

    def _farewell(self, error: BlobError) -> None:
        """Tell the peer why we hang up, if the socket takes it right now."""
        try:
            reply = ErrorReply(
                reply_to=0, code=ErrorCode.PROTOCOL, message=str(error)[:MAX_ERROR_TEXT]
            )
            data, _ = self.wire.send(reply)
            self.sock.send(data, _NOSIGNAL)
        except (BlobError, OSError):
            pass  # best effort: the peer may be gone already

    def _os_failure(self, exc: OSError, doing: str) -> BlobError:
        if exc.errno in _DISCONNECTED:
            error = ConnectionClosed(f"{doing}: the peer closed the connection")
            if doing == "sending":
                # Keep receiving: messages the peer sent before it left are still queued.
                self._send_failure = self._send_failure or error
                return error
            return self.fail(error)
        if exc.errno == errno.ETOOMANYREFS:
            return BrokenResource(
                f"{doing}: too many fds in flight (ETOOMANYREFS): the peer is not receiving "
                "what was sent; wait for replies before sending more"
            )
        if exc.errno == errno.EBADF and self._released:
            return BlobClosed("this channel was closed meanwhile")
        return _translate(exc, doing)


def _give_back(pool: BlobPool, slot: int) -> None:
    if not pool.closed:
        pool.release(slot)


def _raise_again(error: BlobError) -> NoReturn:
    """Raise a sticky failure anew (a fresh instance, the first one as its cause)."""
    raise type(error)(*error.args) from error


def _translate(exc: OSError, doing: str) -> BlobError:
    try:
        with os_errors(doing):
            raise exc
    except BlobError as translated:
        return translated
    raise AssertionError("os_errors translates every OSError")  # pragma: no cover
