"""Channel behaviour, one suite run against both flavours (blocking and asyncio) in-process.

The channel under test is driven through `Driven`, which runs the asyncio
flavour's coroutines on a private event loop, so every test below checks
both drivers against the same rules. The peer is a blocking channel (in a
thread when it must answer while the channel under test waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from blobplane import BlobBackend, MappedRead, ProducerBlob, SharedMemoryBlobs
from blobplane import channel as sync
from blobplane.channel import Channel, Handoff, PeerCredentials, aio
from blobplane.errors import (
    AddressInUse,
    BlobBusy,
    BlobClosed,
    BrokenResource,
    ConnectionClosed,
    ConnectionRefused,
    ForbiddenPeer,
    InvalidAddress,
    InvalidSize,
    NotSendable,
    PeerRefused,
    Timeout,
    UnexpectedMessage,
)
from blobplane.wire import Ack, BlobHandoff, Connection, ErrorReply, Message, UserPayload

pytestmark = pytest.mark.usefixtures("no_leaks")

T = TypeVar("T")
WAIT = 10.0  # seconds: far beyond anything a passing test needs, so a hang fails fast


class Driven:
    """A channel of either flavour behind one blocking interface."""

    def __init__(self, channel: Channel | aio.AsyncChannel, loop: asyncio.AbstractEventLoop | None):
        self.channel = channel
        self.loop = loop

    def _do(self, result: Any) -> Any:
        if inspect.isawaitable(result):
            assert self.loop is not None
            return self.loop.run_until_complete(result)
        return result

    def send(self, message: Message | bytes, fds: tuple[int, ...] = (), **kw: Any) -> int:
        result: int = self._do(self.channel.send(message, fds, **kw))
        return result

    def recv(self, **kw: Any) -> tuple[Message, tuple[int, ...]]:
        result: tuple[Message, tuple[int, ...]] = self._do(self.channel.recv(**kw))
        return result

    def send_blob(self, blob: ProducerBlob, **kw: Any) -> int:
        result: int = self._do(self.channel.send_blob(blob, **kw))
        return result

    def recv_blob(self, **kw: Any) -> MappedRead:
        result: MappedRead = self._do(self.channel.recv_blob(**kw))
        return result

    def recv_handoff(self, **kw: Any) -> Handoff:
        result: Handoff = self._do(self.channel.recv_handoff(**kw))
        return result

    def send_bytes(self, data: object, **kw: Any) -> int:
        result: int = self._do(self.channel.send_bytes(data, **kw))
        return result

    def recv_bytes(self, **kw: Any) -> MappedRead:
        result: MappedRead = self._do(self.channel.recv_bytes(**kw))
        return result

    def close(self) -> None:
        self.channel.close()


@dataclass
class Flavour:
    name: str
    loop: asyncio.AbstractEventLoop | None

    def wrap(self, sock: socket.socket, **kw: Any) -> Driven:
        cls = Channel if self.loop is None else aio.AsyncChannel
        return Driven(cls(sock, **kw), self.loop)


@pytest.fixture(params=["sync", "aio"])
def flavour(request: pytest.FixtureRequest) -> Iterator[Flavour]:
    loop = None if request.param == "sync" else asyncio.new_event_loop()
    yield Flavour(request.param, loop)
    if loop is not None:
        loop.close()


@pytest.fixture(params=["seqpacket", "stream"])
def transport(request: pytest.FixtureRequest) -> sync.Transport:
    kind: sync.Transport = request.param
    return kind


@pytest.fixture
def pair(flavour: Flavour, transport: sync.Transport) -> Iterator[tuple[Driven, Channel]]:
    """(the channel under test, a blocking peer) over one socket pair."""
    kind = socket.SOCK_SEQPACKET if transport == "seqpacket" else socket.SOCK_STREAM
    left, right = socket.socketpair(socket.AF_UNIX, kind)
    peer = Channel(right, timeout=WAIT)
    tested = flavour.wrap(left, timeout=WAIT)
    yield tested, peer
    tested.close()
    peer.close()


@pytest.fixture
def blobs() -> Iterator[SharedMemoryBlobs]:
    with SharedMemoryBlobs(BlobBackend.MEMFD) as allocator:
        yield allocator


@pytest.fixture
def helper() -> Iterator[Callable[[Callable[[], T]], Future[T]]]:
    """Run a peer's part in a thread, for the calls that wait for an answer."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit


