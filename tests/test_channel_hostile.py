"""A hostile peer, written here with raw sendmsg(), against both channel flavours.

Two kinds of bad input. A descriptor that must not be mapped (wrong kind,
unsealed, too short) is refused: the receiver raises, the peer gets an
ErrorReply, and the channel carries on. A protocol violation (garbage,
oversize frames, wrong fd counts) ends the connection: the receiver raises
RemoteProtocolError every time from then on and the peer gets an ErrorReply
saying why, then end of stream. Either way no fd is left open (`no_leaks`).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from blobplane import BlobId, BlobToken
from blobplane.errors import (
    ConnectionClosed,
    DescriptorTooShort,
    NotSealed,
    RemoteProtocolError,
    UnsafeDescriptor,
    WrongKind,
)
from blobplane.wire import (
    Ack,
    BlobHandoff,
    Connection,
    ErrorReply,
    Message,
    PeerClosed,
    Received,
    UserPayload,
)
from children import run_python
from leaks import open_fds
from test_channel import WAIT, Driven, Flavour, flavour  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("no_leaks")

SIZE = 4096
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class Hostile:
    """The peer's end as a raw socket; it encodes with a wire connection when it wants to."""

    def __init__(self, sock: socket.socket, framing: str) -> None:
        self.sock = sock
        self.wire = Connection("datagram" if framing == "seqpacket" else "stream")

    def sendmsg(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], rights)

    def handoff(self, fd: int, size: int = SIZE) -> int:
        """A well-formed handoff of *fd*: only the descriptor is wrong."""
        message = BlobHandoff(id=self.wire.next_id(), token=BlobToken(BlobId.new(), size))
        data, _ = self.wire.send(message, (fd,))
        self.sendmsg(data, (fd,))
        return message.id

    def replies(self) -> Iterator[Message | None]:
        """What the channel answers; None at end of stream."""
        self.sock.settimeout(WAIT)
        while True:
            event = self.wire.next_event()
            if isinstance(event, Received):
                yield event.message
            elif isinstance(event, PeerClosed):
                yield None
                return
            else:
                self.wire.receive_data(self.sock.recv(65536))


