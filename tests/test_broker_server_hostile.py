"""What a broken or hostile client can send, and that it costs only its own connection.

Each case talks to a real broker through a bare channel (or a bare socket),
sending what no client of this library would. Afterwards the broker must
still serve a well-behaved client, hold no fd more than before, and keep
every blob of others.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import uuid
from collections.abc import Callable, Iterator

import msgspec
import pytest

from blobplane import channel
from blobplane.backends.checks import F_SEAL_FUTURE_WRITE
from blobplane.backends.memfd import FULL_SEALS
from blobplane.broker import protocol
from blobplane.broker.protocol import (
    BlobReply,
    Create,
    Delete,
    Get,
    Hello,
    Ok,
    Put,
    Refused,
    Reply,
    Request,
    Seal,
    Stats,
    StatsReply,
)
from blobplane.client import BrokerClient, connect_broker
from blobplane.errors import ConnectionClosed, PeerRefused, Timeout
from blobplane.types import BlobId, BlobToken
from blobplane.wire import BlobHandoff, ErrorReply, UserPayload
from brokers import Broker, raw_socket, running_broker, wait_until

pytestmark = pytest.mark.timeout(60)

SEALS_OF_A_SLOT = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL


class Raw:
    """A connection that says hello properly, then sends whatever it is told to."""

    def __init__(self, path: str) -> None:
        self.channel = channel.connect(path, timeout=10)
        self.rid = 0
        welcome, _ = self.call(Hello(rid=self.next_rid()))
        assert isinstance(welcome, protocol.Welcome)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def send(self, request: Request | bytes, fds: tuple[int, ...] = ()) -> None:
        data = request if isinstance(request, bytes) else protocol.encode(request)
        self.channel.send(UserPayload(data=data), fds)

    def receive(self) -> tuple[Reply, tuple[int, ...]]:
        message, fds = self.channel.recv(timeout=10)
        if isinstance(message, ErrorReply):
            raise PeerRefused(message.message, code=message.code)
        assert isinstance(message, UserPayload)
        return protocol.decode_reply(message.data), fds

    def call(self, request: Request, fds: tuple[int, ...] = ()) -> tuple[Reply, tuple[int, ...]]:
        self.send(request, fds)
        return self.receive()

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker() as running:
        yield running


@pytest.fixture
def raw(broker: Broker) -> Iterator[Raw]:
    connection = Raw(broker.socket_path)
    yield connection
    connection.close()


@pytest.fixture(autouse=True)
def isolated(broker: Broker) -> Iterator[BrokerClient]:
    """A bystander's blob lives through each case; the broker's fds come back to where they were."""
    with connect_broker(broker.socket_path, name="bystander") as bystander:
        entry = bystander.put_bytes(b"innocent", key=f"bystander-{uuid.uuid4().hex}")
        before = broker.fds()
        yield bystander
        with connect_broker(broker.socket_path) as fresh, fresh.get(entry.blob_id) as mapped:
            assert bytes(mapped.as_slice()) == b"innocent"
        wait_until(lambda: broker.fds() == before, f"the broker's fds to return to {before}")
        bystander.delete(entry.blob_id)
    assert broker.alive()


def refused(answer: tuple[Reply, tuple[int, ...]], error: str) -> str:
    """The refusal's message, after checking that *answer* is a refusal with *error*."""
    reply, fds = answer
    for fd in fds:
        os.close(fd)
    assert isinstance(reply, Refused), reply
    assert reply.error == error, reply
    return reply.message


def sealed_memfd(size: int, seals: int = FULL_SEALS, *, sealing: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
    fd = os.memfd_create("hostile", flags)
    if size:
        os.posix_fallocate(fd, 0, size)  # every page there: a sparse memfd is refused
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _until_hung_up(raw: Raw) -> None:
    while True:
        reply, fds = raw.receive()
        for fd in fds:
            os.close(fd)
        if isinstance(reply, Refused) and reply.rid == 0:
            raise PeerRefused(reply.message, code=reply.error)


def ended(raw: Raw) -> None:
    """The broker hung up on *raw* (after saying why, maybe)."""
    with pytest.raises((ConnectionClosed, PeerRefused)):
        _until_hung_up(raw)


# -- garbage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 40, b"GET / HTTP/1.1\r\n\r\n", os.urandom(3000), b"BP\x07\x00\x00\x00\x00\x01x"],
    ids=["zeros", "http", "random", "wrong version"],
)
def test_bytes_that_are_no_frame_end_that_connection_only(broker: Broker, garbage: bytes) -> None:
    with raw_socket(broker.socket_path) as sock:
        sock.send(garbage)
        while sock.recv(70_000):  # the broker may say why; then it hangs up
            pass


def test_a_frame_bigger_than_the_limit(broker: Broker) -> None:
    with raw_socket(broker.socket_path) as sock:
        sock.send(b"BP\x01\x00" + (80_000).to_bytes(4, "big") + b"x" * 80_000)
        while sock.recv(70_000):
            pass