def sealed(blobs: SharedMemoryBlobs, data: bytes) -> ProducerBlob:
    blob = blobs.create(len(data))
    blob.write_all(data)
    blob.seal()
    return blob


def contents(mapped: MappedRead) -> bytes:
    with mapped, mapped.as_slice() as view:
        return view.tobytes()


# -- round trips -------------------------------------------------------------------------


def test_payloads_and_their_fds_arrive(pair: tuple[Driven, Channel]) -> None:
    tested, peer = pair
    read_end, write_end = os.pipe()
    try:
        first = tested.send(b"hello", (write_end,))
        second = tested.send(UserPayload(data=b"again"))
    finally:
        os.close(write_end)  # send only borrowed it
    message, fds = peer.recv()
    assert message == UserPayload(id=first, data=b"hello")
    assert second == first + 1
    (received,) = fds
    os.write(received, b"through the passed pipe")
    os.close(received)
    assert os.read(read_end, 100) == b"through the passed pipe"
    os.close(read_end)
    assert peer.recv()[0] == UserPayload(id=second, data=b"again")
    peer.send(b"back")
    assert tested.recv() == (UserPayload(id=1, data=b"back"), ())


def test_a_blob_goes_over_and_is_acknowledged(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs, helper: Callable[..., Future[Any]]
) -> None:
    tested, peer = pair
    data = os.urandom(1 << 20)
    with sealed(blobs, data) as blob:
        receiving = helper(peer.recv_handoff)
        request_id = tested.send_blob(blob, meta=b"frame 1")
        with receiving.result(WAIT) as handoff:
            assert handoff.token == blob.token
            assert handoff.meta == b"frame 1"
            assert handoff.request_id == request_id
            assert contents(handoff.blob) == data


def test_the_tested_side_receives_blobs_too(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs, helper: Callable[..., Future[Any]]
) -> None:
    tested, peer = pair
    with sealed(blobs, b"the other way") as blob:
        sending = helper(lambda: peer.send_blob(blob))
        assert contents(tested.recv_blob()) == b"the other way"
        assert sending.result(WAIT) == 1


def test_without_waiting_the_reply_comes_through_recv(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs
) -> None:
    tested, peer = pair
    with sealed(blobs, b"x" * 100) as blob:
        ids = [tested.send_blob(blob, wait=False) for _ in range(3)]
    # The fds in flight keep the memory alive after the sender's cleanup.
    for _ in ids:
        assert contents(peer.recv_blob()) == b"x" * 100
    assert [tested.recv()[0] for _ in ids] == [Ack(id=n, reply_to=n) for n in ids]


def test_messages_arriving_while_send_blob_waits_are_kept_in_order(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs, helper: Callable[..., Future[Any]]
) -> None:
    tested, peer = pair

    def chatty_receiver() -> None:
        peer.send(b"one")
        peer.send(b"two")
        peer.recv_blob().close()
        peer.send(b"three")

    with sealed(blobs, b"blob") as blob:
        answering = helper(chatty_receiver)
        tested.send_blob(blob)
        answering.result(WAIT)
    assert [tested.recv()[0] for _ in range(3)] == [
        UserPayload(id=1, data=b"one"),
        UserPayload(id=2, data=b"two"),
        UserPayload(id=4, data=b"three"),  # id 3 was the Ack
    ]


# -- refusals ----------------------------------------------------------------------------


def test_only_sealed_memfd_blobs_can_be_sent(pair: tuple[Driven, Channel]) -> None:
    tested, _ = pair
    with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs, blobs.create(10) as blob:
        with pytest.raises(NotSendable, match=r"not sealed; call blob.seal\(\)"):
            tested.send_blob(blob)
        blob.seal()
        blob.cleanup()
        with pytest.raises(BlobClosed):
            tested.send_blob(blob)
    with SharedMemoryBlobs(BlobBackend.TEMP_FILE) as files, files.create(10) as on_disk:
        on_disk.seal()
        with pytest.raises(NotSendable, match="only memfd blobs travel"):
            tested.send_blob(on_disk)
    # Refusing locally sent nothing: the channel goes on.
    tested.send(b"still fine")


