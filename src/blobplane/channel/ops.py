"""Every channel operation, written once for both drivers.

An operation does at once what it can: when no step has to wait (the
socket takes the message, the message is there) it returns its result.
When a step would block, it returns instead a generator for the rest, which
yields what it waits for (`Wait.READABLE`, `Wait.WRITABLE`, `Wait.BACKOFF`),
tries again, and returns the result: trio's "try it now, else wait and try
again", and pyzmq's DONTWAIT first, in one place for every operation. The
sync driver answers a wait with poll() (or, on a datagram socket, by
blocking in recvmsg itself: `ChannelCore.wait_received`), the asyncio
driver with add_reader/add_writer; a timeout or a cancellation closes the
generator, whose `finally` blocks undo what is half done.

The sync driver's wait on a datagram socket is a blocking recvmsg, which
returns at once with a message that is there already: so the operations
that receive take *until*, the call's deadline (`time.monotonic()`,
math.inf: none), and on such a channel their first look waits until then
(`ChannelCore.poll_received`). The asyncio driver passes None: a look that
never waits.

A generator an operation returns holds what the operation took (the busy
flags, a frame recorded as sent): the driver starts it at once, and runs it
to its end or closes it.

`INLINE` is a test hook. Set to False, every operation returns its
generator before trying anything, so that the general path runs for every
call; the results, frames and errors must be the same either way.
"""

from __future__ import annotations

import errno
import mmap
import socket
import time
from collections.abc import Callable, Sequence
from types import GeneratorType, TracebackType
from typing import Self, TypeVar, cast

import msgspec

from blobplane.backends.checks import check_received_fd
from blobplane.backends.mapping import byte_view, copier, map_readonly
from blobplane.blobs import MappedRead, ProducerBlob, fresh_blobs
from blobplane.channel.core import ChannelCore, Op, Wait
from blobplane.channel.transport import Transport, check_path, default_transport, new_socket
from blobplane.errors import (
    BlobClosed,
    BlobError,
    ConnectionClosed,
    ConnectionRefused,
    DescriptorTooShort,
    InvalidSize,
    NotSealed,
    NotSendable,
    PeerRefused,
    TooManyOpenFiles,
    UnexpectedMessage,
    WrongKind,
    os_errors,
)
from blobplane.fds import close_fds
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import BlobToken, UnixFd, is_int
from blobplane.wire import (
    Ack,
    BlobHandoff,
    ErrorCode,
    ErrorReply,
    Message,
    Received,
    SlotRef,
    UserPayload,
)
from blobplane.wire.messages import MAX_ERROR_TEXT, MAX_META

__all__ = [
    "INLINE",
    "Handoff",
    "accept",
    "connect",
    "loan_slot",
    "receive",
    "receive_bytes",
    "receive_handoff",
    "send",
    "send_blob",
    "send_bytes",
    "send_filled",
    "try_send",
]

# Test hook (see the module's docstring): False runs every operation through its generator.
INLINE = True

T = TypeVar("T")


class Handoff(msgspec.Struct, frozen=True, gc=False):
    """A received blob: its token, the sender's metadata, and the read-only mapping.

    The receiver owns `blob` (a `MappedRead`); leaving the `with` block closes it.
    (A Struct for its constructor in C: one is made per blob received.)
    """

    token: BlobToken
    meta: bytes
    blob: MappedRead
    request_id: int

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.blob.close()


# -- sending -------------------------------------------------------------------------


def send(
    core: ChannelCore, message: Message, fds: Sequence[int] = (), *, validate: bool = True
) -> int | Op[int]:
    """Send one message and its fds (borrowed); its request id.

    *validate* False skips re-checking a message the library built from
    values that are valid already (see `Connection.frame`). Replies owed
    from earlier (`ChannelCore.send_owed`) go first.
    """
    if not core.sending.take():
        raise core.sending.refused()
    try:
        if not INLINE or (core.owing and not core.send_owed()):
            return _transmit(core, message, fds, validate)
        if not core.can_send:
            core.check_can_send()
        message, frame = core.wire.frame(message, len(fds), validate=validate)
        try:
            count = core.send_some(frame, fds)
        except BaseException:
            core.interrupted_send(message, sent_any=False)
            raise
        if count != len(frame):
            return _transmit(core, message, fds, validate, frame=frame, start=count or 0)
    except BaseException:
        core.sending.release()
        raise
    core.sending.release()
    return message.id