def test_a_client_that_never_says_hello_or_says_something_else_first(broker: Broker) -> None:
    ch = channel.connect(broker.socket_path, timeout=10)
    ch.send(UserPayload(data=protocol.encode(Stats(rid=1))))
    message, _ = ch.recv()
    assert isinstance(message, UserPayload)
    assert "first request must be a hello" in refused(
        (protocol.decode_reply(message.data), ()), "RemoteProtocolError"
    )
    with pytest.raises(ConnectionClosed):
        ch.recv()
    ch.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgspec.msgpack.encode({"op": "launch", "rid": 2}),  # unknown request
        msgspec.msgpack.encode({"op": "get", "rid": 2}),  # neither id nor key
        msgspec.msgpack.encode({"op": "get", "rid": 2, "key": "k", "id": uuid.uuid4().bytes}),
        msgspec.msgpack.encode({"op": "create", "rid": 2, "size": -1}),
        msgspec.msgpack.encode({"op": "create", "rid": 2, "size": 2**63}),
        msgspec.msgpack.encode({"op": "stats", "rid": 0}),
        msgspec.msgpack.encode({"op": "stats", "rid": 2, "extra": True}),
        msgspec.msgpack.encode({"op": "hello", "rid": 2}),  # twice
    ],
    ids=[
        "not msgpack",
        "unknown op",
        "no target",
        "two targets",
        "negative size",
        "huge size",
        "rid 0",
        "unknown field",
        "hello twice",
    ],
)
def test_malformed_requests_end_that_connection(raw: Raw, payload: bytes) -> None:
    raw.send(payload)
    ended(raw)


def test_a_message_of_another_protocol(raw: Raw) -> None:
    fd = sealed_memfd(4096)
    try:
        raw.channel.send(BlobHandoff(token=BlobToken(BlobId.new(), 4096)), (fd,))
    finally:
        os.close(fd)
    ended(raw)


@pytest.mark.parametrize("fds_with", ["stats", "put twice"])
def test_the_wrong_number_of_fds(raw: Raw, fds_with: str) -> None:
    first, second = sealed_memfd(4096), sealed_memfd(4096)
    try:
        if fds_with == "stats":
            raw.send(Stats(rid=raw.next_rid()), (first,))
        else:
            raw.send(Put(rid=raw.next_rid(), size=4096), (first, second))
    finally:
        os.close(first)
        os.close(second)
    ended(raw)


def test_a_put_without_its_fd(raw: Raw) -> None:
    raw.send(Put(rid=raw.next_rid(), size=10))
    ended(raw)


# -- fds the broker refuses, and the connection carries on ----------------------------------


def _pipe() -> int:
    read, write = os.pipe()
    os.close(write)
    return read


def _socket() -> int:
    left, right = socket.socketpair()
    right.close()
    return left.detach()


def _dev_shm_file() -> int:
    path = f"/dev/shm/blobplane-tests-hostile-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    os.ftruncate(fd, 4096)
    return fd


def _directory() -> int:
    return os.open("/", os.O_RDONLY | os.O_DIRECTORY)


FdMaker = Callable[[], int]


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (_pipe, "WrongKind"),
        (_socket, "WrongKind"),
        (_directory, "WrongKind"),
        (lambda: sealed_memfd(4096, 0), "NotSealed"),  # an unsealed memfd
        (lambda: sealed_memfd(4096, 0, sealing=False), "NotSealed"),  # no MFD_ALLOW_SEALING
        (_dev_shm_file, "NotSealed"),  # tmpfs: F_SEAL_SEAL alone
        (lambda: sealed_memfd(4096, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW), "NotSealed"),
        (lambda: sealed_memfd(4096, SEALS_OF_A_SLOT), "NotSealed"),  # not a pooled put
        (lambda: sealed_memfd(100), "DescriptorTooShort"),  # it says 4096 bytes: a lie
    ],
    ids=[
        "pipe",
        "socket",
        "directory",
        "unsealed memfd",
        "memfd without sealing",
        "/dev/shm file",
        "size seals only",
        "future-write seal",
        "size lie",
    ],
)
def test_a_put_of_an_fd_the_broker_refuses(raw: Raw, make: FdMaker, error: str) -> None:
    fd = make()
    try:
        reply, fds = raw.call(Put(rid=raw.next_rid(), size=4096, key="refused"), (fd,))
    finally:
        os.close(fd)
    refused((reply, fds), error)
    reply, fds = raw.call(Stats(rid=raw.next_rid()))  # the connection carries on
    assert isinstance(reply, StatsReply)


def test_a_pool_slot_may_be_put_pooled(raw: Raw) -> None:
    fd = sealed_memfd(8192, SEALS_OF_A_SLOT)
    try:
        reply, _ = raw.call(Put(rid=raw.next_rid(), size=5000, pooled=True), (fd,))
    finally:
        os.close(fd)
    assert isinstance(reply, BlobReply)
    assert reply.blob.pooled