def test_a_refusal_raises_peer_refused(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs, helper: Callable[..., Future[Any]]
) -> None:
    tested, peer = pair

    def refuse() -> None:
        message, fds = peer.recv()
        for fd in fds:
            os.close(fd)
        assert isinstance(message, BlobHandoff)
        peer.send(ErrorReply(reply_to=message.id, code="not-wanted", message="no thanks"))

    with sealed(blobs, b"unwanted") as blob:
        refusing = helper(refuse)
        with pytest.raises(PeerRefused, match="no thanks") as caught:
            tested.send_blob(blob)
        refusing.result(WAIT)
    assert caught.value.code == "not-wanted"
    assert caught.value.reply_to == 1
    tested.send(b"and the channel goes on")
    assert peer.recv()[0] == UserPayload(id=2, data=b"and the channel goes on")


def test_recv_blob_leaves_other_messages_for_recv(pair: tuple[Driven, Channel]) -> None:
    tested, peer = pair
    peer.send(b"not a blob")
    with pytest.raises(UnexpectedMessage, match="received UserPayload 1; it is left for recv"):
        tested.recv_blob()
    assert tested.recv() == (UserPayload(id=1, data=b"not a blob"), ())


# -- bytes: in the message when small, in a memfd when not ------------------------------

LIMIT = Connection().payload_limit
BYTES_SIZES = [0, 1, 4096, LIMIT, LIMIT + 1, 1 << 20]


