"""`Connection`: the sans-I/O control protocol, fed bytes and fds, emitting events.

It imports nothing that touches a socket. A driver feeds it what it
received (`receive_data(data, fds)`, with ``b""`` for end of stream), asks
what happened (`next_event()`), and asks for the bytes and fds to transmit
for a message (`send(message, fds)`). States and limits are in `state`.

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
from blobplane.types import BlobToken
from blobplane.wire.events import NEED_DATA, Event, PeerClosed, Received
from blobplane.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_FDS_PER_MESSAGE,
    MAX_FRAME_SIZE,
    VERSION,
    DatagramFramer,
    Frame,
    Limits,
    StreamFramer,
    pack_header,
)
from blobplane.wire.messages import (
    _DECODER,
    _ENCODER,
    FDS_PER_KIND,
    MAX_REQUEST_ID,
    Ack,
    BlobHandoff,
    ErrorReply,
    Message,
    UserPayload,
    decode_message,
    encode_message_into,
)
from blobplane.wire.state import (
    MAX_OPEN_HANDOFFS,
    State,
    check_send_state,
    describe,
    new_directions,
)

__all__ = ["Connection", "Framing"]

# A module global: `State.OPEN` is a class attribute lookup, on every message.
_OPEN = State.OPEN
_new_event = object.__new__
_set_field = object.__setattr__  # what a frozen dataclass's __init__ calls

Framing: TypeAlias = Literal["datagram", "stream"]


def _ack_frame(request_id: int, reply_to: int) -> tuple[Ack, bytearray]:
    """An Ack and its whole frame: a pure function of the two ids."""
    ack = Ack(id=request_id, reply_to=reply_to)
    buffer = bytearray(HEADER_SIZE)
    _ENCODER.encode_into(ack, buffer, HEADER_SIZE)
    HEADER.pack_into(buffer, 0, MAGIC, VERSION, 0, len(buffer) - HEADER_SIZE)
    return ack, buffer


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
        self._ours, self._theirs = new_directions(max_open_handoffs)
        # For the fast lanes: plain attributes, read on every message.
        self._datagrams = self._framer if isinstance(self._framer, DatagramFramer) else None
        self._max_fds = self.limits.max_fds
        self._max_frame_size = self.limits.max_frame_size
        self._remote_error = ""
        self._local_error = ""
        # Replies built ahead, while this side waits anyway (`expect_ack`,
        # `prepare_ack`): each is used once, and only if it is exactly what
        # would be decoded or built then.
        self._expected_ack: tuple[bytes, Received] | None = None
        self._prepared_ack: tuple[Ack, bytearray] | None = None

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
        if self._theirs.state is not State.OPEN:
            for fd in owned:
                self._close_quietly(fd)
            if self._theirs.state is State.CLOSED and (data or owned):
                raise LocalProtocolError("receive_data() after the end of stream was fed")
            return
        self._framer.feed(data, owned, truncated)

    @property
    def has_buffered(self) -> bool:
        """Whether `next_event()` may report something without more data being fed.

        False means it would say NEED_DATA: a driver can read from its socket first.
        """
        datagrams = self._datagrams
        if datagrams is not None:  # `has_frames`, read inline: asked before every wait
            return self._theirs.state is not _OPEN or bool(datagrams._queue) or datagrams._eof
        return self._theirs.state is not _OPEN or self._framer.has_frames

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, fds: list[int], *, truncated: bool = False
    ) -> Event:
        """`receive_data()` then `next_event()` for one whole datagram, in one step.

        The fast lane of datagram framing: a well-formed frame carrying a
        message that is legal now is decoded straight from *data* (which may
        be a view of a buffer the driver reuses: nothing refers to it after
        this returns), without the framer's queue and its copies; the Ack
        that `expect_ack` built is not even decoded, only compared. Anything
        else (a violation, the end of stream, something already buffered)
        replays through `receive_data()` and `next_event()`, so the checks,
        errors and fd ownership are theirs, exactly.
        """
        theirs = self._theirs
        framer = self._datagrams
        expected = self._expected_ack
        if expected is not None:
            self._expected_ack = None
            if not fds and data == expected[0]:
                event = self._take_expected_ack(expected[1], truncated)
                if event is not None:
                    return event
        nfds = len(fds)
        size = len(data)
        if (
            truncated
            or size < HEADER_SIZE
            or theirs.state is not _OPEN
            or framer is None
            # `framer.has_frames`, read inline: a property call shows on a cold path.
            or framer._queue
            or framer._eof
        ):
            return self._replay(data, fds, truncated)
        magic, version, fd_count, length = HEADER.unpack_from(data)
        if (
            magic != MAGIC
            or version != VERSION
            or fd_count != nfds
            or nfds > self._max_fds
            or HEADER_SIZE + length != size
            or size > self._max_frame_size
        ):
            return self._replay(data, fds, truncated)
        try:
            message: Message = _DECODER.decode(data[HEADER_SIZE:])
        except Exception:  # whatever msgspec refuses: decode_message says why, in the replay
            return self._replay(data, fds, truncated)
        # Per message type, what `Direction.check` verifies; any doubt replays.
        ours = self._ours
        kind = type(message)
        if message.id <= theirs.last_id:
            return self._replay(data, fds, truncated)
        if kind is BlobHandoff:
            handoff: BlobHandoff = message  # type: ignore[assignment]
            if (
                nfds != handoff.fds
                or FDS_PER_KIND.get(handoff.kind) != nfds
                or len(theirs.open_handoffs) >= theirs.max_open_handoffs
            ):
                return self._replay(data, fds, truncated)
            theirs.open_handoffs.add(message.id)
        elif kind is Ack:
            reply_to = message.reply_to  # type: ignore[union-attr]
            if nfds or reply_to not in ours.open_handoffs:
                return self._replay(data, fds, truncated)
            ours.open_handoffs.discard(reply_to)
        elif kind is ErrorReply:
            reply_to = message.reply_to  # type: ignore[union-attr]
            if nfds or reply_to > ours.last_id:
                return self._replay(data, fds, truncated)
            ours.open_handoffs.discard(reply_to)
        elif kind is not UserPayload:
            return self._replay(data, fds, truncated)
        theirs.last_id = message.id
        # Received(message, fds) without the dataclass's generated __init__, a
        # Python frame that shows on a cold path (the fields are set as it would).
        received = _new_event(Received)
        _set_field(received, "message", message)
        _set_field(received, "fds", tuple(fds) if fds else ())
        return received

    def _take_expected_ack(self, received: Received, truncated: bool) -> Received | None:
        """*received* (the Ack `expect_ack` built) if it is legal now, as the decoder would find."""
        theirs = self._theirs
        framer = self._datagrams
        ack: Ack = received.message  # type: ignore[assignment]
        ours = self._ours
        if (
            truncated
            or theirs.state is not _OPEN
            or framer is None
            or framer._queue
            or framer._eof
            or ack.id <= theirs.last_id
            or ack.id > MAX_REQUEST_ID  # a peer that used the last id has none left
            or ack.reply_to not in ours.open_handoffs
        ):
            return None
        ours.open_handoffs.discard(ack.reply_to)
        theirs.last_id = ack.id
        return received

    def _replay(
        self, data: bytes | bytearray | memoryview, fds: list[int], truncated: bool
    ) -> Event:
        # bytes(): the general path queues the datagram, and *data* may be reused.
        self.receive_data(bytes(data), fds, truncated=truncated)
        return self.next_event()

    def next_event(self) -> Event:
        """The next complete event: `Received`, `PeerClosed`, or `NEED_DATA`.

        Raises `RemoteProtocolError` if the peer broke the protocol, every
        time from then on.
        """
        if self._theirs.state is State.ERROR:
            raise RemoteProtocolError(self._remote_error)
        if self._theirs.state is State.CLOSED:
            return PeerClosed()
        frame: Frame | None = None
        try:
            frame = self._framer.next_frame()
            if frame is None:
                if self._framer.at_eof:
                    self._theirs.state = State.CLOSED
                    return PeerClosed()
                return NEED_DATA
            message = decode_message(frame.payload)
            self._theirs.check(message, len(frame.fds), self._ours, self.limits.max_fds)
        except RemoteProtocolError as exc:
            self._theirs.state = State.ERROR
            self._remote_error = f"{exc} (the connection is in an error state since)"
            if frame is not None:
                for fd in frame.fds:
                    self._close_quietly(fd)
            self._framer.close_all()
            raise
        self._theirs.commit(message, self._ours)
        return Received(message, tuple(frame.fds))

    # -- sending -----------------------------------------------------------------

    def next_id(self) -> int:
        """The id the next request should carry."""
        return self._ours.last_id + 1

    def send(
        self, message: Message, fds: Sequence[int] = (), *, validate: bool = True
    ) -> tuple[bytes, tuple[int, ...]]:
        """The bytes and fds that carry *message*; one sendmsg() per call keeps them together.

        A message built with id 0 gets `next_id()`. Raises `LocalProtocolError`
        if the protocol forbids sending it, every time from then on. The
        fields of a Struct built in Python are not type-checked by msgspec, so
        the encoded message is decoded once more to refuse here what the peer
        would refuse; a driver may skip that (*validate* False) for messages
        it builds itself from values that are valid already.
        """
        if self._ours.state is State.ERROR:
            raise LocalProtocolError(self._local_error)
        if message.id == 0:
            message = msgspec.structs.replace(message, id=self.next_id())
        # Refused for the state alone (the peer broke the protocol, or we closed):
        # nothing of ours was wrong, so our side stays able to say goodbye.
        check_send_state(message, self._ours, self._theirs)
        try:
            if len(fds) > self.limits.max_fds:
                raise LocalProtocolError(
                    f"cannot send {len(fds)} fds with one message; "
                    f"the per-message maximum is {self.limits.max_fds}"
                )
            self._ours.check(message, len(fds), self._theirs, self.limits.max_fds)
            buffer = bytearray(HEADER_SIZE)
            encode_message_into(message, buffer, HEADER_SIZE)
            if len(buffer) > self.limits.max_frame_size:
                raise LocalProtocolError(
                    f"{describe(message)} encodes to a {len(buffer)}-byte frame, over the "
                    f"maximum frame size of {self.limits.max_frame_size} bytes"
                )
            if validate:
                self._validate_own(message, memoryview(buffer)[HEADER_SIZE:])
        except LocalProtocolError as exc:
            if self._ours.state is State.OPEN:
                self._ours.state = State.ERROR
            self._local_error = f"{exc} (the connection is in an error state since)"
            raise
        pack_header(buffer, len(fds))
        self._ours.commit(message, self._theirs)
        if self._theirs.state is State.ERROR and isinstance(message, ErrorReply):
            self._ours.state = State.CLOSED  # the farewell: nothing may follow it
        return bytes(buffer), tuple(fds)

    def frame_trusted(
        self, message: Message, fd_count: int, *, validate: bool = False
    ) -> bytearray | None:
        """`send()`'s fast lane: the frame for *message*, or None to go through `send()`.

        *message* carries its id already (`next_id()`). When both directions
        are open and the message is legal now (the checks of
        `Direction.check`, per message type), it is encoded with its header
        in place and recorded as sent, as `send()` would; the caller transmits
        the bytearray as it is. Anything unusual (a closed or failed
        direction, an illegal message, an oversized frame, an ErrorReply)
        returns None with nothing recorded, and `send()` then applies the
        rules and raises their errors. *validate* as in `send()`.
        """
        ours = self._ours
        theirs = self._theirs
        if (
            ours.state is not _OPEN
            or theirs.state is not _OPEN
            or message.id <= ours.last_id
            or fd_count > self._max_fds
        ):
            return None
        kind = type(message)
        if kind is BlobHandoff:
            handoff: BlobHandoff = message  # type: ignore[assignment]
            if (
                fd_count != handoff.fds
                or FDS_PER_KIND.get(handoff.kind) != fd_count
                or len(ours.open_handoffs) >= ours.max_open_handoffs
            ):
                return None
        elif kind is Ack:
            if fd_count or message.reply_to not in theirs.open_handoffs:  # type: ignore[union-attr]
                return None
        elif kind is not UserPayload:
            return None
        buffer = bytearray(HEADER_SIZE)
        _ENCODER.encode_into(message, buffer, HEADER_SIZE)
        length = len(buffer)
        if length > self._max_frame_size:
            return None
        if validate:
            try:
                decode_message(memoryview(buffer)[HEADER_SIZE:])
            except RemoteProtocolError:
                return None
        HEADER.pack_into(buffer, 0, MAGIC, VERSION, fd_count, length - HEADER_SIZE)
        # What Direction.commit records, per type.
        ours.last_id = message.id
        if kind is BlobHandoff:
            ours.open_handoffs.add(message.id)
        elif kind is Ack:
            theirs.open_handoffs.discard(message.reply_to)  # type: ignore[union-attr]
        return buffer

    def frame_handoff(self, token: BlobToken, meta: bytes) -> tuple[BlobHandoff, bytearray] | None:
        """`frame_trusted()` for a plain-blob handoff with one fd, built here with `next_id()`.

        *token* comes from a live blob and *meta* is checked against
        `MAX_META` by the caller: the handoff is valid by construction.
        Returns None, with nothing recorded, whenever `frame_trusted()` would.
        """
        ours = self._ours
        if (
            ours.state is not _OPEN
            or self._theirs.state is not _OPEN
            or self._max_fds < 1
            or len(ours.open_handoffs) >= ours.max_open_handoffs
        ):
            return None
        handoff = BlobHandoff(id=ours.last_id + 1, token=token, meta=meta)
        buffer = bytearray(HEADER_SIZE)
        _ENCODER.encode_into(handoff, buffer, HEADER_SIZE)
        length = len(buffer)
        if length > self._max_frame_size:
            return None
        HEADER.pack_into(buffer, 0, MAGIC, VERSION, 1, length - HEADER_SIZE)
        ours.last_id = handoff.id
        ours.open_handoffs.add(handoff.id)
        return handoff, buffer

    # A handoff's round trip, one request and its Ack, is the latency users
    # see. Each side builds, while it waits, the Ack frame it expects to
    # receive or to send next; the frame is then compared or sent in place of
    # decoding or encoding on the way. Built from the current request ids, it
    # is used only while they still say the same thing, else dropped.

    def expect_ack(self, handoff_id: int) -> None:
        """Build the frame of the peer's Ack of our handoff *handoff_id*, as its next message.

        The next datagram `receive_datagram` is given, if byte for byte that
        frame and legal then, is taken without decoding; anything else
        decodes as usual.
        """
        ack, frame = _ack_frame(self._theirs.last_id + 1, handoff_id)
        received = _new_event(Received)
        _set_field(received, "message", ack)
        _set_field(received, "fds", ())
        self._expected_ack = (bytes(frame), received)

    def prepare_ack(self) -> None:
        """Build the frame of our Ack of the peer's next request, if that is a handoff.

        `frame_ack` returns it if the ids it was built from still hold: the
        handoff it answers is the one predicted, and we sent nothing since.
        """
        self._prepared_ack = _ack_frame(self._ours.last_id + 1, self._theirs.last_id + 1)

    def frame_ack(self, reply_to: int) -> tuple[Ack, bytearray] | None:
        """`frame_trusted()` for our Ack of the peer's handoff *reply_to*.

        The frame `prepare_ack` built, if its ids still hold; else built now.
        None, with nothing recorded, if *reply_to* is not a handoff of the
        peer's waiting for its answer or anything else is unusual.
        """
        ours = self._ours
        theirs = self._theirs
        if (
            ours.state is not _OPEN
            or theirs.state is not _OPEN
            or reply_to not in theirs.open_handoffs
        ):
            return None
        prepared, self._prepared_ack = self._prepared_ack, None
        if (
            prepared is None
            or prepared[0].id != ours.last_id + 1
            or prepared[0].reply_to != reply_to
        ):
            prepared = _ack_frame(ours.last_id + 1, reply_to)
        ack, buffer = prepared
        ours.last_id = ack.id
        theirs.open_handoffs.discard(reply_to)
        return ack, buffer

    def frame_payload(self, data: bytes) -> tuple[UserPayload, bytearray] | None:
        """`frame_trusted()` for a `UserPayload` of *data* without fds, built here.

        None, with nothing recorded, if a direction is not open or the frame
        would be over the maximum frame size: `send()` then says why.
        """
        ours = self._ours
        if ours.state is not _OPEN or self._theirs.state is not _OPEN:
            return None
        payload = UserPayload(id=ours.last_id + 1, data=data)
        buffer = bytearray(HEADER_SIZE)
        _ENCODER.encode_into(payload, buffer, HEADER_SIZE)
        length = len(buffer)
        if length > self._max_frame_size:
            return None
        HEADER.pack_into(buffer, 0, MAGIC, VERSION, 0, length - HEADER_SIZE)
        ours.last_id = payload.id
        return payload, buffer

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
        if self._ours.state is State.OPEN:
            self._ours.state = State.CLOSED
        if self._theirs.state is State.OPEN:
            self._theirs.state = State.CLOSED

    def _close_quietly(self, fd: int) -> None:
        try:
            self._close_fd(fd)
        except OSError:
            pass
