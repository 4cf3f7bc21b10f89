"""Operations that complete at once and those that have to wait, against both flavours.

Every operation does its usual case at once (a datagram socket with room, a
plain sealed blob, a message already there) and continues as a generator
whenever a step would block. These tests build the unusual cases on purpose
(messages back to back, messages queued while a reply is awaited, a full
socket, a stream written in parts) and check the results, the request ids
and the fds; `test_channel_differential` compares the two paths at random.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgspec
import pytest

from blobplane import BlobBackend, ProducerBlob, SharedMemoryBlobs
from blobplane.channel import Channel
from blobplane.channel.core import ChannelCore
from blobplane.errors import (
    BlobClosed,
    InvalidSize,
    LocalProtocolError,
    RemoteProtocolError,
    Timeout,
    UnexpectedMessage,
)
from blobplane.wire import MAX_FRAME_SIZE, Ack, BlobHandoff, Connection, Received, UserPayload
from test_channel import WAIT, Driven, Flavour, flavour  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("no_leaks")

SMALL_BUFFER = 4096  # SO_SNDBUF: the kernel rounds it up to its minimum


@pytest.fixture
def blobs() -> Iterator[SharedMemoryBlobs]:
    with SharedMemoryBlobs(BlobBackend.MEMFD) as allocator:
        yield allocator


@pytest.fixture
def helper() -> Iterator[Callable[..., Future[Any]]]:
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit


@pytest.fixture
def pair(flavour: Flavour) -> Iterator[tuple[Driven, Channel]]:  # noqa: F811
    """(the channel under test, a blocking peer) over a SEQPACKET pair: the usual case."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer = Channel(right, timeout=WAIT)
    tested = flavour.wrap(left, timeout=WAIT)
    yield tested, peer
    tested.close()
    peer.close()


def sealed(blobs: SharedMemoryBlobs, data: bytes) -> ProducerBlob:
    blob = blobs.create(len(data))
    blob.write_all(data)
    blob.seal()
    return blob


def frame_of(message: Ack) -> bytes:
    """*message*'s frame, encoded by hand: a peer's `Connection` would not send it."""
    payload = msgspec.msgpack.encode(message)
    return struct.pack(">2sBBI", b"BP", 1, 0, len(payload)) + payload


