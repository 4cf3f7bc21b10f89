"""The sans-I/O control protocol: a table of cases fed whole, byte by byte and with trailing
data, the writer's refusals, and property tests of the decoder against any input."""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobplane import BlobId, BlobToken
from blobplane.errors import LocalProtocolError, RemoteProtocolError
from blobplane.wire import (
    MAX_FDS_PER_MESSAGE,
    NEED_DATA,
    Ack,
    BlobHandoff,
    Connection,
    ErrorReply,
    Framing,
    Message,
    PeerClosed,
    Received,
    State,
    UserPayload,
)
from blobplane.wire.frames import Limits
from blobplane.wire.messages import MAX_REQUEST_ID

Chunk = tuple[bytes, tuple[int, ...]]


@dataclass
class FakeFds:
    """Stand-in fd numbers, so the machine's closes can be counted without touching real fds."""

    closed: list[int] = field(default_factory=list)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(10_000))

    def new(self, count: int = 1) -> tuple[int, ...]:
        return tuple(next(self._numbers) for _ in range(count))

    def close(self, fd: int) -> None:
        assert fd >= 10_000, f"the machine closed fd {fd}, which it was never given"
        assert fd not in self.closed, f"fd {fd} closed twice"
        self.closed.append(fd)


def connection(fake: FakeFds, framing: Framing = "stream", **limits: int) -> Connection:
    return Connection(framing, close_fd=fake.close, **limits)


def frame(
    payload: bytes,
    fd_count: int = 0,
    *,
    magic: bytes = b"BP",
    version: int = 1,
    length: int | None = None,
) -> bytes:
    """A frame built by hand, so it can be wrong in any way a test wants."""
    size = len(payload) if length is None else length
    return struct.pack(">2sBBI", magic, version, fd_count, size) + payload


def packed(fields: object) -> bytes:
    return msgspec.msgpack.encode(fields)


@dataclass
class Outcome:
    """What a connection made of some input: its events, then how it ended."""

    events: list[tuple[Message, tuple[int, ...]]]
    ended: str  # "closed" (clean end of stream), "need-data" or "error"
    error: str = ""
    # The fds the connection was given (input after an error is never fed).
    fed: list[int] = field(default_factory=list, compare=False)

    @property
    def handed_out(self) -> list[int]:
        return [fd for _, fds in self.events for fd in fds]


def drain(conn: Connection, events: list[tuple[Message, tuple[int, ...]]]) -> str:
    """Collect events until the connection needs data; "closed" at a clean end."""
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return "need-data"
        if isinstance(event, PeerClosed):
            return "closed"
        assert isinstance(event, Received)
        events.append((event.message, event.fds))


def feed(conn: Connection, chunks: Iterable[Chunk], *, eof: bool = True) -> Outcome:
    """Feed *chunks* one receive_data() at a time, as a driver does; a protocol error ends it."""
    events: list[tuple[Message, tuple[int, ...]]] = []
    fed: list[int] = []
    ended = "need-data"
    try:
        for data, fds in chunks:
            fed += fds
            conn.receive_data(data, fds)
            ended = drain(conn, events)
        if eof:
            conn.receive_data(b"")
            ended = drain(conn, events)
    except RemoteProtocolError as exc:
        return Outcome(events, "error", str(exc), fed)
    return Outcome(events, ended, fed=fed)


