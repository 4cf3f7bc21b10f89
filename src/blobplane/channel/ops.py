"""Every channel operation, written once as a generator that yields what it waits for.

An operation yields `Wait.READABLE`, `Wait.WRITABLE` or `Wait.BACKOFF` when
it cannot go on, and returns its result. The sync driver answers a wait
with poll(), the asyncio driver with add_reader/add_writer; a timeout or a
cancellation closes the generator, whose `finally` and `with` blocks undo
what is half done. So both flavours share every rule below and cannot
drift apart.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from stat import S_ISREG
from types import TracebackType
from typing import Self

from blobplane.backends.checks import SIZE_SEALS, check_received_fd, fully_allocated
from blobplane.backends.mapping import map_readonly
from blobplane.blobs import MappedRead, ProducerBlob
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
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import BlobToken, UnixFd
from blobplane.wire import Ack, BlobHandoff, ErrorCode, ErrorReply, Message, Received, SlotRef
from blobplane.wire.messages import MAX_ERROR_TEXT, MAX_META

__all__ = [
    "Handoff",
    "accept",
    "await_reply",
    "connect",
    "loan_slot",
    "receive",
    "receive_handoff",
    "send_blob",
    "settle_handoff",
    "transmit",
]


@dataclass(frozen=True, slots=True)
class Handoff:
    """A received blob: its token, the sender's metadata, and the read-only mapping.

    The receiver owns `blob` (a `MappedRead`); leaving the `with` block closes it.
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


def transmit(
    core: ChannelCore, message: Message, fds: Sequence[int] = (), *, validate: bool = True
) -> Op[int]:
    """Send one message and its fds, waiting for room; returns its request id.

    *validate* False skips re-checking a message this module built itself.
    """
    with core.sending:
        return (yield from transmit_locked(core, message, fds, validate=validate))


def transmit_locked(
    core: ChannelCore, message: Message, fds: Sequence[int], *, validate: bool
) -> Op[int]:
    """`transmit` for a caller that holds `core.sending` already."""
    framed: tuple[Message, bytes | bytearray] | None
    framed = core.frame_now(message, fds, validate=validate)
    if framed is None:
        while not core.send_owed():
            yield Wait.WRITABLE
        framed = core.encode(message, fds, validate=validate)
    message, data = framed
    yield from send_frame(core, message, data, fds)
    return message.id


def send_frame(
    core: ChannelCore,
    message: Message,
    data: bytes | bytearray,
    fds: Sequence[int],
    start: int = 0,
) -> Op[None]:
    """Send an encoded frame (recorded as sent by the wire) from byte *start* on, waiting for room.

    The caller holds `core.sending`. A send cut short undoes or breaks what
    it must (`ChannelCore.interrupted_send`).
    """
    view = memoryview(data)[start:]
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
            core.interrupted_send(message, sent_any=len(view) < len(data))


def sendable_fd(blob: ProducerBlob | PoolLoan) -> int:
    """The fd to hand over, if *blob* is one a receiver will accept: a sealed memfd or a slot."""
    fd = blob.fileno()  # BlobClosed once cleaned up
    if isinstance(blob, PoolLoan):
        return fd  # sealed against resizing and outside writers when the pool made it
    if not isinstance(blob.descriptor, UnixFd):
        raise NotSendable(
            f"blob {blob.id} is a {type(blob.descriptor).__name__} blob; only memfd blobs "
            "travel over a channel (create it with BlobBackend.MEMFD)"
        )
    if not blob.sealed:
        raise NotSendable(
            f"blob {blob.id} is not sealed; call blob.seal() before send_blob(), since a "
            "receiver refuses a memfd its sender could still resize"
        )
    return fd


def handoff_fd(blob: ProducerBlob | PoolLoan, meta: bytes) -> int:
    """The checks before a handoff goes out: the fd to send (`sendable_fd`), *meta*'s size."""
    fd = sendable_fd(blob)
    if len(meta) > MAX_META:
        raise InvalidSize(f"meta holds {len(meta)} bytes; a handoff carries at most {MAX_META}")
    return fd


def send_blob(core: ChannelCore, blob: ProducerBlob | PoolLoan, meta: bytes, wait: bool) -> Op[int]:
    """Hand *blob* over; with *wait*, return once the peer replied (or raise `PeerRefused`).

    A plain blob is answered once the peer mapped it. A pool slot is answered
    once the peer released it: the slot is held for the peer until then, so
    closing the loan right after a ``wait=False`` send is safe.
    """
    fd = handoff_fd(blob, meta)
    slot = None
    if isinstance(blob, PoolLoan):
        slot = SlotRef(blob.pool.id.uuid, blob.slot, blob.generation)
    # Built from a live token and checked meta: valid already.
    handoff = BlobHandoff(token=blob.token, meta=bytes(meta), slot=slot)
    if not wait:
        return (yield from _transmit_handoff(core, handoff, blob, fd))
    core.check_usable()
    with core.receiving:
        request_id = yield from _transmit_handoff(core, handoff, blob, fd)
        return (yield from await_reply(core, request_id, blob))