def fill(sock: socket.socket) -> int:
    """Send datagrams on non-blocking *sock* until the kernel takes no more; how many went."""
    sent = 0
    while True:
        try:
            sock.send(b"x" * 512, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return sent
        sent += 1


def drain(sock: socket.socket, count: int) -> None:
    for _ in range(count):
        assert sock.recv(4096) == b"x" * 512


def test_handoffs_back_to_back_are_each_mapped_and_acknowledged(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs
) -> None:
    tested, peer = pair
    contents = [b"first" * 100, b"second" * 100]
    ids = []
    for data in contents:
        with sealed(blobs, data) as blob:
            ids.append(peer.send_blob(blob, meta=data[:6], wait=False))
    peer.send(b"after")  # queued behind both handoffs before any is read
    for request_id, data in zip(ids, contents, strict=True):
        with tested.recv_handoff() as handoff:
            assert bytes(handoff.blob.as_slice()) == data
            assert handoff.meta == data[:6]
            assert handoff.request_id == request_id
    with pytest.raises(UnexpectedMessage):
        tested.recv_handoff()  # the payload is left for recv()
    message, fds = tested.recv()
    assert message == UserPayload(id=message.id, data=b"after")
    assert fds == ()
    replies = [peer.recv() for _ in ids]
    assert [(type(m), m.reply_to, fds) for m, fds in replies] == [  # type: ignore[union-attr]
        (Ack, request_id, ()) for request_id in ids
    ]


def test_the_awaited_ack_behind_other_messages_leaves_them_for_later(
    pair: tuple[Driven, Channel],
    blobs: SharedMemoryBlobs,
    helper: Callable[..., Future[Any]],
) -> None:
    """Messages that arrive before the Ack are queued; the queued handoff is acknowledged later."""
    tested, peer = pair
    with sealed(blobs, b"theirs" * 50) as theirs:

        def answer_late() -> int:
            peer.send(b"before the ack")
            request_id = peer.send_blob(theirs, wait=False)
            peer.recv_handoff().blob.close()  # acknowledges ours
            return request_id

        answered = helper(answer_late)
        with sealed(blobs, b"ours" * 50) as ours:
            tested.send_blob(ours)
        their_id = answered.result(WAIT)
    message, _ = tested.recv()
    assert isinstance(message, UserPayload)
    assert message.data == b"before the ack"
    with tested.recv_handoff() as handoff:
        assert bytes(handoff.blob.as_slice()) == b"theirs" * 50
        assert handoff.request_id == their_id
    reply, fds = peer.recv()
    assert isinstance(reply, Ack)
    assert reply.reply_to == their_id
    assert fds == ()


def test_a_handoff_that_finds_the_socket_full_goes_when_there_is_room(
    flavour: Flavour,  # noqa: F811
    blobs: SharedMemoryBlobs,
) -> None:
    """EAGAIN on the first try: a send that times out withdraws the handoff, the next one goes."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    ours.setblocking(False)
    queued = fill(ours)
    tested = flavour.wrap(ours, timeout=WAIT)
    reader = Connection("datagram")
    try:
        with sealed(blobs, b"late" * 100) as blob:
            with pytest.raises(Timeout):
                tested.send_blob(blob, wait=False, timeout=0.05)
            drain(theirs, queued)
            request_id = tested.send_blob(blob, wait=False)
        data, fds, _, _ = socket.recv_fds(theirs, 65536, 2)
        event = reader.receive_datagram(data, fds)
        assert isinstance(event, Received)
        assert isinstance(event.message, BlobHandoff)
        with open(event.fds[0], "rb") as received:
            assert received.read() == b"late" * 100
        assert event.message.id == request_id
        # The handoff withdrawn at the timeout is not awaited: an answer to it is refused.
        withdrawn = Ack(id=1, reply_to=request_id - 1)
        theirs.send(frame_of(withdrawn))
        with pytest.raises(RemoteProtocolError, match="not a handoff from this side waiting"):
            tested.recv()
    finally:
        tested.close()
        reader.close()
        theirs.close()


def test_an_ack_that_finds_the_socket_full_goes_when_there_is_room(
    flavour: Flavour,  # noqa: F811
    blobs: SharedMemoryBlobs,
    helper: Callable[..., Future[Any]],
) -> None:
    """EAGAIN on the Ack's first try: the receiver waits for room, then acknowledges."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    ours.setblocking(False)
    queued = fill(ours)
    tested = flavour.wrap(ours, timeout=WAIT)
    sender = Connection("datagram")
    try:
        with sealed(blobs, b"full" * 100) as blob:
            data, fds = sender.send(BlobHandoff(token=blob.token), (blob.fileno(),))
            socket.send_fds(theirs, [data], list(fds))
        received = helper(tested.recv_handoff)
        # Whether the Ack met a full socket or not, it comes after every datagram queued before it.
        drain(theirs, queued)
        ack = sender.receive_datagram(theirs.recv(4096), [])
        assert isinstance(ack, Received)
        assert ack.message == Ack(id=1, reply_to=1)
        with received.result(WAIT) as handoff:
            assert bytes(handoff.blob.as_slice()) == b"full" * 100
    finally:
        tested.close()
        sender.close()
        theirs.close()


def test_a_payload_larger_than_the_stream_buffer_goes_in_parts(
    flavour: Flavour,  # noqa: F811
    blobs: SharedMemoryBlobs,
    helper: Callable[..., Future[Any]],
) -> None:
    """The STREAM fallback: a frame the socket takes in parts, then a handoff after it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    tested = flavour.wrap(ours, timeout=WAIT)
    peer = Channel(theirs, timeout=WAIT)
    big = bytes(range(256)) * 200  # 51 KiB: far more than the buffer takes at once
    try:

        def receive_both() -> tuple[bytes, bytes]:
            message, _ = peer.recv()
            assert isinstance(message, UserPayload)
            with peer.recv_handoff() as handoff:
                return message.data, bytes(handoff.blob.as_slice())

        received = helper(receive_both)
        tested.send(big)
        with sealed(blobs, b"next" * 100) as blob:
            tested.send_blob(blob)
        assert received.result(WAIT) == (big, b"next" * 100)
    finally:
        tested.close()
        peer.close()


def test_a_datagram_wait_keeps_each_call_to_its_own_timeout(
    pair: tuple[Driven, Channel], helper: Callable[..., Future[Any]]
) -> None:
    """The sync driver waits in recvmsg (SO_RCVTIMEO): a shorter timeout after a longer one
    still ends on time, and a wait without one still gets what comes."""
    tested, peer = pair
    for timeout in (0.3, 0.02, None):
        if timeout is None:
            arrived = helper(lambda: tested.recv(timeout=None))
            peer.send(b"at last")
            message, _ = arrived.result(WAIT)
            assert isinstance(message, UserPayload)
            assert message.data == b"at last"
            continue
        started = time.monotonic()
        with pytest.raises(Timeout):
            tested.recv(timeout=timeout)
        waited = time.monotonic() - started
        assert timeout <= waited < timeout + 0.25


def test_bytes_that_find_the_socket_full_go_when_there_is_room(
    flavour: Flavour,  # noqa: F811
    helper: Callable[..., Future[Any]],
) -> None:
    """EAGAIN on the first try of `send(bytes)`: a send that times out sends nothing, the
    next one waits for room and goes whole, with a fresh id."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    ours.setblocking(False)
    queued = fill(ours)
    tested = flavour.wrap(ours, timeout=WAIT)
    reader = Connection("datagram")
    try:
        with pytest.raises(Timeout):
            tested.send(b"dropped", timeout=0.05)
        drained = helper(drain, theirs, queued)
        request_id = tested.send(b"waited")  # returns once the socket took it
        drained.result(WAIT)
        event = reader.receive_datagram(theirs.recv(4096), [])
        assert isinstance(event, Received)
        assert event.message == UserPayload(id=request_id, data=b"waited")
        assert request_id == 2  # the one withdrawn kept its id: ids only grow
    finally:
        tested.close()
        reader.close()
        theirs.close()


def test_bytes_over_the_frame_limit_still_raise_the_wire_error(
    pair: tuple[Driven, Channel],
) -> None:
    """`send(bytes)` of a frame over the limit raises the wire's error."""
    tested, _ = pair
    with pytest.raises(LocalProtocolError, match="maximum frame size"):
        tested.send(b"x" * MAX_FRAME_SIZE)


def test_a_message_already_there_is_taken_with_no_time_left(
    pair: tuple[Driven, Channel],
) -> None:
    """A zero timeout still takes what has arrived (the driver waits in recvmsg only when
    there is time to wait), and raises `Timeout` when nothing has."""
    tested, peer = pair
    peer.send(b"there")
    message, fds = tested.recv(timeout=0)
    assert message == UserPayload(id=1, data=b"there")
    assert fds == ()
    with pytest.raises(Timeout):
        tested.recv(timeout=0)


def test_a_wait_a_hair_under_whole_seconds_is_a_valid_receive_timeout() -> None:
    """SO_RCVTIMEO takes under a million microseconds: 1.9999999996 s is set as 2 s, not as
    1 s and 1,000,000 µs (EDOM, which failed the channel). Only the sync driver waits in
    recvmsg (`ChannelCore.wait_received`), so only that is tested here."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    core = ChannelCore(left)
    try:
        with Channel(right, timeout=WAIT) as peer:
            peer.send(b"waiting already")
            assert core.wait_received(2 - 4e-10)
            received = core.poll_received()
            assert received is not None
            assert received.message == UserPayload(id=1, data=b"waiting already")
            core.check_usable()
    finally:
        core.close()


@pytest.mark.parametrize("forever", [math.inf, 1e20])
def test_a_timeout_too_long_for_the_kernel_waits_as_none_does(
    pair: tuple[Driven, Channel], helper: Callable[..., Future[Any]], forever: float
) -> None:
    tested, peer = pair
    arrived = helper(lambda: tested.recv(timeout=forever))
    peer.send(b"eventually")
    message, _ = arrived.result(WAIT)
    assert message == UserPayload(id=1, data=b"eventually")


def test_a_nan_timeout_is_refused(pair: tuple[Driven, Channel]) -> None:
    tested, _ = pair
    with pytest.raises(InvalidSize, match="nan"):
        tested.recv(timeout=math.nan)


def test_try_send_payload_sends_now_or_says_it_would_wait(
    flavour: Flavour,  # noqa: F811
    helper: Callable[..., Future[Any]],
) -> None:
    """True: the payload went, whole, with its fds; False: nothing went (a full socket);
    `send_payload` then sends it, waiting for room."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    tested = flavour.wrap(ours, timeout=WAIT)
    reader = Connection("datagram")
    read, write = os.pipe()
    try:
        channel = tested.channel
        assert channel.try_send_payload(b"now", (read,))
        data, fds, _, _ = socket.recv_fds(theirs, 65536, 2)
        event = reader.receive_datagram(data, fds)
        assert isinstance(event, Received)
        assert event.message == UserPayload(id=1, data=b"now")
        assert len(event.fds) == 1
        os.close(event.fds[0])
        ours.setblocking(False)
        queued = fill(ours)
        assert not channel.try_send_payload(b"later")
        drained = helper(drain, theirs, queued)
        # The refused one was framed, then withdrawn: its id stays used (ids only grow).
        assert tested._do(channel.send_payload(b"later")) == 3
        drained.result(WAIT)
        event = reader.receive_datagram(theirs.recv(4096), [])
        assert isinstance(event, Received)
        assert event.message == UserPayload(id=3, data=b"later")
    finally:
        os.close(read)
        os.close(write)
        tested.close()
        reader.close()
        theirs.close()
    with pytest.raises(BlobClosed):
        channel.try_send_payload(b"closed")


def test_try_send_payload_never_sends_part_of_a_frame(flavour: Flavour) -> None:  # noqa: F811
    """On a stream socket a frame may go out in part, so it always says "later"."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tested = flavour.wrap(ours, timeout=WAIT)
    try:
        assert not tested.channel.try_send_payload(b"stream")
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(4096)
    finally:
        tested.close()
        theirs.close()
