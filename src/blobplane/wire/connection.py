"""`Connection`: the sans-I/O control protocol, fed bytes and fds, emitting events.

It imports nothing that touches a socket. A driver feeds it what it
received (`receive_data(data, fds)`, with ``b""`` for end of stream) and
asks what happened (`next_event()`), or does both in one step for a whole
datagram (`receive_datagram`); it asks for the frame that carries a message
(`frame(message, fd_count)`, or `send(message, fds)` for bytes and fds).
The rules are in `state` (what may be sent and received when), `frames`
(the framing and its limits) and `messages` (the codec).

Fd ownership: fds passed to `receive_data` belong to the connection until
`next_event` hands them out in a `Received` event; every fd of a rejected
message, and everything still held after an error or `close()`, is closed
with the `close_fd` callback (os.close by default; tests pass a recorder).
Fds passed to `send` are only borrowed: they are returned, not closed.

Not thread-safe: one driver owns it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, TypeAlias

import msgspec

from blobplane.errors import LocalProtocolError, RemoteProtocolError
from blobplane.wire.events import NEED_DATA, Event, PeerClosed, Received
from blobplane.wire.frames import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_FRAME_SIZE,
    DatagramFramer,
    Limits,
    StreamFramer,
    datagram_payload,
    pack_header,
)
from blobplane.wire.messages import (
    DECODE_ERRORS,
    DECODER,
    MAX_REQUEST_ID,
    Ack,
    ErrorReply,
    Message,
    UserPayload,
    decode_error,
    decode_message,
    encode_message_into,
)
from blobplane.wire.state import (
    MAX_OPEN_HANDOFFS,
    Direction,
    State,
    describe,
    may_send,
    new_directions,
    send_state_error,
)

__all__ = ["Connection", "Framing"]

# Module globals: an Enum member is a class attribute lookup, on every message.
_OPEN = State.OPEN
_CLOSED = State.CLOSED
_ERROR = State.ERROR

Framing: TypeAlias = Literal["datagram", "stream"]


class Connection:
    """One end of a control connection, either framing: "datagram" (SEQPACKET) or "stream"."""

    def __init__(
        self,
        framing: Framing = "datagram",
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_fds: int = MAX_FDS_PER_MESSAGE,
        max_open_handoffs: int = MAX_OPEN_HANDOFFS,
        close_fd: Callable[[int], None] = os.close,
    ) -> None:
        self.framing = framing
        self.limits = Limits(max_frame_size, max_fds)
        self._close_fd = close_fd
        if framing == "datagram":
            self._framer: DatagramFramer | StreamFramer = DatagramFramer(self.limits, close_fd)
        elif framing == "stream":
            self._framer = StreamFramer(self.limits, close_fd)
        else:
            raise ValueError(f"framing must be 'datagram' or 'stream', not {framing!r}")
        self._datagram = framing == "datagram"
        self._max_frame_size = self.limits.max_frame_size
        self._max_fds = self.limits.max_fds
        # The most bytes a `UserPayload` carries in one frame: the frame's limit
        # less the header and the rest of the largest such message (the largest
        # id, and a 32-bit length where the empty payload's has 8 bits).
        empty = bytearray()
        encode_message_into(UserPayload(id=MAX_REQUEST_ID, data=b""), empty)
        self.payload_limit = max(0, self._max_frame_size - HEADER_SIZE - len(empty) - 3)
        self._ours, self._theirs = new_directions(max_open_handoffs)
        # What may be sent in the directions' states (`SEND_ALLOWED`), looked up
        # again whenever one changes (`_set_state`), not for every message.
        self._may_send = may_send(self._ours, self._theirs)
        self._remote_error = ""
        self._local_error = ""
        # The next datagram, predicted (`expect_ack`): its bytes, and what the
        # framing and decoding checks made of them.
        self._expected: tuple[bytes, Message] | None = None
        # Our next message, predicted (`prepare_ack`): an Ack and its frame.
        self._prepared: tuple[Ack, bytearray] | None = None

    @property
    def our_state(self) -> State:
        return self._ours.state

    @property
    def their_state(self) -> State:
        return self._theirs.state

    @property
    def open_handoffs(self) -> frozenset[int]:
        """Ids of the handoffs we sent that the peer has not answered yet."""
        return frozenset(self._ours.open_handoffs)

    # -- receiving ---------------------------------------------------------------

    def receive_data(
        self,
        data: bytes | bytearray | memoryview,
        fds: Iterable[int] = (),
        *,
        truncated: bool = False,
    ) -> None:
        """Feed what the transport received: bytes (b"" at end of stream) and the fds with them.

        Takes ownership of *fds* at once, whatever happens next. *truncated*
        says the transport cut a datagram short (MSG_TRUNC).
        """
        owned = list(fds)
        if self._theirs.state is not _OPEN:
            for fd in owned:
                self._close_quietly(fd)
            if self._theirs.state is _CLOSED and (data or owned):
                raise LocalProtocolError("receive_data() after the end of stream was fed")
            return
        self._framer.feed(data, owned, truncated)

    @property
    def has_buffered(self) -> bool:
        """Whether `next_event()` may report something without more data being fed.

        False means it would say NEED_DATA: a driver can read from its socket first.
        """
        return self._theirs.state is not _OPEN or self._framer.has_frames

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, fds: list[int], *, truncated: bool = False
    ) -> Event:
        """`receive_data()` then `next_event()` for one whole datagram (datagram framing).

        The event it makes of *data*, which may be a view of a buffer the
        driver reuses: nothing refers to it after this returns. Takes
        ownership of *fds*. A datagram that cannot be taken at once (the end
        of stream, one behind others still buffered, or anything after the
        peer's error) is fed and asked for, as those two calls would.
        """
        if (
            not data
            or not self._datagram
            or self._theirs.state is not _OPEN
            or self._framer.has_frames
        ):
            # bytes(): the framer queues it, and *data* may be reused.
            self.receive_data(bytes(data), fds, truncated=truncated)
            return self.next_event()
        expected, self._expected = self._expected, None
        try:  # `_accept`, in line: every datagram takes this path
            if expected is not None and not fds and not truncated and data == expected[0]:
                message = expected[1]  # these very bytes passed the two checks below
            else:
                payload = datagram_payload(data, len(fds), truncated, self.limits)
                try:
                    message = DECODER.decode(payload)  # `decode_message`, in line
                except DECODE_ERRORS as exc:
                    raise decode_error(exc) from exc
            self._theirs.record(message, len(fds), self._ours, self._max_fds)
        except RemoteProtocolError as exc:
            self._remote_failure(exc, fds)
            raise
        return Received(message, tuple(fds))

    def expect_ack(self, handoff_id: int) -> None:
        """Get ready for the peer's Ack of our handoff *handoff_id* as its next datagram.

        A handoff's round trip is the latency users see, and this side waits
        for its reply anyway: so the frame the peer's Ack will be is built now
        and put through the checks that depend on its bytes alone (framing and
        decoding, pure functions of the bytes and the limits). If the next
        datagram is that frame byte for byte, `receive_datagram` skips those
        two and applies only the state machine's checks (`Direction.record`);
        anything else takes the usual path.
        """
        if not self._datagram:
            return
        ack = Ack(id=self._theirs.last_id + 1, reply_to=handoff_id)
        try:
            frame = self._encoded(ack, 0)
            message = decode_message(datagram_payload(frame, 0, False, self.limits))
        except (LocalProtocolError, RemoteProtocolError):
            return  # not a frame the peer can send: nothing to expect
        self._expected = (bytes(frame), message)

    def next_event(self) -> Event:
        """The next complete event: `Received`, `PeerClosed`, or `NEED_DATA`.

        Raises `RemoteProtocolError` if the peer broke the protocol, every
        time from then on.
        """
        if self._theirs.state is _ERROR:
            raise RemoteProtocolError(self._remote_error)
        if self._theirs.state is _CLOSED:
            return PeerClosed()
        try:
            frame = self._framer.next_frame()
        except RemoteProtocolError as exc:
            self._remote_failure(exc, ())
            raise
        if frame is None:
            if self._framer.at_eof:
                self._set_state(self._theirs, _CLOSED)
                return PeerClosed()
            return NEED_DATA
        return self._accept(frame.payload, frame.fds)

    def _accept(self, payload: bytes | bytearray | memoryview, fds: list[int]) -> Received:
        """Decode a frame's payload, check it against the state machine, record it."""
        try:
            message = decode_message(payload)
            self._theirs.record(message, len(fds), self._ours, self._max_fds)
        except RemoteProtocolError as exc:
            self._remote_failure(exc, fds)
            raise
        return Received(message, tuple(fds))

    def _set_state(self, direction: Direction, state: State) -> None:
        """Every change of a direction's state goes through here, to keep `_may_send` true."""
        direction.state = state
        self._may_send = may_send(self._ours, self._theirs)

    def _remote_failure(self, exc: RemoteProtocolError, fds: Iterable[int]) -> None:
        """The peer broke the protocol: the sticky error state; every fd held is closed."""
        self._set_state(self._theirs, _ERROR)
        self._remote_error = f"{exc} (the connection is in an error state since)"
        for fd in fds:
            self._close_quietly(fd)
        self._framer.close_all()

    # -- sending -----------------------------------------------------------------

    def next_id(self) -> int:
        """The id the next request should carry."""
        return self._ours.last_id + 1

    def frame(
        self, message: Message, fd_count: int = 0, *, validate: bool = True
    ) -> tuple[Message, bytearray]:
        """*message* with its id, and the frame that carries it with *fd_count* fds.

        The frame is recorded as sent: the caller transmits it whole, with
        the fds in the same sendmsg() (or calls `abandon` if it cannot). A
        message built with id 0 gets `next_id()`, and so does one built by
        the driver (*validate* False) with an id another message has taken
        since: a driver builds with `next_id()`, so that the usual case makes
        no copy. Raises `LocalProtocolError` if the protocol forbids sending
        it, every time from then on. The fields of a Struct built in Python
        are not type-checked by msgspec, so the encoded message is decoded
        once more to refuse here what the peer would refuse; a driver may
        skip that (*validate* False) for messages it builds itself from
        values that are valid already.
        """
        ours = self._ours
        if ours.state is _ERROR:
            raise LocalProtocolError(self._local_error)
        next_id = ours.last_id + 1
        buffer: bytearray | None = None
        prepared = self._prepared
        if prepared is not None and message is prepared[0]:
            self._prepared = None
            if message.id == next_id:
                buffer = prepared[1]  # encoded and checked ahead (`prepare_ack`)
        if message.id != next_id and (message.id == 0 or not validate):
            # Numbered now: built with id 0, or built by the driver with the
            # `next_id()` of then, which something sent since has taken.
            message = msgspec.structs.replace(message, id=next_id)
        # Refused for the state alone (the peer broke the protocol, or we closed):
        # nothing of ours was wrong, so our side stays able to say goodbye.
        if type(message) not in self._may_send:
            raise send_state_error(message, ours, self._theirs)
        try:
            if buffer is None:
                buffer = self._encoded(message, fd_count)
            if validate:
                self._validate_own(message, memoryview(buffer)[HEADER_SIZE:])
            ours.record(message, fd_count, self._theirs, self._max_fds)
        except LocalProtocolError as exc:
            if ours.state is _OPEN:
                self._set_state(ours, _ERROR)
            self._local_error = f"{exc} (the connection is in an error state since)"
            raise
        if self._theirs.state is _ERROR and isinstance(message, ErrorReply):
            self._set_state(ours, _CLOSED)  # the farewell: nothing may follow it
        return message, buffer

    def _encoded(self, message: Message, fd_count: int) -> bytearray:
        """The frame of *message* with *fd_count* fds: header and payload, within the limits."""
        buffer = bytearray(HEADER_SIZE)
        encode_message_into(message, buffer, HEADER_SIZE)
        if len(buffer) > self._max_frame_size:
            raise LocalProtocolError(
                f"{describe(message)} encodes to a {len(buffer)}-byte frame, over the "
                f"maximum frame size of {self._max_frame_size} bytes"
            )
        pack_header(buffer, fd_count)
        return buffer

    def prepare_ack(self) -> None:
        """Build, while this side waits, the Ack it most likely sends next.

        The one of the peer's next request, as our next message: a receiver
        that answers a handoff as soon as it mapped it has that answer's
        frame ready (`ack_for`), and `frame` then applies only the rules that
        depend on the state (`SEND_ALLOWED`, `Direction.record`), not the
        encoding, done here.
        """
        ack = Ack(id=self._ours.last_id + 1, reply_to=self._theirs.last_id + 1)
        try:
            self._prepared = (ack, self._encoded(ack, 0))
        except LocalProtocolError:
            self._prepared = None  # a frame this side cannot send: nothing to prepare

    def ack_for(self, handoff_id: int) -> Ack:
        """The Ack of the peer's handoff *handoff_id*, to `frame`: the one `prepare_ack` built,
        if it answers that handoff and this side has sent nothing since.

        `frame` gives it the next id if something else goes first after all.
        """
        prepared = self._prepared
        if prepared is not None:
            ack = prepared[0]
            if ack.reply_to == handoff_id and ack.id == self._ours.last_id + 1:
                return ack
        return Ack(reply_to=handoff_id)

    def send(
        self, message: Message, fds: Sequence[int] = (), *, validate: bool = True
    ) -> tuple[bytes, tuple[int, ...]]:
        """The bytes and fds that carry *message* (see `frame`): one sendmsg() for both."""
        _, buffer = self.frame(message, len(fds), validate=validate)
        return bytes(buffer), tuple(fds)

    def abandon(self, message: Message) -> None:
        """The driver could not transmit *message* at all: stop waiting for its answer."""
        self._ours.open_handoffs.discard(message.id)

    @staticmethod
    def _validate_own(message: Message, payload: memoryview) -> None:
        # Structs built in Python are not validated; decoding our own bytes
        # refuses here what the peer would refuse there.
        try:
            decode_message(payload)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"the peer would refuse {describe(message)}: {exc}") from exc

    # -- teardown ----------------------------------------------------------------

    @property
    def owned_fds(self) -> int:
        """How many received fds the connection holds and has not handed out yet."""
        return self._framer.owned_fds

    def close(self) -> None:
        """Close every fd still held and refuse further use; closing twice is fine."""
        self._framer.close_all()
        if self._ours.state is _OPEN:
            self._set_state(self._ours, _CLOSED)
        if self._theirs.state is _OPEN:
            self._set_state(self._theirs, _CLOSED)

    def _close_quietly(self, fd: int) -> None:
        try:
            self._close_fd(fd)
        except OSError:
            pass
