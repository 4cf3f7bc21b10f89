"""A broker client at the socket level, for sending what no client of this library would.

`RawConnection` speaks the documented frames by hand: an 8-byte header
(`blobplane.wire.frames.HEADER`), a msgpack wire message, and the fds beside
it with SCM_RIGHTS. Nothing is checked on the way out, so a test can send a
frame whose header lies about its fds, a Put with two fds, a request before
hello, or bytes that are no frame at all. Nothing blocks either: a send the
socket has no room for is dropped (the connection then is one that does not
read its replies), and receiving waits only as long as it is told.

Fds: those passed to a send are only borrowed (the kernel copies them into
the message); every fd that comes back is closed at once, unless the caller
asked to keep the one riding with a given reply.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from blobplane.broker import protocol
from blobplane.broker.protocol import Reply, Request
from blobplane.errors import BlobError
from blobplane.wire.frames import HEADER, HEADER_SIZE, MAGIC, VERSION
from blobplane.wire.messages import ErrorReply, Message, UserPayload, decode_message

__all__ = ["RawConnection", "Received", "frame"]

_WIRE = msgspec.msgpack.Encoder(uuid_format="bytes")
_MAX_DATAGRAM = 70_000
_ANCILLARY = socket.CMSG_SPACE(253 * array.array("i").itemsize)
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def frame(payload: bytes, fd_count: int) -> bytes:
    """A datagram: the header announcing *fd_count* fds, then *payload*."""
    return HEADER.pack(MAGIC, VERSION, fd_count, len(payload)) + payload


@dataclass
class Received:
    """What one datagram from the broker was: a reply, an ErrorReply, or undecodable."""

    reply: Reply | None = None
    error: ErrorReply | None = None
    fds: list[int] = field(default_factory=list)  # kept only when asked for


class RawConnection:
    """One SOCK_SEQPACKET connection to the broker, driven by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(5.0)
            self.sock.connect(path)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.wire_id = 0  # ids of wire messages must increase
        self.rid = 0  # broker request ids; any positive number the client picks
        self.ended = False  # the broker hung up (or said it would)
        self.dropped = 0  # datagrams the socket had no room for

    # -- sending ---------------------------------------------------------------------------

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def send_datagram(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send *data* as one datagram with *fds*; False if dropped or the broker is gone."""
        if self.ended or self.sock.fileno() < 0:
            return False
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            self.sock.sendmsg([data], ancillary, _SEND_FLAGS)
        except BlockingIOError:
            self.dropped += 1
            return False
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.ended = True
                return False
            raise
        return True

    def send_message(
        self, message: Message | dict[str, object], fds: Sequence[int] = (), header_fds: int = -1
    ) -> bool:
        """A wire message (a struct, or a dict encoded as it stands) in a frame of its own.

        The next wire id is filled in; *header_fds* makes the header announce
        another number of fds than ride with it.
        """
        self.wire_id += 1
        if isinstance(message, dict):
            message = {**message, "id": self.wire_id}
        else:
            message = msgspec.structs.replace(message, id=self.wire_id)
        count = len(fds) if header_fds < 0 else header_fds
        return self.send_datagram(frame(_WIRE.encode(message), count), fds)

    def send_request(self, request: Request | bytes, fds: Sequence[int] = ()) -> bool:
        """A broker request (or any bytes in its place) inside a UserPayload."""
        data = request if isinstance(request, bytes) else protocol.encode(request)
        return self.send_message(UserPayload(data=data), fds)

    # -- receiving -------------------------------------------------------------------------

    def receive(self, timeout: float, keep_fds_of: Iterable[int] = ()) -> Received | None:
        """The next datagram within *timeout* seconds, or None (nothing came, or the end).

        The fds that ride with it are closed, unless it answers a request id
        in *keep_fds_of*.
        """
        if self.ended or self.sock.fileno() < 0:
            return None
        if timeout > 0:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return None
        try:
            data, ancillary, _flags, _ = self.sock.recvmsg(
                _MAX_DATAGRAM, _ANCILLARY, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                self.ended = True
                return None
            raise
        fds = _fds_of(ancillary)
        if not data and not fds:
            self.ended = True
            return None
        received = _decode(data)
        reply = received.reply
        keep = set(keep_fds_of)
        if reply is not None and getattr(reply, "rid", None) in keep:
            received.fds = fds
        else:
            for fd in fds:
                os.close(fd)
        if received.error is not None or (isinstance(reply, protocol.Refused) and reply.rid == 0):
            self.ended = True  # the broker says it hangs up
        return received

    def drain(self, keep_fds_of: Iterable[int] = ()) -> list[Received]:
        """Everything already waiting on the socket, without waiting for more."""
        got = []
        while (received := self.receive(0, keep_fds_of)) is not None:
            got.append(received)
        return got

    def wait_for(
        self, rid: int, timeout: float, keep_fds_of: Iterable[int] = ()
    ) -> tuple[Received | None, list[Received]]:
        """Read until the reply to *rid* (or the end, or *timeout*); also what came before it."""
        deadline = time.monotonic() + timeout
        seen: list[Received] = []
        while not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            received = self.receive(left, keep_fds_of)
            if received is None:
                continue
            seen.append(received)
            if received.reply is not None and getattr(received.reply, "rid", None) == rid:
                return received, seen
        return None, seen

    def close(self) -> None:
        self.ended = True
        self.sock.close()


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def _decode(data: bytes) -> Received:
    if len(data) < HEADER_SIZE:
        return Received()
    try:
        message = decode_message(data[HEADER_SIZE:])
    except BlobError:
        return Received()
    if isinstance(message, ErrorReply):
        return Received(error=message)
    if not isinstance(message, UserPayload):
        return Received()
    try:
        return Received(reply=protocol.decode_reply(message.data))
    except BlobError:
        return Received()