def await_reply(core: ChannelCore, request_id: int, blob: ProducerBlob | PoolLoan) -> Op[int]:
    """Wait for the reply to handoff *request_id* (see `is_reply`); the caller holds `receiving`."""
    while True:
        received = core.poll_received(queued=False)
        while received is None:
            yield Wait.READABLE
            received = core.poll_received(queued=False)
        if is_reply(core, received, request_id, blob):
            return request_id


def is_reply(
    core: ChannelCore, received: Received, request_id: int, blob: ProducerBlob | PoolLoan
) -> bool:
    """Whether *received* is the Ack of handoff *request_id*; raise `PeerRefused` for a refusal.

    Anything else is kept for `recv()` (`ChannelCore.defer`). The caller holds `core.receiving`.
    """
    match received.message:
        case Ack(reply_to=reply_to) if reply_to == request_id:
            return True
        case ErrorReply(reply_to=reply_to, code=code, message=text) if reply_to in (
            0,
            request_id,
        ):
            what = "the handoff" if reply_to else "the connection"
            raise PeerRefused(
                f"the peer refused {what} of blob {blob.id}: {text} ({code})",
                code=code,
                reply_to=reply_to,
            )
        case _:
            core.defer(received)
            return False


def _transmit_handoff(
    core: ChannelCore, handoff: BlobHandoff, blob: ProducerBlob | PoolLoan, fd: int
) -> Op[int]:
    if not isinstance(blob, PoolLoan):
        return (yield from transmit(core, handoff, (fd,), validate=False))
    blob.pool.retain(blob.slot)
    try:
        request_id = yield from transmit(core, handoff, (fd,), validate=False)
    except BaseException:
        blob.pool.release(blob.slot)
        raise
    core.pooled_out[request_id] = (blob.pool, blob.slot)
    return request_id


def loan_slot(core: ChannelCore, pool: BlobPool) -> Op[PoolLoan]:
    """A free slot of *pool*, taking in the peer's releases while none is free.

    Other messages that arrive meanwhile are kept for `recv()`.
    """
    while True:
        loan = pool.try_loan()
        if loan is not None:
            return loan
        core.check_usable()
        with core.receiving:
            received = core.poll_received(queued=False)
            if received is None:
                yield Wait.READABLE
                continue
            if not isinstance(received.message, Ack | ErrorReply):
                core.defer(received)


# -- receiving -----------------------------------------------------------------------


def _next(core: ChannelCore) -> Op[Received]:
    received = core.poll_received()
    while received is None:
        yield Wait.READABLE
        received = core.poll_received()
    return received


def receive(core: ChannelCore) -> Op[tuple[Message, tuple[int, ...]]]:
    """The next message of any kind and its fds, which the caller owns from now on."""
    core.check_usable()
    with core.receiving:
        received = yield from _next(core)
    return received.message, received.fds


_REFUSAL_CODES: tuple[tuple[type[BlobError], ErrorCode], ...] = (
    (WrongKind, ErrorCode.WRONG_KIND),
    (NotSealed, ErrorCode.NOT_SEALED),
    (DescriptorTooShort, ErrorCode.TOO_SHORT),
    (TooManyOpenFiles, ErrorCode.TOO_MANY_OPEN_FILES),
)


def _map(core: ChannelCore, handoff: BlobHandoff, fds: tuple[int, ...]) -> MappedRead | BlobError:
    """Map the handed-over fd after the sealing checks; the fds are closed either way.

    A pool slot is mapped once and kept (`SlotCache`); what is returned then
    owes the sender its reply when it is closed.
    """
    try:
        size = handoff.token.size
        if handoff.slot is not None:
            owed = Ack(reply_to=handoff.id)
            return core.slot_cache.view(
                handoff.slot,
                fds[0],
                size,
                lambda: core.owe_reply(owed),
                allow_sparse=core.allow_sparse,
            )
        fd = fds[0]
        mapped = map_sealed(fd, size, core.allow_sparse)
        if mapped is not None:
            return MappedRead(mapped, size)
        # What map_descriptor(UnixFd(fd), size) does, minus its layers: the
        # token's size was checked when it was decoded.
        check_received_fd(fd, size, allow_sparse=core.allow_sparse)
        return MappedRead(map_readonly(fd, size), size)
    except BlobError as exc:
        return exc
    except (ValueError, OverflowError) as exc:
        # mmap's own refusals: a size the checks let through but no address space takes.
        return InvalidSize(f"cannot map the {handoff.token.size} bytes of a blob: {exc}")
    finally:
        for fd in fds:
            os.close(fd)


