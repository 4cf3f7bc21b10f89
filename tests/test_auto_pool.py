"""The pool behind `send_bytes` and `send_obj`: slots by size class, reused, bounded, dropped
when idle, safe against a reader that tries to write and a producer killed mid-stream."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import gc
import hashlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobplane import AutoPool, channel
from blobplane.auto_pool import slot_class
from blobplane.backends.checks import F_SEAL_FUTURE_WRITE
from blobplane.channel import aio
from blobplane.errors import ConnectionClosed, InvalidSize, PeerRefused, Timeout
from blobplane.fds import close_fds
from blobplane.objects import recv_obj_async, send_obj_async
from blobplane.wire import Ack, BlobHandoff, ErrorCode, ErrorReply, UserPayload
from children import CHILD_TIMEOUT_S
from leaks import open_fds

pytestmark = pytest.mark.usefixtures("no_leaks")

MIB = 1 << 20


def payload(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


@given(st.integers(min_value=1, max_value=1 << 40))
def test_a_size_class_holds_the_size_with_at_most_a_quarter_more(size: int) -> None:
    size_class = slot_class(size)
    assert size_class % mmap.PAGESIZE == 0
    quarter_more = -(-size * 5 // 4 // mmap.PAGESIZE) * mmap.PAGESIZE
    assert size <= size_class <= max(mmap.PAGESIZE, quarter_more)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(InvalidSize):
        AutoPool(max_bytes=-1)
    with pytest.raises(InvalidSize):
        AutoPool(idle_seconds=0)
    left, right = channel.socketpair()
    with left, right, pytest.raises(TypeError):
        left.auto_pool = "big"  # type: ignore[assignment]


def test_slots_are_reused_by_class_and_bounded() -> None:
    pool = AutoPool(max_bytes=3 * MIB)
    try:
        first = pool.try_loan(MIB)
        assert first is not None
        assert first.length == MIB
        first.close()
        again = pool.try_loan(MIB - 4096)  # the same class: the same slot
        assert again is not None
        assert (again.pool, again.slot) == (first.pool, first.slot)
        second = pool.try_loan(MIB)
        third = pool.try_loan(MIB)
        assert second is not None
        assert third is not None
        assert pool.try_loan(MIB) is None  # 3 MiB held, and nothing idle to drop
        assert pool.bytes == 3 * MIB
        for loan in (again, second, third):
            loan.close()
        # A larger class finds room by dropping free slots of others.
        big = pool.try_loan(2 * MIB)
        assert big is not None
        assert pool.bytes <= 3 * MIB
        big.close()
        assert pool.try_loan(4 * MIB) is None  # over the bound on its own
    finally:
        pool.close()
    assert pool.try_loan(MIB) is None  # closed: no more slots


# One child plays the other end: it receives pooled bytes (sync or asyncio) and
# answers with their digests, or it produces them until it is killed.
CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, os, sys
    from blobplane import AutoPool, channel
    from blobplane.channel import aio

    role, flavour, fd, count, size = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])

    def payload(i):
        return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]

    def consume_sync():
        with channel.from_socket(fd) as ch:
            digests = b""
            for _ in range(count):
                with ch.recv_bytes() as data, data.as_slice() as view:
                    assert view.readonly
                    digests += hashlib.sha256(view).digest()
            ch.send(digests)
            ch.recv()  # the end

    async def consume_async():
        async with aio.from_socket(fd) as ch:
            digests = b""
            for _ in range(count):
                with await ch.recv_bytes() as data, data.as_slice() as view:
                    digests += hashlib.sha256(view).digest()
            await ch.send(digests)
            await ch.recv()

    def produce():
        with channel.from_socket(fd) as ch:
            ch.auto_pool = AutoPool(max_bytes=8 * size)
            sealed = role == "produce-sealed"
            i = 0
            while True:
                ch.send_bytes(payload(i), sealed=sealed)
                i += 1

    if role == "consume":
        consume_sync() if flavour == "sync" else asyncio.run(consume_async())
    else:
        produce()
    """
)