def try_send(
    core: ChannelCore, message: Message, fds: Sequence[int] = (), *, validate: bool = True
) -> int | None:
    """`send` if it completes at once; None, with nothing sent, if it would have to wait.

    It would while another task's send waits for room, the socket is full,
    or replies owed from earlier wait for room; and always on a stream
    socket, which may take a frame in part (only a datagram goes whole or
    not at all).
    """
    if not core.datagram or not core.sending.take():
        core.check_can_send()  # a closed or broken channel raises rather than says "later"
        return None
    try:
        if core.owing and not core.send_owed():
            return None
        if not core.can_send:
            core.check_can_send()
        message, frame = core.wire.frame(message, len(fds), validate=validate)
        count = None
        try:
            count = core.send_some(frame, fds)  # a datagram goes whole or not at all
        finally:
            if count is None:
                core.interrupted_send(message, sent_any=False)
        return None if count is None else message.id
    finally:
        core.sending.release()


def _transmit(
    core: ChannelCore,
    message: Message,
    fds: Sequence[int],
    validate: bool,
    *,
    frame: bytearray | None = None,
    start: int = 0,
) -> Op[int]:
    """`send` from where it stopped: *frame* (recorded as sent) from byte *start* on, if given.

    Holds `sending`, which it releases at the end.
    """
    try:
        if frame is None:
            while not core.send_owed():
                yield Wait.WRITABLE
            core.check_can_send()
            message, frame = core.wire.frame(message, len(fds), validate=validate)
        yield from _send_frame(core, message, frame, fds, start)
        return message.id
    finally:
        core.sending.release()


def _send_frame(
    core: ChannelCore, message: Message, frame: bytearray, fds: Sequence[int], start: int
) -> Op[None]:
    """Send *frame* from byte *start* on, waiting for room; a send cut short undoes what it must."""
    view = memoryview(frame)[start:]
    riding = fds if start == 0 else ()  # they went with the first byte
    try:
        while view:
            sent = core.send_some(view, riding)
            if sent is None:
                yield Wait.WRITABLE
                continue
            # SCM_RIGHTS travel with the first byte; the rest of a stream frame goes bare.
            view, riding = view[sent:], ()
    finally:
        if view:
            core.interrupted_send(message, sent_any=len(view) < len(frame))


def _unsendable(blob: ProducerBlob) -> BlobError:
    """Why *blob* has no `sendable` fd: a receiver accepts only a live, sealed memfd."""
    blob.fileno()  # BlobClosed once cleaned up
    if not isinstance(blob.descriptor, UnixFd):
        return NotSendable(
            f"blob {blob.id} is a {type(blob.descriptor).__name__} blob; only memfd blobs "
            "travel over a channel (create it with BlobBackend.MEMFD)"
        )
    return NotSendable(
        f"blob {blob.id} is not sealed; call blob.seal() before send_blob(), since a "
        "receiver refuses a memfd its sender could still resize"
    )


def send_blob(
    core: ChannelCore,
    blob: ProducerBlob | PoolLoan,
    meta: bytes,
    wait: bool,
    until: float | None = None,
    *,
    quiet: bool = False,
) -> int | Op[int]:
    """Hand *blob* over; with *wait*, return once the peer replied (or raise `PeerRefused`).

    A plain blob is answered once the peer mapped it. A pool slot is answered
    once the peer released it: the slot is held for the peer until then, so
    closing the loan right after a ``wait=False`` send is safe. *quiet*: the
    library takes that answer (a slot of the channel's `AutoPool`), `recv()`
    never sees it.
    """
    loan: PoolLoan | None = None
    slot = None
    if isinstance(blob, PoolLoan):
        # Sealed against resizing and outside writers when the pool made it.
        loan, fd, token = blob, blob.fileno(), blob.token
        slot = SlotRef(blob.pool.id.uuid, blob.slot, blob.generation)
    else:
        sendable = blob.sendable
        if sendable is None:
            raise _unsendable(blob)
        fd, token = sendable
    if len(meta) > MAX_META:
        raise InvalidSize(f"meta holds {len(meta)} bytes; a handoff carries at most {MAX_META}")
    # Built from a live token and checked meta: valid already. Its id is
    # `frame`'s to settle: this one, unless a send slips in first.
    handoff = BlobHandoff(id=core.wire.next_id(), token=token, meta=bytes(meta), slot=slot)
    if wait:
        if not core.intact:
            core.check_usable()  # closed or broken beats busy
        if not core.receiving.take():
            raise core.receiving.refused()
    try:
        if loan is not None:
            loan.pool.retain(loan.slot)
        try:
            sent = send(core, handoff, (fd,), validate=False)
        except BaseException:
            _lent_back(loan)
            raise
        if not isinstance(sent, int):
            return _handed_over(core, blob, loan, sent, wait, quiet=quiet)
        if loan is not None:
            _lent_out(core, loan, sent, quiet)
        if not wait:
            return sent
        core.wire.expect_ack(sent)  # while the peer works on it
        # Where a look can wait (*until*), wait for the reply now; else the
        # generator does, as it would after a look that found nothing.
        received = None
        if INLINE and until is not None:
            received = core.poll_received(queued=False, until=until)
            while received is not None:
                message = received.message
                if type(message) is Ack and message.reply_to == sent:
                    break  # the usual answer, which `_is_reply` would say
                if _is_reply(core, received, sent, blob):
                    break
                received = core.poll_received(queued=False, until=until)
        if received is None:
            return _handed_over(core, blob, loan, sent, wait, quiet=quiet)
    except BaseException:
        if wait:
            core.receiving.release()
        raise
    core.receiving.release()
    return sent


