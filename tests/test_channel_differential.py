"""Each operation's common case, done at once, against its general path: the same outcome.

Every channel operation (`blobplane.channel.ops`) first does at once what it
can and falls back to its generator for the rest. The test hook `ops.INLINE`
set to False sends every call down the generator from the start. Random
conversations (payloads with fds, blobs, pool slots, refusals, illegal
messages, receives with nothing there, handoffs the sender waits on) run
once each way, against both drivers and both transports; the request ids,
results, errors, and every frame and fd the peer receives must be the same.

The peer is a sans-I/O `Connection` over a raw socket, driven step by step
by the test, so that what it sees is exactly what the channel sent.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobplane import BlobBackend, BlobPool, SharedMemoryBlobs
from blobplane.blobs import ProducerBlob
from blobplane.channel import Channel, aio, ops
from blobplane.channel.core import ChannelCore
from blobplane.errors import BlobError
from blobplane.wire import (
    NEED_DATA,
    Ack,
    BlobHandoff,
    Connection,
    ErrorReply,
    PeerClosed,
    Received,
    UserPayload,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

WAIT = 5.0  # seconds: what a step that waits for the peer may take at most
SIZES = (1, 4096, 10_000)

# One step of a conversation: who acts, what, and a number the action uses.
Step = tuple[str, int]

steps = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2)),  # bytes, with that many fds
    st.tuples(st.just("send_blob"), st.integers(0, len(SIZES) - 1)),
    st.tuples(st.just("send_blob_waited"), st.integers(0, len(SIZES) - 1)),
    st.tuples(st.just("send_unsealed"), st.just(0)),
    st.tuples(st.just("send_slot"), st.integers(1, 3000)),
    st.tuples(st.just("send_ack_of_nothing"), st.integers(1, 5)),
    st.tuples(st.just("recv"), st.just(0)),
    st.tuples(st.just("recv_handoff"), st.just(0)),
    st.tuples(st.just("peer_payload"), st.integers(0, 2)),
    st.tuples(st.just("peer_handoff"), st.integers(0, len(SIZES) - 1)),
    st.tuples(st.just("peer_unsealed_handoff"), st.just(0)),
    st.tuples(st.just("peer_acks"), st.just(0)),
    st.tuples(st.just("peer_refuses"), st.just(0)),
    st.tuples(st.just("peer_garbage"), st.just(0)),
)


@dataclass
class Peer:
    """The other end: a `Connection` over a raw socket, driven by the test."""

    sock: socket.socket
    framing: str
    wire: Connection = field(init=False)
    seen: list[object] = field(default_factory=list)
    handoffs: list[int] = field(default_factory=list)
    ended: bool = False
    last_id: int = 0  # of the messages received from the channel

    def __post_init__(self) -> None:
        self.wire = Connection("datagram" if self.framing == "seqpacket" else "stream")
        self.sock.setblocking(False)

    def send(self, message: Any, fds: tuple[int, ...] = ()) -> object:
        data, _ = self.wire.send(message, fds)
        self.sock.setblocking(True)
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as exc:  # the channel hung up (it failed, or was closed)
            return ("the peer could not send", exc.errno)
        finally:
            self.sock.setblocking(False)
        return None

    def drain(self) -> None:
        """Take in everything sent to the peer so far, recording every event, up to the end."""
        while not self.ended:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
            except BlockingIOError:
                return
            except ConnectionResetError:
                # The channel closed with data unread: what the peer sent last (an
                # answer from `acking`, say) decides that, not the channel.
                self.end()
                return
            if self.framing == "seqpacket" and data:
                self.take(self.wire.receive_datagram(data, list(fds)))
                continue
            self.wire.receive_data(data, fds)
            while (event := self.wire.next_event()) is not NEED_DATA:
                if isinstance(event, PeerClosed):
                    self.end()
                    return
                self.take(event)
            if not data:
                return

    def end(self) -> None:
        self.ended = True
        self.seen.append("end")

    def take(self, event: object) -> None:
        if isinstance(event, PeerClosed):
            self.end()
        elif isinstance(event, Received):
            contents = []
            for fd in event.fds:
                with os.fdopen(fd, "rb") as file:  # closes it
                    contents.append(file.read())
            self.last_id = event.message.id
            if isinstance(event.message, BlobHandoff):
                self.handoffs.append(event.message.id)
            self.seen.append((event.message, contents))
        else:
            self.seen.append(event)


@dataclass
class Conversation:
    """One run of a list of steps, against a fresh channel; its outcome."""

    flavour: str
    transport: str
    blobs: SharedMemoryBlobs
    outcome: list[object] = field(default_factory=list)

    def run(self, script: list[Step], inline: bool) -> list[object]:
        kind = socket.SOCK_SEQPACKET if self.transport == "seqpacket" else socket.SOCK_STREAM
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        loop = asyncio.new_event_loop() if self.flavour == "aio" else None
        tested: Channel | aio.AsyncChannel = (
            Channel(ours, timeout=WAIT) if loop is None else aio.AsyncChannel(ours, timeout=WAIT)
        )
        peer = Peer(theirs, self.transport)
        sealed = [self._sealed(size) for size in SIZES]
        unsealed = self.blobs.create(64)
        pool = BlobPool(slot_size=4096, slots=2)
        previous, ops.INLINE = ops.INLINE, inline
        try:
            ends = Ends(tested, loop, peer, sealed, unsealed, pool)
            for step in script:
                self.outcome.append((step, ends.step(step)))
            tested.close()
            peer.drain()
            self.outcome.append(("peer saw", peer.seen))
        finally:
            ops.INLINE = previous
            tested.close()
            theirs.close()
            pool.close()
            for blob in (*sealed, unsealed):
                blob.cleanup()
            if loop is not None:
                loop.close()
        return canonical(self.outcome)

    def _sealed(self, size: int) -> ProducerBlob:
        blob = self.blobs.create(size)
        blob.write_all(bytes(range(256)) * (size // 256) + bytes(size % 256))
        blob.seal()
        return blob


@dataclass
class Ends:
    """The channel under test, its loop (asyncio), the peer, and what they send."""

    tested: Channel | aio.AsyncChannel
    loop: asyncio.AbstractEventLoop | None
    peer: Peer
    sealed: list[ProducerBlob]
    unsealed: ProducerBlob
    pool: BlobPool

    def send_blob_waited(self, blob: ProducerBlob, do: Callable[[Any], Any]) -> object:
        """`send_blob` that waits for its Ack, which the peer queues before it is asked.

        The peer has seen everything sent so far, so it knows the handoff's id; the
        Ack goes out as raw bytes (the peer's `Connection` would refuse to answer
        what it has not received yet), and is recorded by it once the handoff is in.
        """
        peer = self.peer
        peer.drain()
        handoff_id = peer.last_id + 1
        ack = Ack(id=peer.wire.next_id(), reply_to=handoff_id)
        try:
            peer.sock.send(raw_frame(ack))
        except OSError as exc:
            return ("the peer could not send", exc.errno)
        try:
            return do(self.tested.send_blob(blob, timeout=WAIT))
        except BlobError as exc:
            return (type(exc).__name__, str(exc))
        finally:
            peer.drain()
            if handoff_id in peer.handoffs:
                peer.handoffs.remove(handoff_id)
                peer.wire.frame(Ack(reply_to=handoff_id))  # what the raw bytes said

    def step(self, step: Step) -> object:
        """Take *step*; what it returned or raised."""
        tested, peer, sealed, unsealed, pool = (
            self.tested,
            self.peer,
            self.sealed,
            self.unsealed,
            self.pool,
        )

        def do(result: Any) -> Any:
            if self.loop is not None and asyncio.iscoroutine(result):
                return self.loop.run_until_complete(result)
            return result

        action, number = step
        try:
            match action:
                case "send":
                    with open_fds(number) as fds:
                        return do(tested.send(b"payload %d" % number, fds))
                case "send_blob":
                    return do(tested.send_blob(sealed[number], meta=b"m", wait=False))
                case "send_blob_waited":
                    return self.send_blob_waited(sealed[number], do)
                case "send_unsealed":
                    return do(tested.send_blob(unsealed, wait=False))
                case "send_slot":
                    with do(tested.loan(pool, timeout=0)) as loan:
                        loan.write_all(number.to_bytes(2, "little"))
                        loan.set_length(number)
                        return do(tested.send_blob(loan, wait=False))
                case "send_ack_of_nothing":
                    return do(tested.send(Ack(reply_to=1000 + number)))
                case "recv":
                    message, fds = do(tested.recv(timeout=0))
                    for fd in fds:
                        os.close(fd)
                    return ("received", message, len(fds))
                case "recv_handoff":
                    with do(tested.recv_handoff(timeout=0)) as handoff:
                        return ("handoff", handoff.request_id, bytes(handoff.blob.as_slice()))
                case "peer_payload":
                    with open_fds(number) as fds:
                        return peer.send(UserPayload(data=b"news"), fds)
                case "peer_handoff":
                    blob = sealed[number]
                    return peer.send(BlobHandoff(token=blob.token), (blob.fileno(),))
                case "peer_unsealed_handoff":
                    return peer.send(BlobHandoff(token=unsealed.token), (unsealed.fileno(),))
                case "peer_acks" | "peer_refuses":
                    peer.drain()
                    if peer.handoffs:
                        request = peer.handoffs.pop(0)
                        if action == "peer_acks":
                            return peer.send(Ack(reply_to=request))
                        return peer.send(ErrorReply(reply_to=request, code="refused"))
                case "peer_garbage":
                    try:
                        peer.sock.send(b"this is not a frame")
                    except OSError as exc:
                        return ("the peer could not send", exc.errno)
        except BlobError as exc:
            return (type(exc).__name__, str(exc))
        return None


@contextmanager
def open_fds(count: int) -> Iterator[tuple[int, ...]]:
    """*count* fds of pipes to send (borrowed by the channel), closed afterwards."""
    pairs = [os.pipe() for _ in range(count)]
    try:
        yield tuple(read for read, _ in pairs)
    finally:
        for pair in pairs:
            for fd in pair:
                os.close(fd)


def raw_frame(message: Ack) -> bytes:
    """*message*'s frame, encoded without a `Connection`'s say (no fds ride with it)."""
    payload = msgspec.msgpack.encode(message)
    return struct.pack(">2sBBI", b"BP", 1, 0, len(payload)) + payload


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
_FD = re.compile(r"\bfd \d+")


def canonical(outcome: list[object]) -> list[object]:
    """*outcome* as text, blob and pool ids numbered by first appearance, fd numbers gone."""
    names: dict[str, str] = {}

    def name(match: re.Match[str]) -> str:
        return names.setdefault(match.group(0), f"<id {len(names)}>")

    return [_FD.sub("fd N", _UUID.sub(name, repr(entry))) for entry in outcome]


@pytest.fixture(scope="module")
def blobs() -> Iterator[SharedMemoryBlobs]:
    with SharedMemoryBlobs(BlobBackend.MEMFD) as allocator:
        yield allocator


@pytest.mark.parametrize("transport", ["seqpacket", "stream"])
@pytest.mark.parametrize("flavour", ["sync", "aio"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(script=st.lists(steps, max_size=14))
def test_the_common_case_and_the_general_path_agree(
    blobs: SharedMemoryBlobs, flavour: str, transport: str, script: list[Step]
) -> None:
    inline = Conversation(flavour, transport, blobs).run(script, inline=True)
    general = Conversation(flavour, transport, blobs).run(script, inline=False)
    assert inline == general


def test_the_hook_sends_every_operation_down_its_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `INLINE` False an operation that could complete at once returns its generator."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    core = ChannelCore(left)
    try:
        with Channel(right, timeout=WAIT) as peer:
            peer.send(b"there already")
            monkeypatch.setattr(ops, "INLINE", False)
            op = ops.receive(core)
            assert inspect.isgenerator(op)
            with pytest.raises(StopIteration) as done:
                next(op)  # nothing to wait for: it completes at its first step
            assert done.value.value == Received(UserPayload(id=1, data=b"there already"))
    finally:
        core.close()
