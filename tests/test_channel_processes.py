"""Channels between real processes: round trips in every flavour pairing, thousands of
handoffs with fd counts on both sides, a sender that exits or is killed mid-stream."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from blobplane import BlobBackend, ProducerBlob, SharedMemoryBlobs
from blobplane.channel import Transport, aio, listen
from blobplane.errors import ConnectionClosed
from blobplane.wire import UserPayload
from children import CHILD_TIMEOUT_S
from leaks import open_fds
from test_channel import WAIT

pytestmark = pytest.mark.usefixtures("no_leaks")

# One script plays every child: producer or consumer, sync or asyncio. It
# prints its fd count before and after the exchange, which must match.
CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, os, sys
    from blobplane import BlobBackend, SharedMemoryBlobs, channel
    from blobplane.channel import aio

    role, flavour, path, count, size = sys.argv[1:6]
    count, size = int(count), int(size)

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def sealed(blobs, i):
        blob = blobs.create(size)
        data = (i.to_bytes(4, "little") * (size // 4 + 1))[:size]
        blob.write_all(data)
        blob.seal()
        return blob, hashlib.sha256(data).digest()

    def check(handoff):
        with handoff, handoff.blob.as_slice() as view:
            assert hashlib.sha256(view).digest() == handoff.meta, "checksum"

    def run_sync():
        with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs, channel.connect(path) as ch:
            before = fds()
            if role == "produce":
                for i in range(count):
                    blob, digest = sealed(blobs, i)
                    with blob:
                        ch.send_blob(blob, meta=digest)
                ch.send(b"done")
                assert ch.recv()[0].data == b"received %d" % count
            else:
                for _ in range(count):
                    check(ch.recv_handoff())
                ch.send(b"received %d" % count)
            print(before, fds(), flush=True)

    async def run_async():
        with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs:
            async with await aio.connect(path) as ch:
                before = fds()
                if role == "produce":
                    for i in range(count):
                        blob, digest = sealed(blobs, i)
                        with blob:
                            await ch.send_blob(blob, meta=digest)
                    await ch.send(b"done")
                    assert (await ch.recv())[0].data == b"received %d" % count
                else:
                    for _ in range(count):
                        check(await ch.recv_handoff())
                    await ch.send(b"received %d" % count)
                print(before, fds(), flush=True)

    run_sync() if flavour == "sync" else asyncio.run(run_async())
    """
)


def start(role: str, flavour: str, path: str, count: int, size: int) -> subprocess.Popen[str]:
    args = [role, flavour, path, str(count), str(size)]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen[str]) -> None:
    """The child must succeed and end with as many fds open as it started with."""
    out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, err
    before, after = map(int, out.split())
    assert before == after, f"the child ended with {after - before} more fds"


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "control.sock")


@dataclass(frozen=True)
class Pairing:
    parent: str  # flavour of this process: "sync" or "aio"
    child: str  # flavour of the child process
    producer: str  # "parent" or "child"
    transport: Transport
    count: int  # handoffs
    size: int  # bytes a blob

    def __str__(self) -> str:
        return f"{self.parent}-{self.child}-{self.producer}-produces-{self.transport}-{self.count}"


PAIRINGS = [
    Pairing("sync", "sync", "child", "seqpacket", 2000, 4096),
    Pairing("sync", "sync", "parent", "stream", 50, 64 << 10),
    Pairing("sync", "aio", "child", "seqpacket", 50, 64 << 10),
    Pairing("aio", "sync", "parent", "seqpacket", 50, 64 << 10),
    Pairing("aio", "aio", "child", "seqpacket", 50, 64 << 10),
    Pairing("aio", "aio", "parent", "stream", 50, 64 << 10),
]


@pytest.mark.parametrize("pairing", PAIRINGS, ids=str)
def test_round_trip_between_processes(socket_path: str, pairing: Pairing) -> None:
    fds_before = open_fds()
    if pairing.parent == "sync":
        child = sync_parent(socket_path, pairing)
    else:
        child = asyncio.run(async_parent(socket_path, pairing))
    finish(child)
    assert open_fds() == fds_before


def child_role(pairing: Pairing) -> str:
    return "produce" if pairing.producer == "child" else "consume"


def sync_parent(path: str, pairing: Pairing) -> subprocess.Popen[str]:
    count = pairing.count
    with listen(path, transport=pairing.transport, timeout=WAIT) as listener:
        child = start(child_role(pairing), pairing.child, path, count, pairing.size)
        with listener.accept() as ch:
            assert ch.peer_credentials.pid == child.pid
            if pairing.producer == "parent":
                with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs:
                    for i in range(count):
                        with sealed(blobs, i, pairing.size) as (blob, digest):
                            ch.send_blob(blob, meta=digest)
                assert ch.recv()[0] == UserPayload(id=count + 1, data=b"received %d" % count)
            else:
                for _ in range(count):
                    with ch.recv_handoff() as handoff, handoff.blob.as_slice() as view:
                        assert hashlib.sha256(view).digest() == handoff.meta
                assert ch.recv()[0] == UserPayload(id=count + 1, data=b"done")
                ch.send(b"received %d" % count)
    return child


async def async_parent(path: str, pairing: Pairing) -> subprocess.Popen[str]:
    count = pairing.count
    async with aio.listen(path, transport=pairing.transport, timeout=WAIT) as listener:
        child = start(child_role(pairing), pairing.child, path, count, pairing.size)
        async with await listener.accept() as ch:
            if pairing.producer == "parent":
                with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs:
                    for i in range(count):
                        with sealed(blobs, i, pairing.size) as (blob, digest):
                            await ch.send_blob(blob, meta=digest)
                received = UserPayload(id=count + 1, data=b"received %d" % count)
                assert (await ch.recv())[0] == received
            else:
                for _ in range(count):
                    with await ch.recv_handoff() as handoff, handoff.blob.as_slice() as view:
                        assert hashlib.sha256(view).digest() == handoff.meta
                assert (await ch.recv())[0] == UserPayload(id=count + 1, data=b"done")
                await ch.send(b"received %d" % count)
    return child