def send_bytes(
    core: ChannelCore, data: object, until: float | None = None, *, sealed: bool = False
) -> int | Op[int]:
    """Send *data* (any buffer) for the peer's `receive_bytes`; its request id.

    Up to the wire's `payload_limit` (64 KiB less a few bytes, by default)
    the bytes ride inside the message: one datagram, no memfd. Larger, they
    are copied into shared memory as `send_filled` says.
    """
    view = byte_view(data)
    size = view.nbytes
    if size <= core.wire.payload_limit:
        payload = data if type(data) is bytes else view.tobytes()
        return send(core, UserPayload(id=core.wire.next_id(), data=payload), validate=False)
    return send_filled(core, size, copier(view), until, sealed=sealed)


def send_filled(
    core: ChannelCore,
    size: int,
    write: Callable[[memoryview], None],
    until: float | None = None,
    *,
    sealed: bool = False,
) -> int | Op[int]:
    """Send *size* bytes that *write* lays out in the view it is given; the request id.

    Up to the wire's `payload_limit` they ride inside the message. Larger,
    they go in a slot of the channel's `AutoPool`, sent without waiting (the
    slot is the library's again once the peer released it, for this channel
    alone; a refusal of it is raised by the next call); or, with *sealed*, no
    pool, or no room in it, in a fresh memfd sealed against every write,
    waited for until the peer mapped it.
    """
    if not is_int(size) or size < 0:
        raise InvalidSize(f"size must be an int >= 0, got {size!r}")
    if core.quiet_refusal is not None:
        refusal, core.quiet_refusal = core.quiet_refusal, None
        raise refusal
    if size <= core.wire.payload_limit:
        buffer = bytearray(size)
        with memoryview(buffer) as view:
            write(view)
        return send(core, UserPayload(id=core.wire.next_id(), data=bytes(buffer)), validate=False)
    pool = None if sealed else core.auto_pool
    if pool is not None:
        core.take_replies()
        loan = core.slot_owner.loan(pool, size)
        if loan is not None:
            try:
                with loan.buffer as view:
                    write(view)
                return send_blob(core, loan, b"", False, until, quiet=True)
            finally:
                loan.close()  # the slot stays the peer's until it answers
    blob = fresh_blobs().create(size)
    try:
        with blob.buffer as view:
            write(view)
        blob.seal()
        sent = send_blob(core, blob, b"", True, until)
    except BaseException:
        blob.cleanup()
        raise
    if isinstance(sent, int):
        blob.cleanup()
        return sent
    return _freed_after(sent, blob)


def _freed_after(sending: Op[int], blob: ProducerBlob) -> Op[int]:
    try:
        return (yield from sending)
    finally:
        blob.cleanup()


def _lent_out(core: ChannelCore, loan: PoolLoan | None, request_id: int, quiet: bool) -> None:
    """A pool slot sent as *request_id* is held for the peer until its reply (taken by the
    library if *quiet*)."""
    if loan is not None:
        core.lend(request_id, loan.pool, loan.slot, quiet)


def _lent_back(loan: PoolLoan | None) -> None:
    """A pool slot that was not sent after all is the sender's again."""
    if loan is not None:
        loan.pool.release(loan.slot)


