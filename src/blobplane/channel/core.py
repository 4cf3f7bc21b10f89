"""The shared heart of both channel flavours: one non-blocking socket driving one `Connection`.

Each method either makes progress or says it would block; the operations in
`ops` turn that into "wait until readable or writable", and the sync and
asyncio drivers only implement the waiting. The one wait here is the sync
driver's on a datagram socket, a blocking recvmsg (`read_in_waits`).

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
import time
import weakref
from collections import deque
from collections.abc import Callable, Container, Generator, Sequence
from typing import NoReturn, TypeVar

from blobplane.auto_pool import AutoPool, SlotOwner, default_auto_pool
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
    PeerRefused,
    RemoteProtocolError,
    TooManyOpenFiles,
    os_errors,
)
from blobplane.fds import close_fds
from blobplane.pool import BlobPool
from blobplane.slot_cache import SlotCache
from blobplane.wire import (
    MAX_FDS_PER_MESSAGE,
    MAX_FRAME_SIZE,
    NEED_DATA,
    Ack,
    Connection,
    ErrorCode,
    ErrorReply,
    Event,
    Message,
    PeerClosed,
    Received,
)
from blobplane.wire.messages import MAX_ERROR_TEXT

__all__ = ["DEFAULT_TIMEOUT", "Busy", "ChannelCore", "Op", "Wait"]

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
# Every call but `wait_received` passes MSG_DONTWAIT: a datagram socket's fd
# is in blocking mode (see `ChannelCore`), a stream socket's is not.
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_NOSIGNAL) | _MSG_DONTWAIT
_WAIT_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_RECV_FLAGS = _WAIT_FLAGS | _MSG_DONTWAIT
_TIMEVAL = struct.Struct("@ll")
_REPLIES = (Ack, ErrorReply)
_FD = struct.Struct("i")
_RIGHTS = (_SOL_SOCKET, _SCM_RIGHTS)
_DISCONNECTED = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED}


class Wait(enum.Enum):
    """What an operation waits for before its next step."""

    READABLE = "readable"
    WRITABLE = "writable"
    BACKOFF = "backoff"  # no readiness to wait for (a full listen backlog): retry shortly


Op = Generator[Wait, None, T]


def _fds_from(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            if len(data) == _FD.size:  # the usual case: a handoff's one fd
                fds.append(_FD.unpack(data)[0])
                continue
            ints = array.array("i")
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    return fds


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


def _release(
    sock: socket.socket,
    wire: Connection,
    unread: deque[Received],
    arrived: list[Received],
    slot_owner: SlotOwner,
) -> None:
    # Shared by close() and the finalizer, so it must not refer to the core.
    sock.close()
    wire.close()
    for received in (*unread, *arrived):
        close_fds(received.fds)
    unread.clear()
    arrived.clear()
    # The peer may still read the slots it had from us (or keep their mappings):
    # none of them is ever loaned again.
    slot_owner.retire()


class Busy:
    """One use at a time: `take()` marks a use in progress, `release()` ends it.

    `take()` never waits: False says another task or thread is inside, and
    the caller raises `refused()`. Trio's rule: concurrent misuse is an
    error, never a silent queue. Both are the lock's own methods (no Python
    frame), as every operation takes one or two of these.
    """

    __slots__ = ("message", "release", "take")

    def __init__(self, message: str) -> None:
        lock = threading.Lock()
        self.take: Callable[[], bool] = functools.partial(lock.acquire, False)
        self.release: Callable[[], None] = lock.release
        self.message = message

    def refused(self) -> BlobBusy:
        return BlobBusy(self.message)


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
        self.datagram = framing == "datagram"
        self._fd = sock.fileno()
        self._buffer_size = max_frame_size if self.datagram else _STREAM_CHUNK
        # One slot more than allowed, to tell "too many fds" from "the kernel dropped some".
        self._fd_capacity = max_fds + 1
        self._ancillary_size = socket.CMSG_SPACE(self._fd_capacity * _FD.size)
        # The waits the SO_RCVTIMEO as set serves (`_set_receive_timeout`): at
        # first none is set, which serves a wait without end.
        self._waits_served = (math.inf, math.inf)
        # Messages put aside while a reply was awaited (`defer`), oldest first.
        self._unread: deque[Received] = deque()
        # What `wait_received` took in, for the next `poll_received` (at most one).
        self._arrived: list[Received] = []
        self._reads_in_waits = False
        self.receiving = Busy(
            "another task or thread is already receiving on this channel; receive from one "
            "task at a time (recv, recv_blob, and send_blob while it awaits its reply)"
        )
        self.sending = Busy(
            "another task or thread is already sending on this channel and waiting for room; "
            "send from one task at a time (recv_blob sends its acknowledgement too)"
        )
        self._closed = False
        self._failure: BlobError | None = None
        # Read-only for the operations: neither closed nor failed, one attribute
        # to test on every call (`check_usable()` says why not).
        self.intact = True
        # The peer stopped reading (EPIPE): what it sent before may still be read.
        self._send_failure: BlobError | None = None
        # Read-only for the operations: `intact` and no send failure
        # (`check_can_send()` says why not).
        self.can_send = True
        self._eof_fed = False
        self._release_hooks: list[Callable[[], None]] = []
        # Pooled handoffs: slots we sent and hold until the peer's reply, and
        # the slots we received, mapped once each, with the replies owed for them.
        self.pooled_out: dict[int, tuple[BlobPool, int]] = {}
        # Of those, the handoffs whose replies the library takes (`AutoPool` slots).
        self._quiet: set[int] = set()
        self.slot_cache = SlotCache()
        # Where `send_bytes` copies a payload too large for a message (None: fresh blobs),
        # and what it takes slots as: they are retired with the channel.
        self.auto_pool: AutoPool | None = default_auto_pool()
        self.slot_owner = SlotOwner()
        # A refusal of a quiet slot: raised by the next send that copies (`send_filled`).
        self.quiet_refusal: PeerRefused | None = None
        # Whether handed-over memfds may have unallocated pages (`checks.check_allocated`).
        self.allow_sparse = False
        self._owed: deque[Message] = deque()
        self._owed_rest = memoryview(b"")
        # Read-only for the operations: whether replies wait in `_owed` (`send_owed`).
        self.owing = False
        self._finalizer = weakref.finalize(
            self,
            _release,
            sock,
            self.wire,
            self._unread,
            self._arrived,
            self.slot_owner,
        )

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
        if self.intact:
            return
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
        self.intact = self.can_send = False
        self._release_now()

    def fail(self, error: BlobError) -> BlobError:
        """Make *error* the sticky failure (the first one wins) and release everything."""
        if self._failure is None and not self._closed:
            self._failure = error
        self.intact = self.can_send = False
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
        self.owing = False
        # No reply can come any more: the slots we lent are ours again.
        pooled, self.pooled_out = self.pooled_out, {}
        quiet, self._quiet = self._quiet, set()
        for request_id, (pool, slot) in pooled.items():
            if request_id not in quiet:  # a quiet one is retired with its AutoPool owner
                _give_back(pool, slot)

    # -- receiving ---------------------------------------------------------------

    def read_in_waits(self) -> bool:
        """Let the driver read the socket in its waits; whether it may (datagram sockets only).

        The driver's wait for readability is then a blocking read
        (`wait_received`), which returns at once with a message that is
        there already: so `poll_received` reads only when told how long it
        may wait (*until*), and a non-blocking look first, which would mostly
        fail, is never made.
        """
        self._reads_in_waits = self.datagram
        return self._reads_in_waits

    def poll_received(self, *, queued: bool = True, until: float | None = None) -> Received | None:
        """The next message, or None if it has not arrived yet.

        With *queued* False, skip the messages put aside by `defer()` (a
        reply being awaited is always newer than them). It never blocks, but
        on a core that reads in its driver's waits (`read_in_waits`): there it
        reads the socket only when given *until* (a `time.monotonic()`
        deadline, math.inf: none), and then waits for a message until then,
        so that an operation's first look is the sync driver's wait.
        """
        if not self.intact:
            self.check_usable()
        if queued and self._unread:
            return self._unread.popleft()
        if self._arrived:
            return self._arrived.pop()
        if self.datagram:
            # A datagram wire holds nothing between calls while the channel is
            # intact: each datagram read is handed out at once (`receive_datagram`).
            while True:
                if not self._reads_in_waits:
                    event = self._read(0)
                elif until is None:
                    return None
                else:
                    event = self._read(max(0.0, until - time.monotonic()))
                if type(event) is Received and not self.pooled_out:
                    return event  # `_taken` has nothing to do
                received = self._taken(event)
                if received is not None or event is None:
                    return received
                # A reply the library took (`_taken`): look again.
        wire = self.wire
        while True:
            if wire.has_buffered:
                try:
                    event = wire.next_event()
                except RemoteProtocolError as exc:
                    raise self._protocol_failure(exc) from None
                if event is not NEED_DATA:
                    received = self._taken(event)
                    if received is not None:
                        return received
                    continue  # a reply the library took: what follows may be buffered
            # Feed what the socket has, then ask the wire again.
            if self._read(0) is None:
                return None

    def wait_received(self, timeout: float | None) -> bool:
        """Block in recvmsg for up to *timeout* seconds (None: forever, 0: not at all).

        The sync driver's wait for readability on a datagram socket; the
        caller holds `receiving`. What arrives is kept for the next
        `poll_received`; returns whether anything is kept.
        """
        if not self._arrived:
            received = self._taken(self._read(math.inf if timeout is None else timeout))
            if received is not None:
                self._arrived.append(received)
        return bool(self._arrived)

    def _read(self, timeout: float) -> Event | None:
        """One recvmsg, waiting up to *timeout* seconds (math.inf: forever, 0: not at all).

        A datagram goes to the wire and the event it makes of it is returned;
        stream bytes are fed to the wire, and NEED_DATA says to ask it. None:
        nothing came. The kernel's SO_RCVTIMEO bounds a wait. It is set again
        only when it would end the wait more than a millisecond late, or
        before half of *timeout*: a wait that ends early lets the caller wait
        again for what remains. (A signal whose handler returns restarts the
        wait, as for a blocking socket.)
        """
        if not self.intact:
            self.check_usable()
        flags = _RECV_FLAGS
        if timeout:
            flags = _WAIT_FLAGS
            low, high = self._waits_served
            if not low <= timeout <= high:
                self._set_receive_timeout(timeout)
        try:
            size, ancillary, got, _ = self.sock.recvmsg_into(
                [self._view], self._ancillary_size, flags
            )
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno != errno.ECONNRESET:
                raise self._os_failure(exc, "receiving") from exc
            # The peer closed with data of ours unread: the kernel says so (once)
            # before handing over what the peer sent last (a refusal, say). Read that.
            try:
                size, ancillary, got, _ = self.sock.recvmsg_into(
                    [self._view], self._ancillary_size, _RECV_FLAGS
                )
            except OSError:
                raise self._os_failure(exc, "receiving") from exc
        if not ancillary:
            fds = []
        elif (
            len(ancillary) == 1 and ancillary[0][:2] == _RIGHTS and len(ancillary[0][2]) == _FD.size
        ):
            fds = [_FD.unpack(ancillary[0][2])[0]]  # a handoff's one fd (`_fds_from`)
        else:
            fds = _fds_from(ancillary)
        if got & _MSG_CTRUNC and len(fds) < self._fd_capacity:
            close_fds(fds)
            raise self.fail(_fd_exhaustion())
        if size == 0 and not fds:
            # A zero-length datagram reads like end of stream; ours never sends one.
            self._eof_fed = True
        try:
            if self.datagram:
                return self.wire.receive_datagram(
                    self._view[:size], fds, truncated=bool(got & _MSG_TRUNC)
                )
            self.wire.receive_data(self._view[:size], fds)
        except RemoteProtocolError as exc:
            raise self._protocol_failure(exc) from None
        return NEED_DATA

    def _set_receive_timeout(self, timeout: float) -> None:
        """Set SO_RCVTIMEO for a wait of *timeout* seconds (math.inf: forever).

        The waits it then serves with no call to the kernel: those it ends at
        most a millisecond late, or not before half their time.
        """
        seconds = 0.0 if timeout == math.inf else max(timeout, 1e-6)  # 0 would wait forever
        whole = int(seconds)
        micros = math.ceil((seconds - whole) * 1_000_000)
        if micros == 1_000_000:  # a hair under a whole second: the kernel says EDOM
            whole, micros = whole + 1, 0
        try:
            self.sock.setsockopt(_SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micros))
        except OSError as exc:
            raise self._os_failure(exc, "receiving") from exc
        self._waits_served = (
            (math.inf, math.inf) if timeout == math.inf else (timeout - 0.001, timeout * 2)
        )

    def _taken(self, event: Event | None) -> Received | None:
        """What a received event means here: a message handed out, nothing yet, or the end."""
        if type(event) is Received:
            if self.pooled_out and type(event.message) in _REPLIES:
                reply_to: int = event.message.reply_to  # type: ignore[union-attr]
                lent = self.pooled_out.pop(reply_to, None)
                if lent is not None:
                    _give_back(*lent)
                    if reply_to in self._quiet:
                        self._quiet.discard(reply_to)
                        # The library's own slot came back: nothing for the caller of
                        # recv(). A refusal is for the sender: the next send says it.
                        if type(event.message) is ErrorReply:
                            message = event.message
                            self.quiet_refusal = PeerRefused(
                                f"the peer refused bytes sent earlier (request {reply_to}): "
                                f"{message.message} ({message.code})",
                                code=message.code,
                                reply_to=reply_to,
                            )
                        return None
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

    def lend(self, request_id: int, pool: BlobPool, slot: int, quiet: bool) -> None:
        """Slot *slot* of *pool*, sent as *request_id*, is the peer's until its reply;
        *quiet*: the library takes that reply (`_taken`), the caller never sees it."""
        self.pooled_out[request_id] = (pool, slot)
        if quiet:
            self._quiet.add(request_id)

    def take_replies(self) -> None:
        """Take in, without waiting, the replies that have come for quiet slots.

        A producer that only sends would otherwise never read the releases of
        the slots it sent. What else arrives is kept for `recv()`, up to half
        of what `defer` keeps: beyond that the replies stay unread (and the
        slots in use) until the caller receives.
        """
        while self._quiet and len(self._unread) < MAX_QUEUED // 2:
            if not self.receiving.take():
                return  # a receive in progress takes them
            try:
                quiet = len(self._quiet)
                received = self.poll_received(queued=False, until=0.0)  # a past deadline
                if received is not None:
                    self.defer(received)
                elif len(self._quiet) == quiet:
                    return  # nothing came
            finally:
                self.receiving.release()

    def defer(self, received: Received) -> None:
        """Keep *received* for a later `recv()` (it arrived while a reply was awaited)."""
        if len(self._unread) >= MAX_QUEUED:
            close_fds(received.fds)
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

    # -- sending -----------------------------------------------------------------

    def owe_reply(self, message: Message) -> None:
        """Queue a reply (a released pool slot's Ack) and send it now if the socket is free.

        Called from `MappedRead.close()`, which may run in any thread and
        outside any channel operation; what cannot go now goes with the next one.
        """
        if self._released:
            return
        self._owed.append(message)
        self.owing = True
        if self.sending.take():
            try:
                self.send_owed()
            except BlobError:
                pass  # the failure is sticky: the next operation reports it
            finally:
                self.sending.release()

    def send_owed(self) -> bool:
        """Send queued replies (the caller holds `sending`); False while the socket is full.

        Every send first calls this until it returns True, so that the rest of
        a reply a stream socket took only in part goes before anything else.
        """
        while self._owed_rest or self._owed:
            if not self._owed_rest:
                if not self.can_send:
                    self.check_can_send()
                message, data = self.wire.frame(self._owed[0], validate=False)
                sent = self.send_some(data, ())
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
        self.owing = False
        return True

    def send_some(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> int | None:
        """Send what the socket takes now (fds with the first byte); None if it takes nothing."""
        if not self.can_send:
            self.check_can_send()
        try:
            if fds:
                packed = _FD.pack(fds[0]) if len(fds) == 1 else array.array("i", fds)
                rights = [(_SOL_SOCKET, _SCM_RIGHTS, packed)]
                return self.sock.sendmsg([data], rights, _SEND_FLAGS)
            return self.sock.send(data, _SEND_FLAGS)
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
            self.sock.send(data, _SEND_FLAGS)
        except (BlobError, OSError):
            pass  # best effort: the peer may be gone already

    def _os_failure(self, exc: OSError, doing: str) -> BlobError:
        if exc.errno in _DISCONNECTED:
            error = ConnectionClosed(f"{doing}: the peer closed the connection")
            if doing == "sending":
                # Keep receiving: messages the peer sent before it left are still queued.
                self._send_failure = self._send_failure or error
                self.can_send = False
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