def test_what_a_reader_gets_is_read_only_and_sealed(raw: Raw) -> None:
    fd = sealed_memfd(4096)
    try:
        reply, _ = raw.call(Put(rid=raw.next_rid(), size=4096), (fd,))
    finally:
        os.close(fd)
    assert isinstance(reply, BlobReply)
    blob = reply.blob.id
    reply, (got,) = raw.call(Get(rid=raw.next_rid(), id=blob))
    try:
        assert fcntl.fcntl(got, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(got, fcntl.F_GET_SEALS) & FULL_SEALS == FULL_SEALS
        with pytest.raises(PermissionError):
            mmap.mmap(got, 4096, access=mmap.ACCESS_WRITE)
    finally:
        os.close(got)
    assert isinstance(raw.call(Delete(rid=raw.next_rid(), id=blob))[0], Ok)


# -- sealing --------------------------------------------------------------------------------


def test_seal_while_mapped_writable_is_refused_until_the_mapping_goes(raw: Raw) -> None:
    reply, (fd,) = raw.call(Create(rid=raw.next_rid(), size=4096, key="busy"))
    assert isinstance(reply, BlobReply)
    blob = reply.blob.id
    mapped = mmap.mmap(fd, 4096)
    mapped[:2] = b"hi"
    message = refused(raw.call(Seal(rid=raw.next_rid(), id=blob)), "BlobBusy")
    assert "writable mapping" in message
    mapped.close()
    reply, _ = raw.call(Seal(rid=raw.next_rid(), id=blob))
    assert isinstance(reply, Ok)
    # The client's writable fd can no longer change anything.
    with pytest.raises(PermissionError):
        os.write(fd, b"late")
    os.close(fd)
    refused(raw.call(Seal(rid=raw.next_rid(), id=blob)), "BlobSealed")
    assert isinstance(raw.call(Delete(rid=raw.next_rid(), id=blob))[0], Ok)


def test_sealing_what_is_not_yours(broker: Broker, raw: Raw) -> None:
    with connect_broker(broker.socket_path) as owner, owner.create(10) as blob:
        refused(raw.call(Seal(rid=raw.next_rid(), id=blob.id.uuid)), "NotOwner")
    refused(raw.call(Seal(rid=raw.next_rid(), id=uuid.uuid4())), "BlobNotFound")


def test_a_create_larger_than_the_host(raw: Raw) -> None:
    message = refused(raw.call(Create(rid=raw.next_rid(), size=2**50)), "InvalidSize")
    assert "larger than this host" in message


# -- clients that leave in the middle ---------------------------------------------------------


def test_a_client_that_leaves_while_its_get_waits(broker: Broker, raw: Raw) -> None:
    reply, (fd,) = raw.call(Create(rid=raw.next_rid(), size=4096))
    os.close(fd)
    assert isinstance(reply, BlobReply)
    waiter = Raw(broker.socket_path)
    waiter.send(Get(rid=waiter.next_rid(), id=reply.blob.id, timeout_ms=60_000))
    with connect_broker(broker.socket_path) as watcher:
        wait_until(lambda: watcher.stats().waiting_gets == 1, "the get to wait")
        waiter.close()
        wait_until(lambda: watcher.stats().waiting_gets == 0, "the waiting get to go")


def test_a_client_that_leaves_before_reading_its_replies(broker: Broker) -> None:
    with connect_broker(broker.socket_path) as watcher:
        before = watcher.stats()
        leaver = Raw(broker.socket_path)
        for _ in range(20):
            leaver.send(Create(rid=leaver.next_rid(), size=1 << 20))
        leaver.close()
        wait_until(lambda: watcher.stats().clients == before.clients, "the leaver's disconnect")
        after = watcher.stats()
        assert after.allocated == before.allocated
        assert after.bytes == before.bytes


def test_a_client_that_does_not_read_its_replies_stalls_only_itself(
    broker: Broker, raw: Raw, isolated: BrokerClient
) -> None:
    # The broker stops taking requests from a connection whose replies back up
    # (or its memory would grow without bound), serves everyone else meanwhile,
    # and answers every request, in order, once the client reads again.
    sent: list[int] = []
    for _ in range(200_000):
        rid = raw.next_rid()
        try:
            raw.channel.send(UserPayload(data=protocol.encode(Stats(rid=rid))), timeout=0.5)
        except Timeout:
            break  # not sent: a datagram goes out whole or not at all
        sent.append(rid)
    else:
        pytest.fail("the broker never stopped taking requests")
    assert isolated.stats().clients >= 2  # the others are served meanwhile
    answered = []
    for _ in sent:
        reply, fds = raw.receive()
        assert fds == ()
        assert isinstance(reply, StatsReply), reply
        answered.append(reply.rid)
    assert answered == sent
    reply, _ = raw.call(Stats(rid=raw.next_rid()))  # and it carries on
    assert isinstance(reply, StatsReply)