def split(data: bytes, fds_at: dict[int, tuple[int, ...]], cuts: Sequence[int]) -> list[Chunk]:
    """Cut *data* at *cuts*; the fds of a frame ride with the chunk holding its first byte."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    chunks: list[Chunk] = []
    for start, end in itertools.pairwise(bounds):
        fds = tuple(
            fd for offset in sorted(fds_at) if start <= offset < end for fd in fds_at[offset]
        )
        chunks.append((data[start:end], fds))
    return chunks


# -- the table ------------------------------------------------------------------------

TOKEN = BlobToken(BlobId.new(), 4096, 1000)


@dataclass
class Valid:
    """Messages the peer sends (each with its fd count), all of which must arrive intact."""

    name: str
    sent: list[tuple[Message, int]]
    # Handoffs this side sends first, so that the peer has something to answer.
    prelude: list[Message] = field(default_factory=list)


VALID = [
    Valid("payload", [(UserPayload(data=b"hello"), 0)]),
    Valid("empty payload", [(UserPayload(), 0)]),
    Valid("payload with fds", [(UserPayload(data=b"x"), 3)]),
    Valid("payload with the most fds", [(UserPayload(), MAX_FDS_PER_MESSAGE)]),
    Valid("handoff", [(BlobHandoff(token=TOKEN, meta=b"sha256:..."), 1)]),
    Valid("ack", [(Ack(reply_to=1), 0)], prelude=[BlobHandoff(token=TOKEN)]),
    Valid(
        "refusal",
        [(ErrorReply(reply_to=1, code="not-sealed", message="no seals"), 0)],
        prelude=[BlobHandoff(token=TOKEN)],
    ),
    Valid("connection error", [(ErrorReply(reply_to=0, code="protocol-error"), 0)]),
    Valid(
        "a conversation",
        [
            (UserPayload(data=b"a"), 0),
            (BlobHandoff(token=TOKEN), 1),
            (Ack(reply_to=1), 0),
            (UserPayload(data=b"b" * 1000), 2),
            (BlobHandoff(token=TOKEN), 1),
        ],
        prelude=[BlobHandoff(token=TOKEN)],
    ),
]


@dataclass
class Encoded:
    frames: list[tuple[bytes, tuple[int, ...]]]
    receiver: Connection
    messages: list[Message]

    @property
    def data(self) -> bytes:
        return b"".join(data for data, _ in self.frames)

    def fds_at(self) -> dict[int, tuple[int, ...]]:
        offsets = itertools.accumulate((len(d) for d, _ in self.frames), initial=0)
        return {offset: fds for offset, (_, fds) in zip(offsets, self.frames, strict=False)}


def encode(case: Valid, fake: FakeFds, framing: Framing) -> Encoded:
    """Encode *case* with a real sending connection, after the receiver's prelude."""
    sender, receiver = Connection(framing), connection(fake, framing)
    for message in case.prelude:
        data, fds = receiver.send(message, fake.new(1))
        sender.receive_data(data, fds)
        # The event hands the fake fds out, so the sender's os.close never sees them.
        assert isinstance(sender.next_event(), Received)
    frames, messages = [], []
    for message, fd_count in case.sent:
        fds = fake.new(fd_count)
        data, sent_fds = sender.send(message, fds)
        assert sent_fds == fds
        frames.append((data, fds))
        messages.append(msgspec.structs.replace(message, id=sender.next_id() - 1))
    return Encoded(frames, receiver, messages)


def expected(encoded: Encoded) -> list[tuple[Message, tuple[int, ...]]]:
    return [
        (message, fds) for message, (_, fds) in zip(encoded.messages, encoded.frames, strict=True)
    ]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_datagrams_arrive_whole(case: Valid) -> None:
    fake = FakeFds()
    encoded = encode(case, fake, "datagram")
    outcome = feed(encoded.receiver, encoded.frames)
    assert outcome == Outcome(expected(encoded), "closed")
    assert encoded.receiver.their_state is State.CLOSED