@contextmanager
def sealed(blobs: SharedMemoryBlobs, i: int, size: int) -> Iterator[tuple[ProducerBlob, bytes]]:
    """Blob number *i*, filled as the child fills its own, with its checksum."""
    with blobs.create(size) as blob:
        data = (i.to_bytes(4, "little") * (size // 4 + 1))[:size]
        blob.write_all(data)
        blob.seal()
        yield blob, hashlib.sha256(data).digest()


# -- the sender leaves --------------------------------------------------------------------

LEAVING_SENDER = """
import sys
from blobplane import BlobBackend, SharedMemoryBlobs, channel
with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs, channel.connect(sys.argv[1]) as ch:
    for i in range(3):
        with blobs.create(1 << 20) as blob:
            blob.write_all(bytes([i + 1]) * (1 << 20))
            blob.seal()
            ch.send_blob(blob, wait=False)
# Cleaned up, closed, and now gone entirely.
"""


def test_received_blobs_outlive_the_sender(socket_path: str) -> None:
    with listen(socket_path, timeout=WAIT) as listener:
        child = subprocess.Popen([sys.executable, "-c", LEAVING_SENDER, socket_path])
        with listener.accept() as ch:
            assert child.wait(CHILD_TIMEOUT_S) == 0
            # Everything was sent before the sender exited; the acks find nobody.
            mapped = [ch.recv_blob() for _ in range(3)]
            with pytest.raises(ConnectionClosed):
                ch.recv_blob()
        for i, blob in enumerate(mapped, start=1):
            with blob, blob.as_slice() as view:
                assert view[0] == view[-1] == i
                assert view.tobytes() == bytes([i]) * (1 << 20)


BYTES_ECHO = """
import hashlib, sys
from blobplane import channel
with channel.connect(sys.argv[1]) as ch:
    for _ in range(int(sys.argv[2])):
        with ch.recv_bytes() as data, data.as_slice() as view:
            ch.send(hashlib.sha256(view).digest())
    ch.send_bytes(b"z" * (1 << 20))  # and one back, large, which we must map
"""


def test_send_bytes_reaches_another_process_at_every_size(socket_path: str) -> None:
    sizes = [0, 3, 4096, 65_000, 65_536, 3 << 20]
    with listen(socket_path, timeout=WAIT) as listener:
        child = subprocess.Popen([sys.executable, "-c", BYTES_ECHO, socket_path, str(len(sizes))])
        with listener.accept() as ch:
            for size in sizes:
                data = os.urandom(size)
                ch.send_bytes(data)
                message, fds = ch.recv()
                assert fds == ()
                assert isinstance(message, UserPayload)
                assert message.data == hashlib.sha256(data).digest(), size
            with ch.recv_bytes() as back, back.as_slice() as view:
                assert view == b"z" * (1 << 20)
        assert child.wait(CHILD_TIMEOUT_S) == 0


ENDLESS_SENDER = """
import sys
from blobplane import BlobBackend, SharedMemoryBlobs, channel
transport = sys.argv[2]
with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs, channel.connect(sys.argv[1]) as ch:
    while True:
        if transport == "stream":
            ch.send(b"x" * 60_000)  # big frames, so that a kill lands inside one
            continue
        with blobs.create(1 << 20) as blob:
            blob.seal()
            ch.send_blob(blob)
"""


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        child.kill()
        child.wait(CHILD_TIMEOUT_S)


@pytest.mark.parametrize("transport", ["seqpacket", "stream"])
def test_a_sender_killed_mid_stream_is_connection_closed(
    socket_path: str, transport: Transport, reap: list[subprocess.Popen[bytes]]
) -> None:
    with listen(socket_path, transport=transport, timeout=WAIT) as listener:
        child = subprocess.Popen([sys.executable, "-c", ENDLESS_SENDER, socket_path, transport])
        reap.append(child)
        with listener.accept() as ch:
            for _ in range(5):
                if transport == "stream":
                    assert len(ch.recv()[0].data) == 60_000  # type: ignore[union-attr]
                else:
                    ch.recv_blob().close()
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(CHILD_TIMEOUT_S) == -signal.SIGKILL
            # What was in flight still arrives, then the end: never a hang, never a crash.
            with pytest.raises(ConnectionClosed):  # noqa: PT012
                for _ in range(100_000):
                    for fd in ch.recv()[1]:
                        os.close(fd)
            with pytest.raises(ConnectionClosed):
                ch.recv()


ENDLESS_RECEIVER = """
import sys
from blobplane import channel
with channel.connect(sys.argv[1]) as ch:
    while True:
        ch.recv_blob().close()
"""


def test_a_receiver_killed_mid_stream_is_connection_closed(
    socket_path: str, reap: list[subprocess.Popen[bytes]]
) -> None:
    with listen(socket_path, timeout=WAIT) as listener:
        child = subprocess.Popen([sys.executable, "-c", ENDLESS_RECEIVER, socket_path])
        reap.append(child)
        with (
            listener.accept() as ch,
            SharedMemoryBlobs(BlobBackend.MEMFD) as blobs,
            blobs.create(1 << 16) as blob,
        ):
            blob.seal()
            for _ in range(5):
                ch.send_blob(blob)
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(CHILD_TIMEOUT_S) == -signal.SIGKILL
            for _ in range(2):
                with pytest.raises(ConnectionClosed):
                    ch.send_blob(blob)