def pattern(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


@pytest.mark.parametrize("size", BYTES_SIZES)
def test_bytes_sent_arrive_read_only_whatever_their_size(
    pair: tuple[Driven, Channel], helper: Callable[[Callable[[], Any]], Future[Any]], size: int
) -> None:
    tested, peer = pair
    data = pattern(size)

    def receive() -> tuple[bytes, bool]:
        with peer.recv_bytes() as received:
            view = received.as_slice()
            try:
                return bytes(view), view.readonly
            finally:
                view.release()

    arrived = helper(receive)
    tested.send_bytes(memoryview(bytearray(data)))
    assert arrived.result(WAIT) == (data, True)
    # And the other way round.
    helper(lambda: peer.send_bytes(data))
    with tested.recv_bytes() as received, received.as_slice() as view:
        assert view == data
        if size:
            with pytest.raises(TypeError):
                view[0] = 1


def test_small_bytes_ride_inside_the_message_and_large_ones_in_a_memfd(
    pair: tuple[Driven, Channel], helper: Callable[[Callable[[], Any]], Future[Any]]
) -> None:
    tested, peer = pair
    tested.send_bytes(b"x" * LIMIT)
    message, fds = peer.recv()
    assert (type(message), len(message.data), fds) == (UserPayload, LIMIT, ())  # type: ignore[union-attr]
    sent = helper(lambda: tested.send_bytes(b"y" * (LIMIT + 1)))
    handoff = peer.recv_handoff()
    with handoff:
        assert len(handoff.blob) == LIMIT + 1
    sent.result(WAIT)


def test_recv_bytes_leaves_other_messages_for_recv(pair: tuple[Driven, Channel]) -> None:
    tested, peer = pair
    read, write = os.pipe()
    try:
        peer.send(b"bytes with an fd", (read,))
        with pytest.raises(UnexpectedMessage, match="it is left for recv"):
            tested.recv_bytes()
        message, fds = tested.recv()
        assert message == UserPayload(id=1, data=b"bytes with an fd")
        assert len(fds) == 1
        os.close(fds[0])
    finally:
        os.close(read)
        os.close(write)


# -- timeouts, closing, the peer going away ---------------------------------------------


def test_a_timeout_leaves_the_channel_usable(pair: tuple[Driven, Channel]) -> None:
    tested, peer = pair
    with pytest.raises(Timeout, match=r"recv did not complete within 0.05 s"):
        tested.recv(timeout=0.05)
    with pytest.raises(Timeout):
        tested.recv_blob(timeout=0)
    peer.send(b"late")
    assert tested.recv(timeout=None)[0] == UserPayload(id=1, data=b"late")


def test_send_times_out_when_the_peer_does_not_read(flavour: Flavour) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tested = flavour.wrap(left)
    try:
        sent = 0
        with pytest.raises(Timeout, match="send did not complete"):  # noqa: PT012
            while sent < 100_000:
                tested.send(b"x" * 60_000, timeout=0.02)
                sent += 1
        assert sent > 0
        # A datagram is sent whole or not at all: the one that timed out never left,
        # its id is simply skipped, and after draining the channel works on.
        peer = Channel(right)
        for expected_id in range(1, sent + 1):
            assert peer.recv(timeout=WAIT)[0].id == expected_id
        tested.send(b"after", timeout=WAIT)
        assert peer.recv(timeout=WAIT)[0] == UserPayload(id=sent + 2, data=b"after")
        peer.close()
    finally:
        tested.close()
        right.close()


def test_a_closed_channel_refuses_everything(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs
) -> None:
    tested, peer = pair
    tested.close()
    tested.close()
    assert tested.channel.closed
    assert tested.channel.fileno() == -1
    with sealed(blobs, b"x") as blob:
        for call in (
            lambda: tested.send(b"x"),
            tested.recv,
            lambda: tested.send_blob(blob),
            tested.recv_blob,
        ):
            with pytest.raises(BlobClosed, match="this channel is closed"):
                call()
    with pytest.raises(ConnectionClosed, match="the peer closed the channel"):
        peer.recv()


def test_a_peer_that_leaves_is_connection_closed_from_then_on(
    pair: tuple[Driven, Channel], blobs: SharedMemoryBlobs
) -> None:
    tested, peer = pair
    peer.send(b"last words")
    peer.close()
    assert tested.recv()[0] == UserPayload(id=1, data=b"last words")
    for _ in range(2):
        with pytest.raises(ConnectionClosed, match="the peer closed the channel"):
            tested.recv()
    with pytest.raises(ConnectionClosed), sealed(blobs, b"x") as blob:
        tested.send_blob(blob)
    assert "broken" in repr(tested.channel)


def test_sending_to_a_departed_peer_is_connection_closed(pair: tuple[Driven, Channel]) -> None:
    tested, peer = pair
    peer.close()
    with pytest.raises(ConnectionClosed):
        tested.send(b"anyone there?")


def test_peer_credentials_name_this_process(pair: tuple[Driven, Channel]) -> None:
    tested, peer = pair
    me = PeerCredentials(os.getpid(), os.getuid(), os.getgid())
    assert tested.channel.peer_credentials == me
    assert peer.peer_credentials == me


def test_a_peer_of_another_uid_is_refused(flavour: Flavour) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(ForbiddenPeer, match=f"runs as uid {os.getuid()}"):
        flavour.wrap(left, allowed_uids={os.getuid() + 1})
    assert left.fileno() == -1, "the refused socket is closed"
    right.close()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    flavour.wrap(left, allowed_uids=sync.ALL_UIDS).close()
    right.close()


def test_only_unix_sockets_carry_channels() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        with pytest.raises(InvalidAddress, match="AF_UNIX"):
            Channel(tcp)
        assert tcp.fileno() == -1


# -- asyncio only: concurrency ---------------------------------------------------------


def test_two_tasks_receiving_at_once_is_busy() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        first = asyncio.create_task(tested.recv())
        await asyncio.sleep(0)  # let it start waiting
        with pytest.raises(BlobBusy, match="already receiving"):
            await tested.recv()
        with pytest.raises(BlobBusy):
            await tested.recv_blob()
        await peer.send(b"for the first task")
        assert (await first)[0] == UserPayload(id=1, data=b"for the first task")
        # Receiving and sending at once is fine: one of each.
        receiving = asyncio.create_task(tested.recv())
        await asyncio.sleep(0)
        await tested.send(b"meanwhile")
        assert (await peer.recv())[0] == UserPayload(id=1, data=b"meanwhile")
        await peer.send(b"done")
        assert (await receiving)[0] == UserPayload(id=2, data=b"done")
        tested.close()
        peer.close()

    asyncio.run(scenario())


def test_closing_wakes_the_tasks_waiting_on_the_channel() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        waiting = asyncio.create_task(tested.recv())
        await asyncio.sleep(0)
        tested.close()
        with pytest.raises(BlobClosed):
            await waiting
        peer.close()

    asyncio.run(scenario())


def test_a_cancelled_receive_loses_nothing() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        waiting = asyncio.create_task(tested.recv())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await peer.send(b"after the cancellation")
        assert (await tested.recv())[0] == UserPayload(id=1, data=b"after the cancellation")
        async with tested, peer:
            pass

    asyncio.run(scenario())


def test_both_flavours_offer_the_same_calls() -> None:
    """The drivers are written by hand: this keeps them from drifting apart."""
    for blocking, asynchronous in (
        (sync.Channel, aio.AsyncChannel),
        (sync.Listener, aio.AsyncListener),
    ):
        names = {n for n in dir(blocking) if not n.startswith("_")}
        assert names - {n for n in dir(asynchronous) if not n.startswith("_")} == set()
        for name in names:
            ours, theirs = getattr(blocking, name), getattr(asynchronous, name)
            if callable(ours):
                # Same parameters; only the return types differ (Channel / AsyncChannel).
                ours_params = inspect.signature(ours).parameters
                assert ours_params == inspect.signature(theirs).parameters, name
    for name in ("connect", "listen", "socketpair", "from_socket"):
        blocking_params = inspect.signature(getattr(sync, name)).parameters
        assert blocking_params == inspect.signature(getattr(aio, name)).parameters, name


# -- listening and connecting -----------------------------------------------------------


@pytest.fixture
def socket_path(tmp_path: Any) -> str:
    return str(tmp_path / "private" / "control.sock")


def test_the_listening_socket_is_private(socket_path: str) -> None:
    with sync.listen(socket_path) as listener:
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(socket_path)).st_mode) == 0o700
        assert listener.transport == "seqpacket"
    assert not os.path.exists(socket_path), "closing the listener removes the socket"