@pytest.mark.parametrize("mode", ["all at once", "byte by byte", "in pairs"])
@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_stream_arrives_whole_however_it_is_cut(case: Valid, mode: str) -> None:
    fake = FakeFds()
    encoded = encode(case, fake, "stream")
    data = encoded.data
    step = {"all at once": len(data), "byte by byte": 1, "in pairs": 2}[mode]
    chunks = split(data, encoded.fds_at(), range(0, len(data), step))
    outcome = feed(encoded.receiver, chunks)
    assert outcome == Outcome(expected(encoded), "closed")
    assert fake.closed == []


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_trailing_data_waits_for_the_rest_of_its_frame(case: Valid) -> None:
    fake = FakeFds()
    encoded = encode(case, fake, "stream")
    *complete, (last, last_fds) = encoded.frames
    head, tail = last[: len(last) // 2], last[len(last) // 2 :]
    receiver = encoded.receiver
    before = feed(receiver, [*complete, (head, last_fds)], eof=False)
    assert before == Outcome(expected(encoded)[:-1], "need-data")
    assert receiver.owned_fds == len(last_fds)
    after = feed(receiver, [(tail, ())])
    assert after == Outcome(expected(encoded)[-1:], "closed")


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_end_of_stream_inside_a_frame_is_a_truncated_frame(case: Valid) -> None:
    fake = FakeFds()
    encoded = encode(case, fake, "stream")
    data = encoded.data[:-1]
    outcome = feed(encoded.receiver, split(data, encoded.fds_at(), []))
    assert outcome.ended == "error"
    assert "truncated frame" in outcome.error
    assert outcome.events == expected(encoded)[:-1]
    assert sorted(fake.closed) == sorted(encoded.frames[-1][1])


# -- what the reader refuses --------------------------------------------------------------


def payload_bytes(**fields: Any) -> bytes:
    return packed({"type": "payload", "id": 1, "data": b"x", **fields})


def handoff_bytes(**fields: Any) -> bytes:
    token = {"id": {"uuid": TOKEN.id.uuid.bytes}, "size": 4096, "lease_ms": None}
    return packed({"type": "handoff", "id": 1, "token": token, "kind": "memfd", "fds": 1, **fields})


@dataclass
class Invalid:
    name: str
    # Each entry is what the peer sent with one sendmsg(): bytes and a count of fds.
    sent: list[tuple[bytes, int]]
    error: str
    framings: tuple[Framing, ...] = ("datagram", "stream")
    # On a stream, more data completes what was cut short: no longer this violation.
    only_at_end: bool = False


INVALID = [
    Invalid("garbage", [(b"hello, world!", 0)], "not a blobplane frame"),
    Invalid("version 2", [(frame(payload_bytes(), version=2), 0)], "version mismatch.*version 2"),
    Invalid("oversize frame", [(frame(b"", length=70_000), 0)], "over the maximum frame size"),
    Invalid("truncated header", [(b"BP\x01", 0)], "truncated frame", only_at_end=True),
    Invalid(
        "truncated payload",
        [(frame(payload_bytes())[:-2], 0)],
        "truncated frame",
        only_at_end=True,
    ),
    Invalid(
        "unknown type", [(frame(packed({"type": "teleport", "id": 1})), 0)], "unknown message type"
    ),
    Invalid("not msgpack", [(frame(b"\xc1"), 0)], "malformed message"),
    Invalid("not a map", [(frame(packed([1, 2, 3])), 0)], "malformed message"),
    Invalid("missing field", [(frame(packed({"type": "ack", "id": 1})), 0)], "reply_to"),
    Invalid("unknown field", [(frame(payload_bytes(color="red")), 0)], "unknown field"),
    Invalid("request id 0", [(frame(payload_bytes(id=0)), 0)], "malformed message.*id"),
    Invalid(
        "negative blob size",
        [(frame(handoff_bytes(token={"id": {"uuid": "x"}, "size": -1}), 1), 1)],
        "malformed message",
    ),
    Invalid("unknown kind", [(frame(handoff_bytes(kind="pipe"), 1), 1)], "malformed.*kind"),
    Invalid("fd announced, none came", [(frame(handoff_bytes(), 1), 0)], "fd count mismatch"),
    Invalid("fd came unannounced", [(frame(payload_bytes(), 0), 1)], "fd count mismatch"),
    Invalid(
        "handoff without its fd", [(frame(handoff_bytes(), 0), 0)], "fd count mismatch.*needs 1"
    ),
    Invalid(
        "memfd with two fds", [(frame(handoff_bytes(fds=2), 2), 2)], "a memfd descriptor takes 1"
    ),
    Invalid("more fds than announced", [(frame(handoff_bytes(), 1), 3)], "fd count mismatch"),
    Invalid(
        "more fds than the maximum",
        [(frame(payload_bytes(), 17), 17)],
        "over the per-message maximum of 16",
    ),
    Invalid(
        "a flood of fds", [(frame(payload_bytes(), 1), 40)], "over the per-message maximum of 16"
    ),
    Invalid("fds without bytes", [(b"", 2)], "fd count mismatch|truncated frame"),
    Invalid(
        "ack of nothing",
        [(frame(packed({"type": "ack", "id": 1, "reply_to": 9})), 0)],
        "acknowledges request 9, which is not a handoff",
    ),
    Invalid(
        "reply to the future",
        [(frame(packed({"type": "error", "id": 1, "reply_to": 9, "code": "x"})), 0)],
        "answers request 9",
    ),
    Invalid(
        "replayed id",
        [(frame(payload_bytes(id=5)), 0), (frame(payload_bytes(id=5)), 0)],
        "request id 5 after 5; ids must increase",
    ),
    Invalid(
        "two frames in one datagram",
        [(frame(payload_bytes()) + frame(payload_bytes(id=2)), 0)],
        "trailing data",
        framings=("datagram",),
    ),
]

MODES: dict[Framing, tuple[str, ...]] = {
    # A datagram cannot be cut: its modes are whole, or followed by another one.
    "datagram": ("all at once", "with trailing data"),
    "stream": ("all at once", "byte by byte", "with trailing data"),
}
CASES = [
    pytest.param(case, framing, mode, id=f"{case.name}-{framing}-{mode}")
    for case in INVALID
    for framing in case.framings
    for mode in MODES[framing]
    if not (case.only_at_end and framing == "stream" and mode == "with trailing data")
]
TRAILER = frame(payload_bytes(id=99))


def invalid_chunks(case: Invalid, fake: FakeFds, framing: Framing, mode: str) -> list[Chunk]:
    sent = [(data, fake.new(count)) for data, count in case.sent]
    if framing == "datagram":
        return [*sent, (TRAILER, ())] if mode == "with trailing data" else sent
    data = b"".join(d for d, _ in sent)
    offsets = itertools.accumulate((len(d) for d, _ in sent), initial=0)
    fds_at: dict[int, tuple[int, ...]] = {}
    for offset, (_, fds) in zip(offsets, sent, strict=False):
        fds_at[offset] = fds_at.get(offset, ()) + fds
    if mode == "with trailing data":
        data += TRAILER
    step = 1 if mode == "byte by byte" else len(data) or 1
    chunks = split(data, fds_at, range(0, len(data), step))
    # Fds sent with no bytes at all arrive alone.
    return [(b"", fds_at[0])] if not data else chunks


@pytest.mark.parametrize(("case", "framing", "mode"), CASES)
def test_violations_are_remote_protocol_errors(case: Invalid, framing: Framing, mode: str) -> None:
    fake = FakeFds()
    receiver = connection(fake, framing)
    chunks = invalid_chunks(case, fake, framing, mode)
    outcome = feed(receiver, chunks)
    assert outcome.ended == "error", outcome
    assert re.search(case.error, outcome.error), outcome.error
    assert sorted(outcome.handed_out + fake.closed) == sorted(outcome.fed), "fds lost"
    assert receiver.their_state is State.ERROR
    assert receiver.owned_fds == 0
    # Sticky: the same error again, and later fds are closed on arrival.
    with pytest.raises(RemoteProtocolError, match=re.escape(outcome.error.split(" (")[0])):
        receiver.next_event()
    late = fake.new(2)
    receiver.receive_data(frame(payload_bytes(id=100), 2), late)
    assert set(late) <= set(fake.closed)


def test_after_a_remote_error_only_a_farewell_may_be_sent() -> None:
    fake = FakeFds()
    conn = connection(fake, "datagram")
    assert feed(conn, [(b"garbage!", ())]).ended == "error"
    with pytest.raises(LocalProtocolError, match="the peer is error"):
        conn.send(UserPayload(data=b"still there?"))
    data, _ = conn.send(ErrorReply(reply_to=0, code="protocol-error", message="garbage"))
    assert data.startswith(b"BP\x01\x00")
    assert conn.our_state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="this side is closed"):
        conn.send(ErrorReply(reply_to=0, code="protocol-error"))