def _handed_over(
    core: ChannelCore,
    blob: ProducerBlob | PoolLoan,
    loan: PoolLoan | None,
    sent: int | Op[int],
    wait: bool,
    *,
    quiet: bool,
) -> Op[int]:
    """`send_blob` from where it stopped: the rest of the send, then the reply if *wait*.

    Holds `receiving` if *wait*, and releases it at the end.
    """
    try:
        if not isinstance(sent, int):
            try:
                sent = yield from sent
            except BaseException:
                _lent_back(loan)
                raise
            _lent_out(core, loan, sent, quiet)
        if wait:
            # The reply cannot have come before the handoff went: wait before looking.
            yield Wait.READABLE
            while True:
                received = core.poll_received(queued=False)
                if received is None:
                    yield Wait.READABLE
                elif _is_reply(core, received, sent, blob):
                    break
        return sent
    finally:
        if wait:
            core.receiving.release()


def _is_reply(
    core: ChannelCore, received: Received, request_id: int, blob: ProducerBlob | PoolLoan
) -> bool:
    """Whether *received* is the Ack of handoff *request_id*; raise `PeerRefused` for a refusal.

    Anything else is kept for `recv()` (`ChannelCore.defer`). The caller holds `core.receiving`.
    """
    message = received.message
    if type(message) is Ack and message.reply_to == request_id:
        return True
    if type(message) is ErrorReply and message.reply_to in (0, request_id):
        what = "the handoff" if message.reply_to else "the connection"
        raise PeerRefused(
            f"the peer refused {what} of blob {blob.id}: {message.message} ({message.code})",
            code=message.code,
            reply_to=message.reply_to,
        )
    core.defer(received)
    return False


def loan_slot(core: ChannelCore, pool: BlobPool) -> PoolLoan | Op[PoolLoan]:
    """A free slot of *pool*, taking in the peer's releases while none is free.

    Other messages that arrive meanwhile are kept for `recv()`.
    """
    loan = pool.try_loan() if INLINE else None
    return _loan_later(core, pool) if loan is None else loan


def _loan_later(core: ChannelCore, pool: BlobPool) -> Op[PoolLoan]:
    while True:
        loan = pool.try_loan()
        if loan is not None:
            return loan
        core.check_usable()
        if not core.receiving.take():
            raise core.receiving.refused()
        try:
            received = core.poll_received(queued=False)
            if received is None:
                yield Wait.READABLE
            elif not isinstance(received.message, Ack | ErrorReply):
                core.defer(received)
        finally:
            core.receiving.release()


# -- receiving -----------------------------------------------------------------------


def receive(core: ChannelCore, until: float | None = None) -> Received | Op[Received]:
    """The next message of any kind and its fds, which the caller owns from now on."""
    if not core.intact:
        core.check_usable()  # closed or broken beats busy
    if not core.receiving.take():
        raise core.receiving.refused()
    try:
        received = core.poll_received(until=until) if INLINE else None
    except BaseException:
        core.receiving.release()
        raise
    if received is None:
        return _receive_later(core, INLINE)
    core.receiving.release()
    return received


def _receive_later(core: ChannelCore, polled: bool) -> Op[Received]:
    """`receive`, waiting for the message; holds `receiving` and releases it at the end.

    *polled*: `receive` found nothing an instant ago, so it waits before it looks.
    """
    try:
        if polled:
            yield Wait.READABLE
        received = core.poll_received()
        while received is None:
            yield Wait.READABLE
            received = core.poll_received()
        return received
    finally:
        core.receiving.release()


def receive_handoff(core: ChannelCore, until: float | None = None) -> Handoff | Op[Handoff]:
    """The next blob, mapped read-only after the sealing checks, and acknowledged.

    A descriptor that fails the checks is closed, the peer gets an
    `ErrorReply`, and the check's error (an `UnsafeDescriptor`) is raised; the
    channel stays usable. Anything but a handoff is left for `recv()` and
    `UnexpectedMessage` is raised.
    """
    return _receive_settled(core, until, _settle)


def receive_bytes(core: ChannelCore, until: float | None = None) -> MappedRead | Op[MappedRead]:
    """What the peer's `send_bytes` sent, read-only: the message's own bytes, or a blob's.

    A blob is mapped and acknowledged as `receive_handoff` does it (its
    metadata is dropped). Anything else is left for `recv()` and
    `UnexpectedMessage` is raised.
    """
    return _receive_settled(core, until, _settle_bytes)