def start(
    role: str, flavour: str, sock: socket.socket, count: int, size: int
) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, role, flavour, str(sock.fileno()), str(count), str(size)],
            pass_fds=[sock.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        sock.close()


def finish(child: subprocess.Popen[str]) -> None:
    _, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, err


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_pooled_bytes_reach_another_process_intact_and_their_slots_come_back(
    flavour: str,
) -> None:
    count, size = 40, MIB + 123
    expected = b"".join(hashlib.sha256(payload(i, size)).digest() for i in range(count))
    pool = AutoPool(max_bytes=4 * slot_class(size))  # then fresh blobs, waited for
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = start("consume", flavour, theirs, count, size)
    try:
        with channel.from_socket(ours, timeout=CHILD_TIMEOUT_S) as ch:
            ch.auto_pool = pool
            for i in range(count):
                ch.send_bytes(payload(i, size))
            # The library took the releases: recv() sees the child's message alone.
            message, fds = ch.recv()
            assert fds == ()
            assert message == UserPayload(id=message.id, data=expected)
            # At most the bound's 4 slots, each free again.
            assert 1 <= pool.slots <= 4
            held = pool.bytes
            assert pool.shrink(0) == held
            ch.send(b"end")
        finish(child)
        assert pool.slots == 0
    finally:
        child.kill()
        child.wait()
        pool.close()


def test_async_pooled_bytes_and_objects_between_two_channels() -> None:
    pool = AutoPool()

    async def main() -> None:
        left, right = aio.socketpair()
        async with left, right:
            left.auto_pool = pool
            for i in range(5):
                await left.send_bytes(payload(i, 300_000))
                with await right.recv_bytes() as data, data.as_slice() as view:
                    assert bytes(view) == payload(i, 300_000)
            assert pool.slots == 1
            numbers = list(range(100_000))
            await send_obj_async(left, numbers)
            assert await recv_obj_async(right) == numbers
            assert pool.slots == 2  # its packed size is of another class

    asyncio.run(main())
    pool.close()


def take_raw(ch: channel.Channel) -> tuple[BlobHandoff, int]:
    message, fds = ch.recv()
    assert isinstance(message, BlobHandoff)
    assert len(fds) == 1
    return message, fds[0]


@contextmanager
def producer(role: str, size: int) -> Iterator[tuple[channel.Channel, subprocess.Popen[str]]]:
    """A child that sends payloads of *size* bytes until killed, and our channel to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = start(role, "sync", theirs, 0, size)
    try:
        with channel.from_socket(ours, timeout=CHILD_TIMEOUT_S) as ch:
            yield ch, child
    finally:
        child.kill()
        child.wait()


def test_a_reader_cannot_write_a_pooled_slot_but_sealed_true_freezes_the_bytes() -> None:
    """The child produces; this process reads the raw fds and tries to write them."""
    size = 256 << 10
    with producer("produce", size) as (ch, _):
        handoff, fd = take_raw(ch)
        try:
            assert handoff.slot is not None  # a pooled slot
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & F_SEAL_FUTURE_WRITE
            assert not seals & fcntl.F_SEAL_WRITE
            with pytest.raises(PermissionError):
                mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(PermissionError):
                    os.pwrite(writable, b"x", 0)
            finally:
                os.close(writable)
            assert os.pread(fd, 8, 0) == payload(0, 8)
        finally:
            os.close(fd)
    with producer("produce-sealed", size) as (ch, _):
        handoff, fd = take_raw(ch)
        try:
            assert handoff.slot is None  # a fresh blob
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
            ch.send(Ack(reply_to=handoff.id))
        finally:
            os.close(fd)


def test_a_producer_killed_mid_stream_leaves_intact_frames_and_nothing_behind() -> None:
    size = 512 << 10
    with producer("produce", size) as (ch, child):
        held = []
        for i in range(6):
            data = ch.recv_bytes()
            with data.as_slice() as view:
                assert bytes(view) == payload(i, size)
            if i % 2:
                held.append((i, data))  # still mapped when the producer dies
            else:
                data.close()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=CHILD_TIMEOUT_S)
        for i, data in held:
            with data, data.as_slice() as view:
                assert bytes(view) == payload(i, size)
        with pytest.raises(ConnectionClosed):
            drain(ch)


def drain(ch: channel.Channel) -> None:
    """Receive what was under way until the end."""
    while True:
        ch.recv_bytes().close()


def test_idle_slots_are_closed_without_being_asked() -> None:
    fds_before = open_fds()
    pool = AutoPool(idle_seconds=0.2)
    left, right = channel.socketpair()
    with left, right:
        left.auto_pool = pool
        for i in range(3):
            left.send_bytes(payload(i, 2 * MIB))
            with right.recv_bytes() as data, data.as_slice() as view:
                assert bytes(view[:8]) == payload(i, 8)
        with pytest.raises(Timeout):
            left.recv(timeout=0.1)  # takes the releases in: the slot is free
        assert pool.bytes > 0
        deadline = time.monotonic() + 10
        while pool.bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.bytes == 0  # while both channels are still open
        assert pool.slots == 0
    assert open_fds() == fds_before


ONE_SEND = """
import os
from blobplane import channel
from blobplane.errors import Timeout
left, right = channel.socketpair()
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
left.send_bytes(bytes(2 << 20))  # pooled: its slot is the receiver's until released
with right.recv_bytes() as data:
    assert len(data) == 2 << 20
print(threads() - before)
try:
    left.recv(timeout=0.1)  # takes the release in: the slot is free, and idle from now on
except Timeout:
    pass
print(threads() - before)
"""


def test_the_idle_reaper_starts_when_a_slot_first_comes_back() -> None:
    """A process that sends once and exits never pays for the reaper's thread."""
    result = subprocess.run(
        [sys.executable, "-c", ONE_SEND],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]


def test_a_forked_child_never_shares_a_slot_with_its_parent() -> None:
    pool = AutoPool()
    loan = pool.try_loan(MIB)
    assert loan is not None
    inode = os.fstat(loan.fileno()).st_ino
    loan.close()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            mine = pool.try_loan(MIB)
            fresh = mine is not None and os.fstat(mine.fileno()).st_ino != inode
            code = 0 if fresh and pool.slots == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    again = pool.try_loan(MIB)  # the parent's own slot, untouched
    assert again is not None
    assert os.fstat(again.fileno()).st_ino == inode
    again.close()
    pool.close()


@pytest.mark.parametrize("transport", ["seqpacket", "stream"])
def test_a_release_taken_by_the_library_does_not_hide_what_came_with_it(transport: str) -> None:
    """The peer's release of our slot and its own payload arrive together (one read on a
    stream): the release is taken, and the payload is there for `recv_bytes`."""
    pool = AutoPool()
    left, right = channel.socketpair(transport=transport)  # type: ignore[arg-type]
    with left, right:
        left.auto_pool = right.auto_pool = pool
        left.send_bytes(payload(1, MIB))
        with right.recv_bytes(timeout=5) as data:
            assert len(data) == MIB
        right.send_bytes(payload(2, MIB))  # after the release it owes left
        with left.recv_bytes(timeout=5) as data, data.as_slice() as view:
            assert bytes(view) == payload(2, MIB)
    pool.close()


def test_a_slot_is_never_loaned_to_another_channel_nor_again_once_its_own_closed() -> None:
    """A reader may keep a slot's mapping: what it was sent must never change under it, and
    what is sent to anyone else must never show through it."""
    pool = AutoPool()
    first, first_peer = channel.socketpair()
    second, second_peer = channel.socketpair()
    with first_peer, second, second_peer:
        first.auto_pool = second.auto_pool = pool
        first.send_bytes(payload(1, MIB))
        kept = first_peer.recv_bytes(timeout=5)  # held past the channel's life
        first.close()  # answered and hung up, before the peer released the slot
        second.send_bytes(payload(2, MIB))  # another peer: another slot
        with second_peer.recv_bytes(timeout=5) as data, data.as_slice() as view:
            assert bytes(view) == payload(2, MIB)
        with kept, kept.as_slice() as view:
            assert bytes(view) == payload(1, MIB)
        assert pool.slots == 1  # the closed channel's slot was retired, not reused
    pool.close()


def test_a_channel_dropped_without_close_retires_its_slots() -> None:
    pool = AutoPool()
    left, right = channel.socketpair()
    left.auto_pool = pool
    left.send_bytes(payload(1, MIB))
    right.recv_bytes(timeout=5).close()
    assert pool.slots == 1
    del left
    gc.collect()
    assert pool.slots == 0
    right.close()
    pool.close()


def test_a_refused_pooled_send_is_raised_by_the_next_send() -> None:
    left, right = channel.socketpair()
    with left, right:
        left.auto_pool = pool = AutoPool()
        left.send_bytes(payload(1, MIB))  # under way: the refusal comes later
        message, fds = right.recv(timeout=5)
        close_fds(fds)
        right.send(ErrorReply(reply_to=message.id, code=ErrorCode.TOO_MANY_OPEN_FILES))
        right.send_bytes(b"an answer")
        with left.recv_bytes(timeout=5) as answer:  # recv never sees the refusal
            assert bytes(answer.as_slice()) == b"an answer"
        with pytest.raises(PeerRefused) as refused:
            left.send_bytes(payload(2, MIB))
        assert refused.value.code == ErrorCode.TOO_MANY_OPEN_FILES
        left.send_bytes(payload(3, MIB))  # said once: the channel goes on
        with right.recv_bytes(timeout=5) as data, data.as_slice() as view:
            assert bytes(view) == payload(3, MIB)
    pool.close()


def test_a_forked_child_leaves_the_hole_of_a_parents_slot_alone() -> None:
    """The parent's slot is not mapped in the child (MADV_DONTFORK); memory the child maps
    there is its own, and the child's first use of the pool must not unmap it."""
    pool = AutoPool()
    loan = pool.try_loan(MIB)
    assert loan is not None
    with loan.buffer as view:
        start = ctypes.addressof(ctypes.c_char.from_buffer(view))
    loan.close()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            code = child_keeps_its_memory(pool, start)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # not 4 (replaced), not -11 (unmapped)
    pool.close()


MAP_FIXED_NOREPLACE = 0x100000


def child_keeps_its_memory(pool: AutoPool, start: int) -> int:  # pragma: no cover - in a child
    """Map the child's own memory where the parent's slot is, then use the pool: 0 if that
    memory is intact, 3 if the address was not free, 4 if the memory changed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]  # fmt: skip
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    address = libc.mmap(start, MIB, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if address != start:
        return 3
    ctypes.memmove(address, b"mine", 4)
    mine = pool.try_loan(MIB)  # the child's first use: the parent's slot is forgotten
    if mine is None or ctypes.string_at(address, 4) != b"mine":
        return 4
    mine.close()
    return 0