# -- what the writer refuses ------------------------------------------------------------


@dataclass
class Refused:
    name: str
    message: Message
    fd_count: int
    error: str


REFUSED = [
    Refused("ack of nothing", Ack(reply_to=1), 0, "not a handoff from the peer"),
    Refused("handoff without fd", BlobHandoff(token=TOKEN), 0, "fd count mismatch"),
    Refused("reply with fds", ErrorReply(reply_to=0, code="x"), 1, "needs 0 fds"),
    Refused("too many fds", UserPayload(), 17, "per-message maximum is 16"),
    Refused("oversize", UserPayload(data=b"x" * 70_000), 0, "over the maximum frame size"),
    Refused("bad field", ErrorReply(reply_to=0, code="x" * 100), 0, "the peer would refuse"),
    Refused("id backwards", UserPayload(id=1), 0, "request id 1 after 5"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.name)
def test_illegal_sends_are_local_protocol_errors_and_sticky(case: Refused) -> None:
    fake = FakeFds()
    conn = connection(fake, "datagram")
    conn.send(UserPayload(id=5))
    with pytest.raises(LocalProtocolError, match=case.error):
        conn.send(case.message, fake.new(case.fd_count))
    assert conn.our_state is State.ERROR
    with pytest.raises(LocalProtocolError, match=case.error):
        conn.send(UserPayload())
    assert fake.closed == [], "fds passed to send() are only borrowed"


def test_replies_close_handoffs_and_the_number_open_is_limited() -> None:
    fake = FakeFds()
    ours, theirs = connection(fake, "datagram", max_open_handoffs=2), connection(fake, "datagram")
    for _ in range(2):
        data, fds = ours.send(BlobHandoff(token=TOKEN), fake.new())
        theirs.receive_data(data, fds)
        assert isinstance(theirs.next_event(), Received)
    assert ours.open_handoffs == {1, 2}
    with pytest.raises(LocalProtocolError, match="2 handoffs waiting for an answer"):
        ours.send(BlobHandoff(token=TOKEN), fake.new())
    for reply in (Ack(reply_to=2), ErrorReply(reply_to=1, code="not-sealed")):
        data, _ = theirs.send(reply)
        ours.receive_data(data)
        assert isinstance(ours.next_event(), Received)
    assert ours.open_handoffs == frozenset()


def test_close_releases_fds_of_an_incomplete_frame() -> None:
    fake = FakeFds()
    conn = connection(fake, "stream")
    fds = fake.new(2)
    conn.receive_data(frame(payload_bytes(), 2)[:5], fds)
    assert conn.next_event() is NEED_DATA
    assert conn.owned_fds == 2
    conn.close()
    assert sorted(fake.closed) == sorted(fds)
    assert conn.owned_fds == 0


def test_feeding_after_end_of_stream_is_a_driver_bug() -> None:
    fake = FakeFds()
    conn = connection(fake, "stream")
    assert feed(conn, []).ended == "closed"
    assert isinstance(conn.next_event(), PeerClosed)
    fds = fake.new()
    with pytest.raises(LocalProtocolError, match="after the end of stream"):
        conn.receive_data(b"more", fds)
    assert fake.closed == list(fds)


@pytest.mark.parametrize(("size", "fds"), [(8, 1), (2**33, 1), (1024, -1), (1024, 254)])
def test_limits_are_checked(size: int, fds: int) -> None:
    with pytest.raises(ValueError, match="max_"):
        Limits(size, fds)


def test_framing_must_be_known() -> None:
    with pytest.raises(ValueError, match="framing"):
        Connection("carrier pigeon")  # type: ignore[arg-type]


# -- properties -------------------------------------------------------------------------

no_fd_messages = st.one_of(
    st.builds(UserPayload, data=st.binary(max_size=64)),
    st.builds(
        ErrorReply, reply_to=st.just(0), code=st.text(max_size=8), message=st.text(max_size=8)
    ),
)
messages = st.one_of(
    st.builds(UserPayload, data=st.binary(max_size=64)),
    st.builds(BlobHandoff, token=st.just(TOKEN), meta=st.binary(max_size=16)),
    st.builds(
        ErrorReply, reply_to=st.just(0), code=st.text(max_size=8), message=st.text(max_size=8)
    ),
)


def fd_count_for(message: Message, draw_count: int) -> int:
    if isinstance(message, BlobHandoff):
        return 1
    if isinstance(message, UserPayload):
        return draw_count
    return 0


@st.composite
def streams(draw: st.DrawFn, *, fds: bool) -> tuple[bytes, dict[int, tuple[int, ...]]]:
    """Valid frames, perhaps damaged: garbage spliced in, a byte flipped, the end cut off.

    Without *fds*, no message carries any (so no handoffs), and cutting the
    stream anywhere must not change what it decodes to.
    """
    fake = FakeFds()
    sender = Connection("stream")
    data, fds_at = b"", {}
    kinds = messages if fds else no_fd_messages
    for message in draw(st.lists(kinds, max_size=5)):
        riding = fake.new(fd_count_for(message, draw(st.integers(0, 3)) if fds else 0))
        encoded, _ = sender.send(message, riding)
        if riding:
            fds_at[len(data)] = riding
        data += encoded
    damage = draw(st.sampled_from(["none", "splice", "flip", "cut"]))
    if data and damage != "none":
        at = draw(st.integers(0, len(data) - 1))
        if damage == "splice":
            data = data[:at] + draw(st.binary(min_size=1, max_size=12)) + data[at:]
            fds_at = {k if k < at else k + 1_000_000: v for k, v in fds_at.items()}
        elif damage == "flip":
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        else:
            data = data[:at]
    fds_at = {k: v for k, v in fds_at.items() if k < len(data)}
    return data, fds_at


def accounted(outcome: Outcome, fake: FakeFds) -> bool:
    """Every fd the connection was given was either handed out or closed, exactly once."""
    return sorted(outcome.handed_out + fake.closed) == sorted(outcome.fed)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=20))