def _receive_settled(
    core: ChannelCore, until: float | None, settle: Callable[[ChannelCore, Received], T | Op[T]]
) -> T | Op[T]:
    """Hold `receiving`, take the next message (looking until *until*) and *settle* it."""
    if not core.intact:
        core.check_usable()  # closed or broken beats busy
    if not core.receiving.take():
        raise core.receiving.refused()
    try:
        if until is not None:
            core.wire.prepare_ack()  # the answer, built while the look waits
        received = core.poll_received(until=until) if INLINE else None
        settled = None if received is None else settle(core, received)
    except BaseException:
        core.receiving.release()
        raise
    if settled is not None and not isinstance(settled, GeneratorType):
        core.receiving.release()
        return settled
    return _settle_later(core, settled, settle)


def _settle_later(
    core: ChannelCore,
    answering: Op[T] | None,
    settle: Callable[[ChannelCore, Received], T | Op[T]],
) -> Op[T]:
    """`_receive_settled` from where it stopped: the arrival (if *answering* is None), the reply.

    Holds `receiving`, which it releases at the end.
    """
    try:
        if answering is None:
            core.wire.prepare_ack()  # the answer, built while this waits
            if INLINE:  # `_receive_settled` found nothing an instant ago
                yield Wait.READABLE
            received = core.poll_received()
            while received is None:
                yield Wait.READABLE
                received = core.poll_received()
            settled = settle(core, received)
            if not isinstance(settled, GeneratorType):
                return cast(T, settled)
            answering = settled
        return (yield from answering)
    finally:
        core.receiving.release()


def _settle_bytes(core: ChannelCore, received: Received) -> MappedRead | Op[MappedRead]:
    """`receive_bytes` once *received* is in: the bytes of a payload, else `_settle`'s blob."""
    payload = received.message
    if type(payload) is UserPayload and not received.fds:
        return MappedRead(payload.data, len(payload.data))
    settled = _settle(core, received)
    if isinstance(settled, Handoff):
        return settled.blob
    return _blob_of(settled)


def _blob_of(settling: Op[Handoff]) -> Op[MappedRead]:
    handoff = yield from settling
    return handoff.blob


_REFUSAL_CODES: tuple[tuple[type[BlobError], ErrorCode], ...] = (
    (WrongKind, ErrorCode.WRONG_KIND),
    (NotSealed, ErrorCode.NOT_SEALED),
    (DescriptorTooShort, ErrorCode.TOO_SHORT),
    (TooManyOpenFiles, ErrorCode.TOO_MANY_OPEN_FILES),
)


def _settle(core: ChannelCore, received: Received) -> Handoff | Op[Handoff]:
    """`receive_handoff` once *received* is in: check, map, answer.

    Anything but a handoff is put back for `recv()` and `UnexpectedMessage`
    raised. A plain blob is answered as soon as it is mapped; closing its fd
    waits until the answer is out.
    """
    handoff = received.message
    if not isinstance(handoff, BlobHandoff):
        core.unread(received)
        raise UnexpectedMessage(
            f"expected a blob handoff, received {type(handoff).__name__} {handoff.id}; "
            "it is left for recv()"
        )
    fds = received.fds
    result: mmap.mmap | BlobError | None
    reply: Message
    if handoff.slot is None:
        # Map the memfd after the sealing checks (the wire checked: one fd rides).
        size = handoff.token.size
        try:
            info = check_received_fd(fds[0], size, allow_sparse=core.allow_sparse)
            result = map_readonly(fds[0], size, info)
        except BlobError as exc:
            result = exc
        except (ValueError, OverflowError) as exc:
            # mmap's own refusals: a size the checks let through but no address space takes.
            result = InvalidSize(f"cannot map the {size} bytes of a blob: {exc}")
        if isinstance(result, BlobError):
            reply = _refusal(handoff, result)
        else:
            reply = core.wire.ack_for(handoff.id)
    else:
        view = _slot_view(core, handoff, handoff.slot, fds)
        if isinstance(view, MappedRead):
            # A pool slot is answered when it is released (see `_slot_view`).
            return Handoff(handoff.token, handoff.meta, view, handoff.id)
        result, fds, reply = view, (), _refusal(handoff, view)
    try:
        sent = send(core, reply, validate=False)
    except BaseException as exc:
        return _answered(handoff, fds, result, exc)
    if isinstance(sent, int):
        return _answered(handoff, fds, result, None)
    return _answering(handoff, fds, result, sent)


