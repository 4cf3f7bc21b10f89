"""Publish/subscribe of frames across real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from blobplane import channel
from blobplane.errors import (
    BlobError,
    DescriptorTooShort,
    InvalidSize,
    NotSealed,
    RemoteProtocolError,
    SlotRewritten,
    StreamEnded,
    Timeout,
    WrongKind,
)
from blobplane.pool import POOL_SEALS, sealed_memfd
from blobplane.slot_claims import try_claim_exclusive, unclaim
from blobplane.streams import AsyncSubscriber, Backpressure, Publisher, Receipt, Subscriber
from blobplane.streams.protocol import Hello, Slots, decode, encode
from blobplane.streams.ring import (
    ENTRIES_AT,
    ENTRY,
    ENTRY_SIZE,
    RELEASE_SEALS,
    release_size,
    require_ordered_memory,
    ring_entries,
    ring_size,
    spin,
)
from blobplane.wire import UserPayload
from children import CHILD_TIMEOUT_S
from leaks import blob_mappings, open_fds

pytestmark = pytest.mark.usefixtures("no_leaks")

# A subscriber process: receives until the stream ends, sleeping `delay` per
# frame, checks each frame's contents, prints a JSON summary.
SUBSCRIBER = """
import json, os, sys, time
from blobplane.streams import Subscriber
path, delay, flavour, spin = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
fds_before = len(os.listdir("/proc/self/fd"))
seqs, missed, bad = [], 0, 0

def check(receipt):
    global missed, bad
    seqs.append(receipt.seq)
    missed += receipt.missed
    expected = receipt.seq.to_bytes(8, "little")
    if bytes(receipt.view[:8]) != expected or bytes(receipt.view[-8:]) != expected:
        bad += 1
    if receipt.header != b"h%d" % receipt.seq:
        bad += 1
    if delay:
        time.sleep(delay)

if flavour == "sync":
    with Subscriber(path, check=True, spin_us=spin) as sub:
        print("ready", flush=True)
        for receipt in sub:
            with receipt:
                check(receipt)
else:
    import asyncio
    from blobplane.streams import AsyncSubscriber
    async def main():
        async with await AsyncSubscriber.connect(path, check=True, spin_us=spin) as sub:
            print("ready", flush=True)
            async for receipt in sub:
                async with receipt:
                    check(receipt)
    asyncio.run(main())