def test_any_bytes_cut_anyhow_decode_the_same_or_raise_remote_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    whole = feed(connection(FakeFds()), [(data, ())] if data else [])
    pieces = feed(connection(FakeFds()), split(data, {}, cuts))
    # feed() turns only RemoteProtocolError into an outcome: anything else fails the test.
    assert pieces == whole


@settings(max_examples=300, deadline=None)
@given(stream=streams(fds=False), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_any_cut_of_frames_damaged_or_not_decodes_the_same(
    stream: tuple[bytes, dict[int, tuple[int, ...]]], cuts: list[int]
) -> None:
    data, _ = stream
    whole = feed(connection(FakeFds()), split(data, {}, []))
    pieces = feed(connection(FakeFds()), split(data, {}, cuts))
    assert pieces == whole


@settings(max_examples=300, deadline=None)
@given(stream=streams(fds=True), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_fds_ride_with_their_frames_however_the_stream_is_cut(
    stream: tuple[bytes, dict[int, tuple[int, ...]]], cuts: list[int]
) -> None:
    data, fds_at = stream
    whole_fds, cut_fds = FakeFds(), FakeFds()
    whole = feed(connection(whole_fds), split(data, fds_at, []))
    pieces = feed(connection(cut_fds), split(data, fds_at, cuts))
    assert accounted(whole, whole_fds)
    assert accounted(pieces, cut_fds)
    if whole.ended != "error":
        # Intact frames: fds ride with the chunk holding their frame's first byte.
        assert pieces == whole


@settings(max_examples=300, deadline=None)
@given(
    datagrams=st.lists(
        st.tuples(
            st.one_of(st.binary(max_size=64), st.builds(frame, st.binary(max_size=64))),
            st.integers(0, 20),
        ),
        max_size=6,
    )
)
def test_any_datagrams_decode_or_raise_remote_protocol_error(
    datagrams: list[tuple[bytes, int]],
) -> None:
    fake = FakeFds()
    chunks = [(data, fake.new(count)) for data, count in datagrams if data or count]
    assert accounted(feed(connection(fake, "datagram"), chunks), fake)


# -- receive_datagram: receive_data() and next_event() in one step ------------------------------


def take_datagrams(
    conn: Connection, datagrams: Iterable[tuple[bytes, tuple[int, ...], bool]], *, whole: bool
) -> list[object]:
    """Feed *datagrams* (data, fds, cut short) with `receive_datagram` if *whole*, else with
    `receive_data` and `next_event`; every event and error that came of it."""
    seen: list[object] = []
    for data, fds, truncated in datagrams:
        try:
            if whole:
                seen.append(conn.receive_datagram(data, list(fds), truncated=truncated))
            else:
                conn.receive_data(data, fds, truncated=truncated)
                seen.append(conn.next_event())
        except (LocalProtocolError, RemoteProtocolError) as exc:
            seen.append((type(exc).__name__, str(exc)))
    return seen


def both_ways(
    prelude: int, datagrams: list[tuple[bytes, int, bool]], queued: int = 0
) -> tuple[list[object], list[object]]:
    """What a datagram connection makes of *datagrams* taken whole and taken in two steps.

    *prelude*: handoffs this side sent first, for Acks to answer. *queued*: datagrams
    fed with `receive_data` before the rest, so that the rest line up behind them.
    """
    outcomes = []
    for whole in (True, False):
        fake = FakeFds()
        conn = connection(fake, "datagram")
        for _ in range(prelude):
            conn.frame(BlobHandoff(token=TOKEN), 1)
        numbered = [(data, fake.new(count), cut) for data, count, cut in datagrams]
        for data, fds, cut in numbered[:queued]:
            conn.receive_data(data, fds, truncated=cut)
        seen = take_datagrams(conn, numbered[queued:], whole=whole)
        fed = [fd for _, fds, _ in numbered for fd in fds]
        handed = [fd for event in seen if isinstance(event, Received) for fd in event.fds]
        outcomes.append(
            [*seen, conn.their_state, conn.open_handoffs, conn.owned_fds, sorted(fake.closed)]
        )
        if not queued:
            assert sorted(handed + fake.closed) == sorted(fed), "fds lost"
    return outcomes[0], outcomes[1]


def ack_bytes(request_id: int, reply_to: int) -> bytes:
    return frame(msgspec.msgpack.encode(Ack(id=request_id, reply_to=reply_to)))


DATAGRAM_CASES = {
    "the usual round trip": (1, [(ack_bytes(1, 1), 0, False)]),
    "an ack with an fd": (1, [(ack_bytes(1, 1), 1, False)]),
    "an ack cut short": (1, [(ack_bytes(1, 1), 0, True)]),
    "an ack of nothing": (0, [(ack_bytes(1, 1), 0, False)]),
    "an id used twice": (1, [(frame(payload_bytes()), 0, False), (ack_bytes(1, 1), 0, False)]),
    "the end of stream, then more": (1, [(b"", 0, False), (ack_bytes(1, 1), 0, False)]),
    "after a protocol error": (1, [(b"not a frame at all", 0, False), (ack_bytes(1, 1), 0, False)]),
    "the last id, then one more": (
        1,
        [
            (frame(payload_bytes(id=MAX_REQUEST_ID)), 0, False),
            (ack_bytes(MAX_REQUEST_ID, 1), 0, False),
        ],
    ),
    "a handoff and its fd": (0, [(frame(handoff_bytes(), 1), 1, False)]),
    "fds alone": (0, [(b"", 2, False)]),
}


@pytest.mark.parametrize("queued", [0, 1], ids=["alone", "behind a queued datagram"])
@pytest.mark.parametrize("case", DATAGRAM_CASES.values(), ids=DATAGRAM_CASES.keys())
def test_a_datagram_taken_whole_is_taken_as_in_two_steps(
    case: tuple[int, list[tuple[bytes, int, bool]]], queued: int
) -> None:
    prelude, datagrams = case
    if queued:
        datagrams = [(frame(payload_bytes(id=1)), 0, False), *datagrams]
    whole, in_two_steps = both_ways(prelude, datagrams, queued)
    assert whole == in_two_steps


@settings(max_examples=300, deadline=None)
@given(
    prelude=st.integers(0, 2),
    datagrams=st.lists(
        st.tuples(
            st.one_of(
                st.binary(max_size=32),
                st.builds(frame, st.binary(max_size=32)),
                st.builds(ack_bytes, st.integers(1, 4), st.integers(1, 3)),
                st.builds(lambda i: frame(payload_bytes(id=i)), st.integers(1, 4)),
                st.builds(lambda i: frame(handoff_bytes(id=i), 1), st.integers(1, 4)),
            ),
            st.integers(0, 3),
            st.booleans(),
        ),
        max_size=6,
    ),
)
def test_any_datagrams_taken_whole_are_taken_as_in_two_steps(
    prelude: int, datagrams: list[tuple[bytes, int, bool]]
) -> None:
    whole, in_two_steps = both_ways(prelude, datagrams)
    assert whole == in_two_steps


def test_frame_and_send_give_the_same_bytes_and_record_the_same() -> None:
    """`send` is `frame` with the bytes copied out: the same frame, the same ids."""
    by_frame, by_send = connection(FakeFds(), "datagram"), connection(FakeFds(), "datagram")
    sent: list[tuple[Message, tuple[int, ...]]] = [
        (UserPayload(data=b"a"), ()),
        (BlobHandoff(token=TOKEN), (3,)),
        (UserPayload(data=b"b"), (4, 5)),
    ]
    for message, fds in sent:
        framed, buffer = by_frame.frame(message, len(fds))
        data, sent_fds = by_send.send(message, fds)
        assert bytes(buffer) == data
        assert sent_fds == fds
        assert framed.id == by_send.next_id() - 1
    assert by_frame.open_handoffs == by_send.open_handoffs == frozenset({2})


# -- answers built ahead: prepare_ack / ack_for and expect_ack ---------------------------------

# Steps of a conversation between a sender S and a receiver R over datagrams. "r:prepare" and the
# expectation set up by "s:handoff" happen only when answers are built ahead.
AHEAD_SCRIPTS = {
    "the usual round trip": ["r:prepare", "s:handoff", "r:recv", "r:ack", "s:recv"],
    "a payload before the ack": ["s:handoff", "r:recv", "r:payload", "r:ack", "s:recv", "s:recv"],
    "the receiver spoke after preparing": [
        *("r:prepare", "r:payload", "s:handoff", "r:recv", "r:ack", "s:recv", "s:recv"),
    ],
    "another request before the handoff": [
        *("r:prepare", "s:payload", "s:handoff", "r:recv", "r:recv", "r:ack", "s:recv"),
    ],
    "two handoffs, the later one expected": [
        *("s:handoff", "s:handoff", "r:recv", "r:recv", "r:ack", "r:ack", "s:recv", "s:recv"),
    ],
    "the expected ack replayed": [
        *("r:prepare", "s:handoff", "r:recv", "r:ack", "s:recv", "s:replay"),
    ],
    "something sent between the ack's making and its sending": [
        *("r:prepare", "s:handoff", "r:recv", "r:ack-late", "s:recv", "s:recv"),
    ],
}


def converse(script: list[str], *, ahead: bool) -> list[object]:
    """Run *script*; every frame sent, every event or error received, and the end states."""
    fake = FakeFds()
    sender, receiver = connection(fake, "datagram"), connection(fake, "datagram")
    to_receiver: list[tuple[bytes, tuple[int, ...]]] = []
    to_sender: list[bytes] = []
    handoffs: list[int] = []
    seen: list[object] = []
    last = b""

    for step in script:
        if step == "r:prepare" and ahead:
            receiver.prepare_ack()
        elif step == "s:handoff":
            handoff, frame_sent = sender.frame(BlobHandoff(token=TOKEN), 1, validate=False)
            to_receiver.append((bytes(frame_sent), fake.new()))
            seen.append(bytes(frame_sent))
            if ahead:
                sender.expect_ack(handoff.id)
        elif step in ("s:payload", "r:payload"):
            side = sender if step == "s:payload" else receiver
            _, frame_sent = side.frame(UserPayload(data=b"news"))
            if side is sender:
                to_receiver.append((bytes(frame_sent), ()))
            else:
                to_sender.append(bytes(frame_sent))
            seen.append(bytes(frame_sent))
        elif step == "r:recv":
            data, fds = to_receiver.pop(0)
            event = receiver.receive_datagram(data, list(fds))
            assert isinstance(event, Received)
            if isinstance(event.message, BlobHandoff):
                handoffs.append(event.message.id)
            seen.append(event)
        elif step in ("r:ack", "r:ack-late"):
            handoff_id = handoffs.pop(0)
            ack = receiver.ack_for(handoff_id) if ahead else Ack(reply_to=handoff_id)
            if step == "r:ack-late":  # another thread's send goes first
                _, frame_sent = receiver.frame(UserPayload(data=b"first"))
                to_sender.append(bytes(frame_sent))
            _, frame_sent = receiver.frame(ack, validate=False)
            to_sender.append(bytes(frame_sent))
            seen.append(bytes(frame_sent))
        elif step in ("s:recv", "s:replay"):
            last = to_sender.pop(0) if step == "s:recv" else last
            try:
                seen.append(sender.receive_datagram(last, []))
            except RemoteProtocolError as exc:
                seen.append(("remote error", str(exc)))
    seen += [*to_receiver, *to_sender]  # nothing should be left, and the same either way
    seen += [sender.open_handoffs, sender.their_state, receiver.our_state, fake.closed]
    return seen


@pytest.mark.parametrize("script", AHEAD_SCRIPTS.values(), ids=AHEAD_SCRIPTS.keys())
def test_answers_built_ahead_change_nothing_but_the_work(script: list[str]) -> None:
    """Every frame, event, error and state is the same with `prepare_ack`, `ack_for` and
    `expect_ack` as without them."""
    assert converse(script, ahead=True) == converse(script, ahead=False)


def test_answers_built_ahead_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual round trip neither encodes the Ack on its way out nor decodes it on its way in:
    only the state machine sees it."""
    fake = FakeFds()
    sender, receiver = connection(fake, "datagram"), connection(fake, "datagram")
    receiver.prepare_ack()
    handoff, frame_sent = sender.frame(BlobHandoff(token=TOKEN), 1, validate=False)
    sender.expect_ack(handoff.id)
    assert isinstance(receiver.receive_datagram(bytes(frame_sent), list(fake.new())), Received)

    def refuse(*args: object) -> None:
        raise AssertionError("encoded or decoded although it was done ahead")

    with monkeypatch.context() as patched:
        patched.setattr("blobplane.wire.connection.encode_message_into", refuse)
        patched.setattr("blobplane.wire.connection.DECODER", refuse)
        _, ack_frame = receiver.frame(receiver.ack_for(handoff.id), validate=False)
        reply = sender.receive_datagram(bytes(ack_frame), [])
    assert reply == Received(Ack(id=1, reply_to=1))
    assert sender.open_handoffs == frozenset()


@pytest.mark.parametrize(
    "case", ["with an fd", "cut short", "behind a queued datagram", "after the last id"]
)
def test_an_expected_ack_that_is_illegal_is_refused_as_without(case: str) -> None:
    """The frame `expect_ack` built, arriving where the checks would refuse it or queue it."""
    outcomes = []
    for ahead in (True, False):
        fake = FakeFds()
        sender = connection(fake, "datagram")
        handoff, _ = sender.frame(BlobHandoff(token=TOKEN), 1, validate=False)
        ack_id = 1
        if case == "behind a queued datagram":
            sender.receive_data(frame(payload_bytes()))
            ack_id = 2
        elif case == "after the last id":
            sender.receive_datagram(frame(payload_bytes(id=MAX_REQUEST_ID)), [])
            ack_id = MAX_REQUEST_ID + 1
        if ahead:
            sender.expect_ack(handoff.id)
        fds = list(fake.new()) if case == "with an fd" else []
        seen: list[object] = []
        try:
            seen.append(
                sender.receive_datagram(ack_bytes(ack_id, 1), fds, truncated=case == "cut short")
            )
            seen.append(sender.next_event())
        except RemoteProtocolError as exc:
            seen.append(str(exc))
        outcomes.append([*seen, sender.open_handoffs, sender.their_state, fake.closed])
    assert outcomes[0] == outcomes[1]