@pytest.fixture(params=["seqpacket", "stream"])
def framing(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def duel(flavour: Flavour, framing: str) -> Iterator[tuple[Driven, Hostile]]:  # noqa: F811
    kind = socket.SOCK_SEQPACKET if framing == "seqpacket" else socket.SOCK_STREAM
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    tested = flavour.wrap(ours, timeout=WAIT)
    yield tested, Hostile(theirs, framing)
    tested.close()
    theirs.close()


# -- descriptors that must not be mapped ------------------------------------------------


def memfd(size: int = SIZE, *, sealing: bool = True, seals: int = 0, content: bytes = b"") -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
    fd = os.memfd_create("hostile", flags)
    os.ftruncate(fd, size)
    os.pwrite(fd, content, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@dataclass
class BadFd:
    name: str
    make: Callable[[Path], tuple[int, ...]]  # the fd to send first, then any to close after
    error: type[UnsafeDescriptor]
    code: str
    text: str
    truncate_after_sending: bool = False


def _pipe(_: Path) -> tuple[int, ...]:
    read_end, write_end = os.pipe()
    return read_end, write_end


def _socket(_: Path) -> tuple[int, ...]:
    left, right = socket.socketpair()
    return left.detach(), right.detach()


def _directory(tmp: Path) -> tuple[int, ...]:
    return (os.open(tmp, os.O_RDONLY | os.O_DIRECTORY),)


def _dev_shm_file(tmp: Path) -> tuple[int, ...]:
    path = f"/dev/shm/hostile-{os.getpid()}-{tmp.name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    os.ftruncate(fd, SIZE)
    return (fd,)


def _disk_file(tmp: Path) -> tuple[int, ...]:
    fd = os.open(tmp / "blob", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    return (fd,)


BAD_FDS = [
    BadFd("pipe", _pipe, WrongKind, "wrong-kind", "is a pipe"),
    BadFd("socket", _socket, WrongKind, "wrong-kind", "is a socket"),
    BadFd("directory", _directory, WrongKind, "wrong-kind", "is a directory"),
    BadFd("/dev/shm file", _dev_shm_file, NotSealed, "not-sealed", "lacks F_SEAL_SHRINK"),
    BadFd("file on disk", _disk_file, NotSealed, "not-sealed", "filesystem without seals"),
    BadFd("unsealed memfd", lambda _: (memfd(),), NotSealed, "not-sealed", "lacks F_SEAL_SHRINK"),
    BadFd(
        "unsealed memfd, truncated after sending",
        lambda _: (memfd(),),
        DescriptorTooShort,
        "too-short",
        "holds 0 bytes",
        truncate_after_sending=True,
    ),
    BadFd(
        "memfd without MFD_ALLOW_SEALING",
        lambda _: (memfd(sealing=False),),
        NotSealed,
        "not-sealed",
        "lacks F_SEAL_SHRINK",
    ),
    BadFd(
        "memfd sealed against writes only",
        lambda _: (memfd(seals=fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL),),
        NotSealed,
        "not-sealed",
        "lacks F_SEAL_SHRINK",
    ),
    BadFd(
        "memfd shorter than its token",
        lambda _: (memfd(SIZE // 2, seals=SEALS),),
        DescriptorTooShort,
        "too-short",
        f"holds {SIZE // 2} bytes but its token says {SIZE}",
    ),
]


@pytest.mark.parametrize("bad", BAD_FDS, ids=lambda b: b.name)
def test_an_unsafe_descriptor_is_refused_and_the_channel_carries_on(
    duel: tuple[Driven, Hostile], bad: BadFd, tmp_path: Path
) -> None:
    tested, hostile = duel
    fds = bad.make(tmp_path)
    try:
        request_id = hostile.handoff(fds[0])
        if bad.truncate_after_sending:
            os.ftruncate(fds[0], 0)
    finally:
        for fd in fds:
            os.close(fd)
    before = open_fds()  # the fd in flight is nobody's yet
    with pytest.raises(bad.error, match=bad.text):
        tested.recv_blob()
    assert open_fds() == before, "the refused fd was closed, not leaked"
    replies = hostile.replies()
    refusal = next(replies)
    assert isinstance(refusal, ErrorReply)
    assert (refusal.reply_to, refusal.code) == (request_id, bad.code)
    assert bad.text.split()[0] in refusal.message
    # The next, honest blob goes through on the same channel.
    good = memfd(seals=SEALS, content=b"honest")
    try:
        good_id = hostile.handoff(good)
    finally:
        os.close(good)
    with tested.recv_blob() as mapped, mapped.as_slice() as view:
        assert bytes(view[:6]) == b"honest"
    assert next(replies) == Ack(id=refusal.id + 1, reply_to=good_id)


# -- protocol violations ------------------------------------------------------------------


def header(length: int, fd_count: int = 0, version: int = 1, magic: bytes = b"BP") -> bytes:
    return struct.pack(">2sBBI", magic, version, fd_count, length)


def framed(fields: dict[str, object], fd_count: int = 0, version: int = 1) -> bytes:
    payload = msgspec.msgpack.encode(fields)
    return header(len(payload), fd_count, version) + payload


def handoff_fields() -> dict[str, object]:
    token = {"id": {"uuid": BlobId.new().uuid.bytes}, "size": SIZE, "lease_ms": None}
    return {"type": "handoff", "id": 1, "token": token, "kind": "memfd", "fds": 1}


@dataclass
class Attack:
    name: str
    data: bytes
    fd_count: int  # pipes sent along (each a read end and a write end: 2 fds a pipe)
    error: str
    framings: tuple[str, ...] = ("seqpacket", "stream")


ATTACKS = [
    Attack("garbage", b"\x00\xffGET / HTTP/1.1\r\n\r\n", 0, "not a blobplane frame"),
    Attack(
        "oversize datagram",
        header(70_000) + b"x" * 70_000,
        0,
        "longer than the maximum frame size of 65536 bytes",
        framings=("seqpacket",),
    ),
    Attack("oversize frame", header(10_000_000) + b"x", 0, "over the maximum frame size"),
    Attack("version 9", framed({"type": "payload", "id": 1}, version=9), 0, "version 9"),
    Attack("unknown type", framed({"type": "rm -rf", "id": 1}), 0, "unknown message type"),
    Attack("fd announced, none sent", framed(handoff_fields(), 1), 0, "fd count mismatch"),
    Attack("more fds than announced", framed(handoff_fields(), 1), 2, "fd count mismatch"),
    Attack("more fds than allowed", framed(handoff_fields(), 1), 10, "per-message maximum"),
    Attack(
        "ack of nothing",
        framed({"type": "ack", "id": 1, "reply_to": 42}),
        0,
        "acknowledges request 42",
    ),
]


@pytest.mark.parametrize(
    ("attack", "framing"),
    [
        pytest.param(attack, framing, id=f"{attack.name}-{framing}")
        for attack in ATTACKS
        for framing in attack.framings
    ],
)
def test_a_protocol_violation_ends_the_connection(
    duel: tuple[Driven, Hostile], attack: Attack, framing: str
) -> None:
    tested, hostile = duel
    pipes = [os.pipe() for _ in range(attack.fd_count)]
    fds = tuple(fd for pipe in pipes for fd in pipe)
    try:
        hostile.sendmsg(attack.data, fds)
    finally:
        for fd in fds:
            os.close(fd)
    # Counted, not compared: listing /proc/self/fd takes the lowest free number itself.
    before = len(open_fds()) - 1  # the channel's socket goes too
    for _ in range(2):  # and the same again: the error is sticky
        with pytest.raises(RemoteProtocolError, match=attack.error):
            tested.recv()
    replies = list(hostile.replies())
    assert len(replies) == 2, replies
    farewell, end = replies
    assert isinstance(farewell, ErrorReply)
    assert (farewell.reply_to, farewell.code) == (0, "protocol-error")
    assert end is None, "the channel hung up"
    assert len(open_fds()) == before, "the socket and every fd of the attack are closed"
    with pytest.raises(RemoteProtocolError):
        tested.send(b"too late")


def test_a_peer_gone_in_the_middle_of_a_frame_is_connection_closed(
    duel: tuple[Driven, Hostile],
) -> None:
    tested, hostile = duel
    data, _ = hostile.wire.send(UserPayload(data=b"cut short"))
    hostile.sendmsg(data[:-4])
    hostile.sock.close()
    expected = "the peer went away in the middle of a message|truncated frame"
    with pytest.raises((ConnectionClosed, RemoteProtocolError), match=expected):
        tested.recv()


def test_the_truncation_attack_from_another_process(flavour: Flavour) -> None:  # noqa: F811
    """A real second process hands over a memfd it keeps writable and shrinks at once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tested = flavour.wrap(ours, timeout=WAIT)
    child = """
        import array, fcntl, os, socket, sys
        from blobplane import BlobId, BlobToken
        from blobplane.wire import BlobHandoff, Connection
        sock = socket.socket(fileno=int(sys.argv[1]))
        wire = Connection("datagram")
        def handoff(fd, size):
            data, _ = wire.send(BlobHandoff(token=BlobToken(BlobId.new(), size)), (fd,))
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        evil = os.memfd_create("evil", os.MFD_ALLOW_SEALING)
        os.ftruncate(evil, 1 << 20)
        handoff(evil, 1 << 20)
        os.ftruncate(evil, 0)  # the attack: shrink it under the reader
        good = os.memfd_create("good", os.MFD_ALLOW_SEALING)
        os.posix_fallocate(good, 0, 1 << 20)  # every page allocated: a sparse one is refused
        os.pwrite(good, b"good", 0)
        fcntl.fcntl(good, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        handoff(good, 1 << 20)
    """
    try:
        run_python(child, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        theirs.close()
        # Refused whichever check it meets first: too short by now, and never sealed.
        with pytest.raises((DescriptorTooShort, NotSealed)):
            tested.recv_blob()
        with tested.recv_blob() as mapped, mapped.as_slice() as view:
            assert bytes(view[:4]) == b"good"
            assert view[-1] == 0
        with pytest.raises(ConnectionClosed):
            tested.recv()
    finally:
        tested.close()
        theirs.close()


def test_fds_dropped_by_the_kernel_name_the_limit() -> None:
    """At RLIMIT_NOFILE the kernel drops received fds (MSG_CTRUNC): say so, leak nothing."""
    child = """
        import array, os, resource, socket
        from blobplane.channel import Channel
        from blobplane.errors import TooManyOpenFiles
        from blobplane.wire import Connection, UserPayload
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel = Channel(ours, timeout=5)
        pipes = [os.pipe() for _ in range(4)]
        fds = [fd for pipe in pipes for fd in pipe]
        data, _ = Connection().send(UserPayload(data=b"fds"), fds)
        theirs.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        used = {int(name) for name in os.listdir("/proc/self/fd")}
        open_now = len(used)
        # The limit bounds fd numbers: leave exactly two free numbers below it.
        limit = next(n for n in range(1 << 16) if len(set(range(n)) - used) == 2)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            channel.recv()
        except TooManyOpenFiles as exc:
            print(exc)
        assert len(os.listdir("/proc/self/fd")) <= open_now, "the fds that did arrive are closed"
    """
    message = run_python(child).stdout
    assert "MSG_CTRUNC" in message
    assert "RLIMIT_NOFILE soft limit" in message