def test_listen_connect_accept(socket_path: str, transport: sync.Transport) -> None:
    with (
        sync.listen(socket_path, transport=transport, timeout=WAIT) as listener,
        sync.connect(socket_path, timeout=WAIT) as client,
        listener.accept() as server,
    ):
        assert client.transport == server.transport == transport
        client.send(b"ping")
        assert server.recv()[0] == UserPayload(id=1, data=b"ping")
        assert server.peer_credentials.pid == os.getpid()


def test_async_listen_connect_accept(socket_path: str, transport: sync.Transport) -> None:
    async def scenario() -> None:
        async with aio.listen(socket_path, transport=transport, timeout=WAIT) as listener:
            client = await aio.connect(socket_path, timeout=WAIT)
            async with client, await listener.accept() as server:
                await server.send(b"pong")
                assert (await client.recv())[0] == UserPayload(id=1, data=b"pong")

    asyncio.run(scenario())


def test_accept_times_out_and_closing_ends_it(socket_path: str) -> None:
    with (
        sync.listen(socket_path) as listener,
        pytest.raises(Timeout, match="accept did not complete"),
    ):
        listener.accept(timeout=0.01)

    async def scenario() -> None:
        listener = aio.listen(socket_path)
        accepting = asyncio.create_task(listener.accept())
        await asyncio.sleep(0)
        listener.close()
        with pytest.raises(BlobClosed):
            await accepting

    asyncio.run(scenario())
    with pytest.raises(BlobClosed):
        listener.accept()


def test_a_listener_refuses_other_uids_and_carries_on(socket_path: str) -> None:
    with sync.listen(socket_path, allowed_uids={os.getuid() + 1}, timeout=WAIT) as listener:
        client = sync.connect(socket_path, timeout=WAIT, allowed_uids=sync.ALL_UIDS)
        with pytest.raises(ForbiddenPeer):
            listener.accept()
        with pytest.raises(ConnectionClosed):
            client.recv()
        client.close()
        listener.allowed_uids = None
        with sync.connect(socket_path) as again, listener.accept() as accepted:
            again.send(b"welcome")
            assert accepted.recv()[0].id == 1


def test_a_client_refuses_a_listener_of_another_uid(socket_path: str) -> None:
    with sync.listen(socket_path, timeout=WAIT) as listener:
        with pytest.raises(ForbiddenPeer):
            sync.connect(socket_path, allowed_uids={os.getuid() + 1})
        with contextlib.suppress(Timeout, ConnectionClosed), listener.accept() as accepted:
            accepted.recv(timeout=WAIT)