fds_after = len(os.listdir("/proc/self/fd"))
print(json.dumps({"seqs": seqs, "missed": missed, "bad": bad, "fd_growth": fds_after - fds_before}))
"""


@pytest.fixture
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as folder:
        yield os.path.join(folder, "private", "stream.sock")


def _start_subscriber(
    path: str, delay: float = 0.0, flavour: str = "sync", spin_us: float = 0.0
) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, path, str(delay), flavour, str(spin_us)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child


def _summary(child: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, out
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def _publish(pub: Publisher, count: int, size: int) -> None:
    for seq in range(1, count + 1):
        with pub.loan(timeout=20) as loan:
            stamp = seq.to_bytes(8, "little")
            loan.write_all(stamp)
            loan.write_all(stamp, offset=size - 8)
            assert pub.publish(loan, header=b"h%d" % seq, length=size) == seq


@pytest.mark.parametrize("flavours", [("sync", "sync", "async"), ("async", "sync", "sync")])
def test_blocking_stream_delivers_every_frame_once_in_order(
    socket_path: str, flavours: tuple[str, str, str]
) -> None:
    count = 300
    with Publisher(socket_path, slot_size=64 * 1024, slots=4) as pub:
        children = [
            _start_subscriber(socket_path, delay, flavour)
            for delay, flavour in zip((0.0, 0.001, 0.003), flavours, strict=True)
        ]
        pub.wait_for_subscribers(3, timeout=CHILD_TIMEOUT_S)
        _publish(pub, count, 50_000)
    for child in children:
        summary = _summary(child)
        assert summary["seqs"] == list(range(1, count + 1))
        assert summary["missed"] == 0
        assert summary["bad"] == 0


def test_spinning_sides_deliver_every_frame_once_in_order(socket_path: str) -> None:
    count = 500
    with Publisher(socket_path, slot_size=4096, slots=2, spin_us=50) as pub:
        children = [
            _start_subscriber(socket_path, flavour=flavour, spin_us=50)
            for flavour in ("sync", "asyncio")
        ]
        pub.wait_for_subscribers(2, timeout=CHILD_TIMEOUT_S)
        _publish(pub, count, 4096)
    for child in children:
        summary = _summary(child)
        assert summary["seqs"] == list(range(1, count + 1))
        assert summary["missed"] == 0
        assert summary["bad"] == 0


def test_spin_returns_as_soon_as_its_check_passes_and_gives_up_after_its_budget() -> None:
    calls = 0

    def third_look() -> bool:
        nonlocal calls
        calls += 1
        return calls == 3

    assert spin(third_look, 10**9)  # a second's budget, left after three looks
    assert calls == 3

    budget_ns = 2_000_000  # past SPIN_CALM_NS: the yielding part runs too
    start = time.monotonic_ns()
    assert not spin(lambda: False, budget_ns)
    took = time.monotonic_ns() - start
    assert budget_ns <= took < budget_ns + 1_000_000_000


def test_bad_arguments_are_refused_before_anything_is_sent(socket_path: str) -> None:
    with pytest.raises(ValueError, match="spin_us"):
        Publisher(socket_path, slot_size=4096, spin_us=-1)
    with Publisher(socket_path, slot_size=4096, slots=1) as pub, pub.loan() as loan:
        with pytest.raises(InvalidSize, match="at most 1024 bytes"):
            pub.publish(loan, header=bytes(1025))
        assert pub.publish(loan, header=bytes(1024)) == 1


def test_drop_oldest_never_blocks_the_publisher_and_counts_what_slow_ones_missed(
    socket_path: str,
) -> None:
    count = 400
    with Publisher(socket_path, slot_size=4096, slots=4, policy=Backpressure.DROP_OLDEST) as pub:
        fast = _start_subscriber(socket_path, 0.0)
        slow = _start_subscriber(socket_path, 0.01)
        pub.wait_for_subscribers(2, timeout=CHILD_TIMEOUT_S)
        _publish(pub, count, 4096)
    fast_summary, slow_summary = _summary(fast), _summary(slow)
    for summary in (fast_summary, slow_summary):
        seqs = summary["seqs"]
        assert isinstance(seqs, list)
        assert seqs == sorted(set(seqs))  # in order, never twice
        assert summary["bad"] == 0  # never a frame rewritten under a reader
        assert isinstance(summary["missed"], int)
        assert len(seqs) + summary["missed"] <= count
    slow_seqs, slow_missed = slow_summary["seqs"], slow_summary["missed"]
    assert isinstance(slow_seqs, list)
    assert isinstance(slow_missed, int)
    assert slow_missed > 0
    assert len(slow_seqs) < count
    # What it missed were the oldest frames: the newest always got through.
    assert slow_seqs[-1] == count


def test_a_publisher_stuck_while_taking_back_a_slot_does_not_hang_its_subscriber(
    socket_path: str,
) -> None:
    # A publisher holds a slot's exclusive claim only while it takes the slot
    # back; stopped there (SIGSTOP, a debugger, a broken one), it must not stall
    # a subscriber past its timeout: that frame is being taken back anyway.
    with Publisher(socket_path, slot_size=4096, slots=2, policy=Backpressure.DROP_OLDEST) as pub:
        waiter = threading.Thread(target=pub.wait_for_subscribers, args=(1, CHILD_TIMEOUT_S))
        waiter.start()
        with Subscriber(socket_path, timeout=CHILD_TIMEOUT_S) as sub:
            waiter.join(CHILD_TIMEOUT_S)
            slots = []
            for _ in range(2):
                with pub.loan() as loan:
                    slots.append(loan.slot)
                    pub.publish(loan, header=b"h")
            control = pub.pool.control_fileno()
            assert try_claim_exclusive(control, slots[0])
            got: list[object] = []
            receiving = threading.Thread(target=lambda: got.append(sub.receive(timeout=2)))
            try:
                receiving.start()
                receiving.join(10)
                assert not receiving.is_alive(), "receive() waited on the publisher's claim"
            finally:
                unclaim(control, slots[0])
                receiving.join(CHILD_TIMEOUT_S)
            (receipt,) = got
            assert isinstance(receipt, Receipt)
            with receipt:
                assert (receipt.seq, receipt.missed) == (2, 1)


def test_a_killed_subscriber_gives_its_slots_back(socket_path: str) -> None:
    with Publisher(socket_path, slot_size=4096, slots=2) as pub:
        healthy = _start_subscriber(socket_path, 0.0)
        stuck = _start_subscriber(socket_path, 3600.0)  # holds its first frame forever
        pub.wait_for_subscribers(2, timeout=CHILD_TIMEOUT_S)
        _publish(pub, 2, 4096)
        with pytest.raises(Timeout, match="held by a subscriber"):
            pub.loan(timeout=0.2)
        stuck.send_signal(signal.SIGKILL)
        stuck.wait(timeout=CHILD_TIMEOUT_S)
        for seq in range(3, 50):
            with pub.loan(timeout=CHILD_TIMEOUT_S) as loan:
                loan.write_all(seq.to_bytes(8, "little"))
                loan.write_all(seq.to_bytes(8, "little"), offset=4088)
                pub.publish(loan, header=b"h%d" % seq)
        assert pub.subscribers == 1
    assert _summary(healthy)["seqs"] == list(range(1, 50))


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_killed_publisher_ends_the_stream_for_every_subscriber(
    socket_path: str, flavour: str
) -> None:
    publisher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            """