# `map_sealed` runs between a handoff's arrival and its Ack: module globals
# instead of a module's attribute, each looked up on every handoff.
_fstat = os.fstat
_fcntl = fcntl.fcntl
_F_GET_SEALS = fcntl.F_GET_SEALS
_mmap = mmap.mmap
_ACCESS_READ = mmap.ACCESS_READ


def map_sealed(fd: int, size: int, allow_sparse: bool = False) -> mmap.mmap | None:
    """*size* bytes of *fd* mapped read-only if it passes the sealing checks; else None.

    The checks of `check_received_fd` as one predicate: a regular file of at
    least *size* (> 0) bytes, sealed against resizing, its pages allocated
    (unless *allow_sparse*). None for anything
    else (or any OSError): the full path (`_map`) then checks again and
    says precisely what is wrong. The caller still owns and closes *fd*.
    """
    if size:
        try:
            # Seals before size, as in `check_received_fd`: a size read before the seal
            # could be shrunk by the sender in between.
            if _fcntl(fd, _F_GET_SEALS) & SIZE_SEALS == SIZE_SEALS:
                info = _fstat(fd)
                if (
                    S_ISREG(info.st_mode)
                    and info.st_size >= size
                    and (allow_sparse or fully_allocated(fd, info))
                ):
                    return _mmap(fd, size, access=_ACCESS_READ)
        except (OSError, ValueError, OverflowError):
            pass
    return None


def refusal(handoff: BlobHandoff, error: BlobError) -> ErrorReply:
    """The ErrorReply that refuses *handoff* for *error*."""
    code = next(
        (code for kind, code in _REFUSAL_CODES if isinstance(error, kind)), ErrorCode.CANNOT_MAP
    )
    return ErrorReply(reply_to=handoff.id, code=code, message=str(error)[:MAX_ERROR_TEXT])


def take_handoff(
    core: ChannelCore, received: Received
) -> tuple[BlobHandoff, MappedRead | BlobError]:
    """The handoff in *received*, mapped (or the check's error); the caller holds `receiving`.

    Anything but a handoff is put back for `recv()` and `UnexpectedMessage` raised.
    """
    handoff = received.message
    if type(handoff) is not BlobHandoff:
        core.unread(received)
        raise UnexpectedMessage(
            f"expected a blob handoff, received {type(handoff).__name__} {handoff.id}; "
            "it is left for recv()"
        )
    return handoff, _map(core, handoff, received.fds)


def receive_handoff(core: ChannelCore) -> Op[Handoff]:
    """The next blob, mapped read-only after the sealing checks, and acknowledged.

    A descriptor that fails the checks is closed, the peer gets an
    `ErrorReply`, and the check's error (an `UnsafeDescriptor`) is raised; the
    channel stays usable. Anything but a handoff is left for `recv()` and
    `UnexpectedMessage` is raised.
    """
    core.check_usable()
    with core.receiving:
        received = core.poll_received()
        while received is None:
            yield Wait.READABLE
            received = core.poll_received()
        return (yield from settle_handoff(core, received))


def settle_handoff(core: ChannelCore, received: Received) -> Op[Handoff]:
    """`receive_handoff` once *received* is in: check, map, answer (the caller holds `receiving`).

    Anything but a handoff is put back for `recv()` and `UnexpectedMessage` raised.
    """
    handoff, result = take_handoff(core, received)
    reply: Message | None
    if isinstance(result, MappedRead):
        # A pool slot is answered when it is released (see `_map`).
        reply = None if handoff.slot is not None else Ack(reply_to=handoff.id)
    else:
        reply = refusal(handoff, result)
    try:
        if reply is not None:
            yield from transmit(core, reply, validate=False)
    except ConnectionClosed:
        # The sender is gone; a mapped blob stays valid (memfd semantics).
        # Later sends report the closed connection, and receives do once
        # whatever the sender sent before it left has been read.
        if not isinstance(result, MappedRead):
            raise result from None
    except BaseException:
        if isinstance(result, MappedRead):
            result.close()
        raise
    if not isinstance(result, MappedRead):
        raise result
    return Handoff(handoff.token, handoff.meta, result, handoff.id)


# -- connecting ----------------------------------------------------------------------


def connect(path: str, transport: Transport | None) -> Op[socket.socket]:
    """A socket connected to the listener at *path*.

    With no *transport*, SOCK_SEQPACKET is tried first and SOCK_STREAM if the
    listener is of that type. A full listen backlog gives no readiness to
    wait for, so it is retried after a short back-off until the timeout.
    """
    path = check_path(path)
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