def test_a_stale_socket_is_replaced_but_a_live_one_is_not(socket_path: str) -> None:
    with (
        sync.listen(socket_path),
        pytest.raises(AddressInUse, match="another process is listening"),
    ):
        sync.listen(socket_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(socket_path)
    stale.close()
    with sync.listen(socket_path) as listener:
        assert listener.path == socket_path
    with open(socket_path, "w"):
        pass
    with pytest.raises(AddressInUse, match="not a socket"):
        sync.listen(socket_path)
    os.unlink(socket_path)


def test_a_listener_in_a_folder_others_can_read_is_still_0600(tmp_path: Any) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    path = shared / "control.sock"
    with sync.listen(str(path)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert list(shared.iterdir()) == []


def test_connecting_to_nothing_is_connection_refused(socket_path: str) -> None:
    with pytest.raises(ConnectionRefused, match="no such file"):
        sync.connect(socket_path)
    with sync.listen(socket_path):
        pass
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path)
    stale.close()
    with pytest.raises(ConnectionRefused, match="stale socket"):
        sync.connect(socket_path)
    os.unlink(socket_path)
    with pytest.raises(InvalidAddress, match="1 to 107 bytes"):
        sync.connect("x" * 200)


def test_a_full_backlog_is_retried_until_the_timeout(socket_path: str) -> None:
    with sync.listen(socket_path, backlog=0, timeout=WAIT) as listener:
        waiting: list[socket.socket] = []
        try:
            # Fill the backlog with connections nobody accepts.
            while True:
                extra = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                extra.setblocking(False)
                try:
                    extra.connect(socket_path)
                except BlockingIOError:
                    extra.close()
                    break
                waiting.append(extra)
            with pytest.raises(Timeout, match="connect did not complete"):
                sync.connect(socket_path, timeout=0.05)
            accepted = threading.Event()

            def accept_one() -> None:
                listener.accept().close()
                accepted.set()

            with ThreadPoolExecutor(1) as pool:
                done = pool.submit(accept_one)
                with sync.connect(socket_path, timeout=WAIT):
                    pass
                done.result(WAIT)
        finally:
            for extra in waiting:
                extra.close()


def test_an_inherited_fd_becomes_a_channel(flavour: Flavour) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    make = sync.from_socket if flavour.loop is None else aio.from_socket
    tested = Driven(make(left.detach(), timeout=WAIT), flavour.loop)
    with Channel(right) as peer:
        peer.send(b"through an fd number")
        assert tested.recv()[0] == UserPayload(id=1, data=b"through an fd number")
    tested.close()
    read_end, write_end = os.pipe()
    with pytest.raises(BrokenResource, match=f"adopting fd {read_end}"):
        make(read_end)
    os.close(read_end)  # still the caller's: adopting it failed
    os.close(write_end)


def test_a_bad_argument_still_closes_the_socket() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(InvalidSize, match="timeout"):
        Channel(left, timeout=-1)
    assert left.fileno() == -1
    right.close()


@pytest.mark.parametrize("sent_before_timeout", [0, 10])
def test_a_send_cut_short_breaks_a_stream_only_if_bytes_went_out(
    blobs: SharedMemoryBlobs, sent_before_timeout: int
) -> None:
    """Interrupting a send (timeout, cancellation) half way leaves a stream out of step."""
    from blobplane.channel import ops
    from blobplane.channel.core import ChannelCore, Wait

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    core = ChannelCore(left)
    progress = iter([sent_before_timeout or None, None])
    core.send_some = lambda data, fds: next(progress)  # type: ignore[method-assign]
    with sealed(blobs, b"x") as blob:
        op = ops.send_blob(core, blob, b"", wait=False)
        assert not isinstance(op, int), "the socket took nothing: the send has to wait"
        assert next(op) is Wait.WRITABLE
        op.close()  # what a timeout or a cancellation does
    if sent_before_timeout:
        with pytest.raises(BrokenResource, match="interrupted in the middle of a frame"):
            core.check_usable()
    else:
        core.check_usable()  # nothing went out: the channel is fine
        assert core.wire.open_handoffs == frozenset(), "and waits for no answer"
    core.close()
    right.close()