def _answering(
    handoff: BlobHandoff,
    fds: tuple[int, ...],
    result: mmap.mmap | BlobError | None,
    sent: Op[int],
) -> Op[Handoff]:
    try:
        yield from sent
    except BaseException as exc:
        return _answered(handoff, fds, result, exc)
    return _answered(handoff, fds, result, None)


def _answered(
    handoff: BlobHandoff,
    fds: tuple[int, ...],
    result: mmap.mmap | BlobError | None,
    failure: BaseException | None,
) -> Handoff:
    """The end of `receive_handoff` once its reply went out, or failed with *failure*.

    The received fds are closed whatever happens.
    """
    close_fds(fds)
    if isinstance(result, BlobError):
        if isinstance(failure, ConnectionClosed):
            raise result from None  # the sender is gone: what was wrong is the news
        raise failure or result
    if failure is not None and not isinstance(failure, ConnectionClosed):
        if result is not None:
            result.close()
        raise failure
    # Sent, or the sender is gone: a mapped blob stays valid (memfd semantics).
    # Later sends report the closed connection, and receives do once whatever
    # the sender sent before it left has been read.
    size = handoff.token.size
    return Handoff(handoff.token, handoff.meta, MappedRead(result, size), handoff.id)


def _slot_view(
    core: ChannelCore, handoff: BlobHandoff, slot: SlotRef, fds: tuple[int, ...]
) -> MappedRead | BlobError:
    """A pool slot's view, mapped once and kept (`SlotCache`), or what is wrong; fds closed.

    Closing the view owes the sender its reply (the slot is free again).
    """
    owed = Ack(reply_to=handoff.id)
    try:
        return core.slot_cache.view(
            fds[0],
            handoff.token.size,
            lambda: core.owe_reply(owed),
            slot.pool,
            allow_sparse=core.allow_sparse,
        )
    except BlobError as exc:
        return exc
    except (ValueError, OverflowError) as exc:
        return InvalidSize(f"cannot map the {handoff.token.size} bytes of a blob: {exc}")
    finally:
        close_fds(fds)


def _refusal(handoff: BlobHandoff, error: BlobError) -> ErrorReply:
    """The ErrorReply that refuses *handoff* for *error*."""
    code = next(
        (code for kind, code in _REFUSAL_CODES if isinstance(error, kind)), ErrorCode.CANNOT_MAP
    )
    return ErrorReply(reply_to=handoff.id, code=code, message=str(error)[:MAX_ERROR_TEXT])


# -- connecting ----------------------------------------------------------------------


def connect(path: str, transport: Transport | None, *, wait: float = 0.0) -> Op[socket.socket]:
    """A socket connected to the listener at *path*.

    With no *transport*, SOCK_SEQPACKET is tried first and SOCK_STREAM if the
    listener is of that type. A full listen backlog gives no readiness to
    wait for, so it is retried after a short back-off until the timeout; so
    is a listener that is not there yet, for *wait* seconds (as zmq's connect
    waits for its peer to bind).
    """
    path = check_path(path)
    appear_by = time.monotonic() + wait
    transports: list[Transport]
    if transport is not None:
        transports = [transport]
    elif default_transport() == "seqpacket":
        transports = ["seqpacket", "stream"]
    else:
        transports = ["stream"]
    for index, kind in enumerate(transports):
        sock = new_socket(kind)
        try:
            sock.setblocking(False)
            while True:
                try:
                    sock.connect(path)
                except (BlockingIOError, InterruptedError):
                    yield Wait.BACKOFF
                    continue
                break
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EPROTOTYPE and index + 1 < len(transports):
                continue
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED) and time.monotonic() < appear_by:
                yield Wait.BACKOFF
                return (yield from connect(path, transport, wait=appear_by - time.monotonic()))
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                reason = "no such file" if exc.errno == errno.ENOENT else "a stale socket"
                raise ConnectionRefused(f"nobody listens at {path} ({reason})") from exc
            with os_errors(f"connecting to {path}"):
                raise
        except BaseException:
            sock.close()
            raise
        return sock
    raise AssertionError("unreachable: the last transport either connects or raises")


def accept(listener: socket.socket) -> Op[socket.socket]:
    """The next connection on a non-blocking listening socket."""
    while True:
        if listener.fileno() < 0:
            raise BlobClosed("the listener was closed")
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            yield Wait.READABLE
            continue
        except ConnectionAbortedError:
            continue  # that client gave up before we accepted; try the next one
        except OSError as exc:
            with os_errors("accepting a connection"):
                raise exc from None
        return sock