import sys, time
from blobplane.streams import Publisher
with Publisher(sys.argv[1], slot_size=4096, slots=2) as pub:
    pub.wait_for_subscribers(1, timeout=30)
    with pub.loan() as loan:
        pub.publish(loan, header=b"one")
    print("published", flush=True)
    time.sleep(3600)
""",
            socket_path,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert publisher.stdout is not None
    try:
        for _ in range(500):
            if os.path.exists(socket_path):
                break
            threading.Event().wait(0.01)
        stdout = publisher.stdout
        if flavour == "sync":
            with Subscriber(socket_path, timeout=CHILD_TIMEOUT_S) as sub:
                with sub.receive() as receipt:
                    assert receipt.header == b"one"
                assert stdout.readline().strip() == "published"
                publisher.send_signal(signal.SIGKILL)
                with pytest.raises(StreamEnded, match="publisher went away"):
                    sub.receive()
                with pytest.raises(StreamEnded):
                    sub.receive()
        else:

            async def main() -> None:
                async with await AsyncSubscriber.connect(
                    socket_path, timeout=CHILD_TIMEOUT_S
                ) as sub:
                    async with await sub.receive() as receipt:
                        assert receipt.header == b"one"
                    assert stdout.readline().strip() == "published"
                    publisher.send_signal(signal.SIGKILL)
                    with pytest.raises(StreamEnded, match="publisher went away"):
                        await sub.receive()
                    with pytest.raises(StreamEnded):
                        await sub.receive()

            asyncio.run(main())
    finally:
        publisher.kill()
        publisher.wait(timeout=CHILD_TIMEOUT_S)
        publisher.stdout.close()


def test_a_subscriber_cannot_write_a_slot_or_its_ring(socket_path: str) -> None:
    with Publisher(socket_path, slot_size=4096, slots=1) as pub:
        raw: list[channel.Channel] = []
        connecting = threading.Thread(target=lambda: raw.append(channel.connect(socket_path)))
        connecting.start()
        pub.wait_for_subscribers(1, timeout=CHILD_TIMEOUT_S)
        connecting.join(CHILD_TIMEOUT_S)
        with raw[0] as peer:
            hello, hello_fds = peer.recv()
            message, (slot_fd,) = peer.recv()
            try:
                assert isinstance(hello, UserPayload)
                assert isinstance(decode(hello.data), Hello)
                assert isinstance(message, UserPayload)
                assert decode(message.data) == Slots(0)
                control, ring, release = hello_fds[:3]
                with pub.loan() as loan:
                    loan.write_all(b"mine")
                    pub.publish(loan)
                for fd in (slot_fd, control, ring):
                    with pytest.raises(PermissionError):
                        mmap.mmap(fd, 4096, access=mmap.ACCESS_WRITE)
                    with pytest.raises(PermissionError):
                        os.ftruncate(fd, 0)
                    with pytest.raises(PermissionError):
                        os.pwrite(fd, b"evil", 0)
                # The release area is the subscriber's to write, but nobody may resize it.
                with pytest.raises(PermissionError):
                    os.ftruncate(release, 0)
                with mmap.mmap(slot_fd, 4096, access=mmap.ACCESS_READ) as view:
                    assert view[:4] == b"mine"
            finally:
                for fd in (slot_fd, *hello_fds):
                    os.close(fd)


def _raw_subscriber(pub: Publisher, socket_path: str) -> tuple[channel.Channel, tuple[int, ...]]:
    """A peer that connects like a subscriber and does whatever a test makes it do."""
    raw: list[channel.Channel] = []
    connecting = threading.Thread(target=lambda: raw.append(channel.connect(socket_path)))
    connecting.start()
    pub.wait_for_subscribers(1, timeout=CHILD_TIMEOUT_S)
    connecting.join(CHILD_TIMEOUT_S)
    peer = raw[0]
    _, hello_fds = peer.recv()
    fds = list(hello_fds)
    while len(fds) < len(hello_fds) + pub.pool.slots:
        fds.extend(peer.recv()[1])
    return peer, tuple(fds)


def _finishes(call: Callable[[], object], within: float = 5.0) -> bool:
    """Whether *call* returns within *within* seconds (it runs on in a thread if not)."""
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(within)
    return not worker.is_alive()


def test_a_subscriber_that_jams_its_bell_cannot_hang_the_publisher(socket_path: str) -> None:
    # O_NONBLOCK lives in the open file description, which SCM_RIGHTS shares:
    # a peer can clear it on the publisher's behalf. With eventfds, that and a
    # full counter made the publisher's next wake-up block forever.
    policy = Backpressure.DROP_OLDEST  # so the publisher goes on without releases
    with Publisher(socket_path, slot_size=4096, slots=2, policy=policy) as pub:
        peer, fds = _raw_subscriber(pub, socket_path)
        with peer:
            try:
                bell = fds[3]  # control block, ring, release area, bell, then the slots
                os.set_blocking(bell, True)

                def publish_many() -> None:
                    for _ in range(3000):  # far more wake-ups than a socket buffer holds
                        with pub.loan(timeout=CHILD_TIMEOUT_S) as loan:
                            pub.publish(loan)

                assert _finishes(publish_many, CHILD_TIMEOUT_S)
                queued = 0
                while data := os.read(bell, 65536) if _readable(bell) else b"":
                    queued += len(data)
                assert 0 < queued < 3000  # the bell did fill up
            finally:
                for fd in fds:
                    os.close(fd)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def test_a_subscriber_that_hangs_up_its_bell_is_dropped(socket_path: str) -> None:
    with Publisher(socket_path, slot_size=4096, slots=1) as pub:
        peer, fds = _raw_subscriber(pub, socket_path)
        with peer:
            try:
                with pub.loan() as loan:
                    pub.publish(loan)  # the peer holds the only slot
                with socket.socket(fileno=os.dup(fds[3])) as bell:
                    bell.shutdown(socket.SHUT_RDWR)
                with pub.loan(timeout=CHILD_TIMEOUT_S):
                    assert pub.subscribers == 0
            finally:
                for fd in fds:
                    os.close(fd)


def test_a_publisher_that_jams_the_bell_cannot_hang_a_receipt_close(socket_path: str) -> None:
    with Publisher(socket_path, slot_size=4096, slots=2) as pub:
        waiter = threading.Thread(target=pub.wait_for_subscribers, args=(1, CHILD_TIMEOUT_S))
        waiter.start()
        with Subscriber(socket_path, timeout=CHILD_TIMEOUT_S) as sub:
            waiter.join(CHILD_TIMEOUT_S)
            with pub.loan() as loan:
                pub.publish(loan)
            receipt = sub.receive()
            # What a publisher that kept a copy of the subscriber's end could do:
            # clear O_NONBLOCK on it, and never read what comes (many releases).
            ring = sub._core._ring
            assert ring is not None
            assert ring.bell is not None
            bell = ring.bell.fileno()
            os.set_blocking(bell, True)
            with contextlib.suppress(BlockingIOError):
                while True:
                    ring.bell.send(bytes(4096), socket.MSG_DONTWAIT)
            assert _finishes(receipt.close)


def _sealed(size: int, seals: int = POOL_SEALS) -> int:
    fd, mapped = sealed_memfd("blobplane-test", size, seals)
    mapped.close()
    return fd


def _unsealed(size: int) -> int:
    fd = os.memfd_create("blobplane-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _pipe() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def _socket(kind: socket.SocketKind = socket.SOCK_STREAM, connected: bool = True) -> int:
    if not connected:
        return socket.socket(socket.AF_UNIX, kind).detach()
    mine, theirs = socket.socketpair(socket.AF_UNIX, kind)
    mine.close()
    return theirs.detach()


SLOTS, ENTRIES = 2, ring_entries(2)
# A broken publisher's Hello fds: which one it replaces, with what, and the error it must get.
BAD_HELLO_FDS: dict[str, tuple[int, Callable[[], int], type[BlobError]]] = {
    "control block too short": (0, lambda: _sealed(8 * SLOTS - 1), DescriptorTooShort),
    "ring is a pipe": (1, _pipe, WrongKind),
    "ring not sealed": (1, lambda: _unsealed(ring_size(ENTRIES)), NotSealed),
    "ring too short": (1, lambda: _sealed(ring_size(ENTRIES) - 4096), DescriptorTooShort),
    "release area not sealed": (2, lambda: _unsealed(release_size(SLOTS)), NotSealed),
    "release area write-sealed": (
        2,
        lambda: _sealed(release_size(SLOTS)),
        RemoteProtocolError,
    ),
    "release area a socket": (2, _socket, WrongKind),
    "bell an eventfd": (3, lambda: os.eventfd(0, os.EFD_NONBLOCK), WrongKind),
    "bell a pipe": (3, _pipe, WrongKind),
    "bell a memfd": (3, lambda: _sealed(4096), WrongKind),
    "bell a datagram socket": (3, lambda: _socket(socket.SOCK_DGRAM), WrongKind),
    "bell connected to nothing": (3, lambda: _socket(connected=False), WrongKind),
}


@pytest.mark.parametrize("case", sorted(BAD_HELLO_FDS))
def test_a_hello_with_a_bad_fd_is_refused_before_mapping_it(socket_path: str, case: str) -> None:
    where, make, error = BAD_HELLO_FDS[case]
    good = [
        _sealed(4096),
        _sealed(ring_size(ENTRIES)),
        _sealed(release_size(SLOTS), RELEASE_SEALS),
        _socket(),
    ]
    fds = [*good[:where], make(), *good[where + 1 :]]
    os.close(good[where])
    mappings = blob_mappings()
    refused: list[BaseException] = []

    def subscribe() -> None:
        try:
            Subscriber(socket_path, timeout=CHILD_TIMEOUT_S).close()
        except BaseException as exc:
            refused.append(exc)

    try:
        with channel.listen(socket_path, timeout=CHILD_TIMEOUT_S) as listener:
            subscribing = threading.Thread(target=subscribe)
            subscribing.start()
            with listener.accept() as publisher:
                hello = Hello(uuid.uuid4(), 4096, SLOTS, Backpressure.BLOCK, ENTRIES)
                publisher.send(UserPayload(data=encode(hello)), fds)
                subscribing.join(CHILD_TIMEOUT_S)
    finally:
        for fd in fds:
            os.close(fd)
    (exc,) = refused
    assert isinstance(exc, error), repr(exc)
    assert blob_mappings() == mappings


def test_subscribers_coming_and_going_leave_nothing_on_either_side(socket_path: str) -> None:
    with Publisher(socket_path, slot_size=4096, slots=2) as pub:
        fds, mappings = open_fds(), blob_mappings()
        for round_ in range(1, 21):
            waiter = threading.Thread(target=pub.wait_for_subscribers, args=(1, CHILD_TIMEOUT_S))
            waiter.start()
            with Subscriber(socket_path, timeout=CHILD_TIMEOUT_S, check=True) as sub:
                waiter.join(CHILD_TIMEOUT_S)
                with pub.loan() as loan:
                    pub.publish(loan)
                receipt = sub.receive()
                assert receipt.seq == round_
            # Closed after its subscriber: nothing left to give back, and no error.
            receipt.close()
            pub.pump()  # sees the hang-up
            assert pub.subscribers == 0
            assert pub.pool.free_slots == 2
            assert open_fds() == fds
            assert blob_mappings() == mappings


def test_check_mode_catches_a_slot_rewritten_under_a_reader(socket_path: str) -> None:
    with Publisher(socket_path, slot_size=4096, slots=1) as pub:
        waiter = threading.Thread(target=pub.wait_for_subscribers, args=(1, CHILD_TIMEOUT_S))
        waiter.start()
        with Subscriber(socket_path, check=True) as sub:
            waiter.join(CHILD_TIMEOUT_S)
            with pub.loan() as loan:
                pub.publish(loan)
            receipt = sub.receive(timeout=CHILD_TIMEOUT_S)
            pub.pool._bump_generation(receipt.frame.slot)  # what a broken producer would do
            with pytest.raises(SlotRewritten, match="rewritten while frame 1"):
                receipt.close()


def test_thousands_of_frames_leak_nothing(socket_path: str) -> None:
    count = 3000
    fds_before = open_fds()
    mappings_before = blob_mappings()
    with Publisher(socket_path, slot_size=4096, slots=8) as pub:
        child = _start_subscriber(socket_path)
        pub.wait_for_subscribers(1, timeout=CHILD_TIMEOUT_S)
        _publish(pub, count, 4096)
    summary = _summary(child)
    assert summary["seqs"] == list(range(1, count + 1))
    assert summary["fd_growth"] == 0
    assert open_fds() == fds_before
    assert blob_mappings() == mappings_before


# What a broken publisher could put in an entry: field -> value, and the error it must give.
BAD_ENTRIES = {
    "slot out of range": ({"slot": 7}, "names slot 7 of a pool of 2"),
    "longer than its slot": ({"length": 4097}, "is 4097 bytes long, its slot 4096"),
    "header too long": ({"header_len": 5000}, "5000-byte header"),
    "wrong position": ({"position": 9}, "holds position 9"),
    "frame number going back": ({"seq": 1}, "frame number 1 after 1"),
    "head beyond the ring": ({"head": 1000}, "head to 1000"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_a_broken_ring_entry_ends_the_stream_with_a_clear_error(
    socket_path: str, case: str
) -> None:
    changes, message = BAD_ENTRIES[case]
    with Publisher(socket_path, slot_size=4096, slots=2) as pub:
        waiter = threading.Thread(target=pub.wait_for_subscribers, args=(1, CHILD_TIMEOUT_S))
        waiter.start()
        with Subscriber(socket_path, timeout=CHILD_TIMEOUT_S) as sub:
            waiter.join(CHILD_TIMEOUT_S)
            for _ in range(2):
                with pub.loan() as loan:
                    pub.publish(loan, header=b"h")
            with sub.receive() as receipt:
                assert receipt.seq == 1
            # What a broken publisher would do: rewrite the second entry in its ring.
            ring = pub._subscribers[0].ring
            at = ENTRIES_AT + 1 * ENTRY_SIZE
            fields = dict(
                zip(
                    ("position", "seq", "slot", "generation", "length", "sent_ns", "unsent"),
                    ENTRY.unpack_from(ring.ring, at),
                    strict=False,
                )
            )
            fields["header_len"] = 1
            fields.update((k, v) for k, v in changes.items() if k != "head")
            ENTRY.pack_into(ring.ring, at, *fields.values())
            if "head" in changes:
                ring.words[0] = changes["head"]
            with pytest.raises(RemoteProtocolError, match=message):
                sub.receive(timeout=CHILD_TIMEOUT_S)
            with pytest.raises(StreamEnded, match="broke the stream"):
                sub.receive(timeout=CHILD_TIMEOUT_S)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64", ""])
def test_the_ring_refuses_cpus_without_total_store_order(machine: str) -> None:
    with pytest.raises(NotImplementedError, match="x86"):
        require_ordered_memory(machine)


def test_streams_refuse_to_start_on_a_weakly_ordered_cpu(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    fds = open_fds()
    with pytest.raises(NotImplementedError, match="aarch64"):
        Publisher(socket_path, slot_size=4096, slots=2)
    with pytest.raises(NotImplementedError, match="aarch64"):
        Subscriber(socket_path, timeout=1)
    assert not os.path.exists(socket_path)
    assert open_fds() == fds
