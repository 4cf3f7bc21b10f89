"""Benchmark of blobplane's channel against the other ways to hand bytes to another process.

Run it with `make bench` (after `bench/core.py`) or `.venv/bin/python bench/channel.py`.
This process is the producer; every variant has its own consumer, a separate
process started from this file (``--consumer KIND``), that receives each
payload, reads every byte of it (the wrapping uint64 sum of `bench/core.py`)
and answers. Variants, producer side -> consumer side:

- ``raw memfd + send_fds (reference)``: the same steps as the library with
  nothing around them, over a ``SOCK_SEQPACKET`` socketpair: ``memfd_create``,
  ``ftruncate``, writable ``mmap``, ``MADV_POPULATE_WRITE``, copy, ``munmap``,
  ``F_ADD_SEALS``, ``socket.send_fds`` -> ``socket.recv_fds``, ``fstat`` and
  ``F_GET_SEALS`` (the check every receiver of a peer's fd must make),
  read-only ``mmap``, ``close``, read, ``munmap``, 8-byte reply.
- ``blobplane channel``: ``create`` -> ``write_all`` -> ``seal`` ->
  ``send_blob`` (returns at the peer's ``Ack``) -> ``cleanup`` over the same
  kind of socketpair (``channel.from_socket``); the consumer's ``recv_handoff``
  checks, maps and acknowledges, then it reads, closes the mapping and sends
  the sum back with ``send`` (a ``UserPayload``), which the producer ``recv()``s.
  The library acknowledges at "mapped", so a producer that must know the bytes
  were read waits for that second message: the only variant with two replies.
- ``blobplane channel, send_bytes``: ``send_bytes`` -> ``recv_bytes``, default
  arguments: up to 64 KiB inside the message, larger in a slot of the
  channel's ``AutoPool`` (copied into memory faulted in once, the slot back
  when the consumer closes its view); the consumer acknowledges and replies
  as above. ``send_bytes(sealed=True)``: a fresh memfd sealed against writes.
- ``multiprocessing.Pipe``: ``send_bytes`` -> ``recv_bytes`` (a duplex Pipe
  is a ``SOCK_STREAM`` socketpair; every byte is copied through the kernel).
- ``multiprocessing.shared_memory``: a new ``SharedMemory(create=True)`` per
  payload, filled through ``buf``, its name sent with a Pipe; the consumer
  attaches by name, reads, closes; the producer then closes and unlinks it.
  On Python 3.11 attaching registers the segment with the consumer's resource
  tracker, so the consumer unregisters it (the usual work-around). No seals.
- ``pyzmq ipc, copy=False``: ``send(payload, copy=False)`` ->
  ``recv(copy=False)`` on a ``PAIR`` socket over ``ipc://`` (optional: the
  ``bench`` extra installs pyzmq; the row is skipped if it cannot be imported).

Two measurements, each with fresh consumer processes:

- handoff latency: a 4 KiB payload already prepared (blob created, filled,
  sealed) before the clock starts; timed from the send until the consumer's
  acknowledgement, which every consumer sends as soon as it holds the
  payload (mapped, received, attached), before reading it; the read and a
  final "done" reply follow untimed. p50 and p99. Twice: each handoff cold
  (every round runs each variant once, so a consumer sleeps while the others
  run, and wakes with its caches taken by them), then back to back (each
  round runs each variant ``--burst`` times in a row, as in a busy stream,
  the first of each burst not counted).
- throughput: one whole handoff per repetition, a fresh blob (or segment, or
  message) each time: create + fill + seal + send, the consumer maps, reads
  every byte and unmaps, its reply reaches the producer, which releases its
  side. GB/s = size / median time.

As in `bench/core.py`: every round runs each variant once, in a new seeded
random order; medians, not means; ratios to the raw reference, also as the
median of the per-round (paired) ratios; the garbage collector is off while a
repetition runs. Every round must leave the producer's fd and shared-mapping
counts as they were, and each consumer reports its own counts when it stops
(the same after the last handoff as after the first, and no mapping left).
Compare variants within one run, never across runs.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import mmap
import multiprocessing
import os
import random
import shutil
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

import _common
from _common import (
    KIB,
    MADV_POPULATE_WRITE,
    MFD_FLAGS,
    MIB,
    SEALS,
    Result,
    environment,
    fmt_size,
    fmt_time,
    gc_paused,
    make_payload,
    open_fds,
    parse_size,
    quartiles,
    read_every_byte,
)
from blobplane import BlobBackend, SharedMemoryBlobs, channel
from blobplane.auto_pool import slot_class
from blobplane.errors import UnexpectedMessage
from blobplane.wire import UserPayload

try:
    import zmq
except ImportError:  # pragma: no cover - the bench extra installs it
    zmq = None  # type: ignore[assignment]

Mode = Literal["latency", "throughput"]

# Repetitions: the whole default run takes about two and a half minutes here.
DEFAULT_PLAN: dict[int, int] = {4 * KIB: 1001, 1 * MIB: 201, 64 * MIB: 61, 512 * MIB: 21}
QUICK_PLAN: dict[int, int] = {4 * KIB: 3, 1 * MIB: 3}
LATENCY_SIZE = 4 * KIB
LATENCY_REPS = 2001
QUICK_LATENCY_REPS = 20
BURST = 20  # handoffs in a row per round, back to back
# The two latency phases: the phase name of their results, and their title.
COLD = "latency"
BACK_TO_BACK = "latency, back to back"
LATENCY_PHASES = {COLD: "each handoff cold", BACK_TO_BACK: "back to back"}

REFERENCE = "raw memfd + send_fds (reference)"
LIBRARY = "blobplane channel"
LATENCY_TARGET = 1.3  # blobplane / raw, 4 KiB send until acknowledged
THROUGHPUT_TARGET = 1.1  # blobplane / raw, 64 MiB and above
THROUGHPUT_TARGET_FROM = 64 * MIB

SIZE = struct.Struct("<Q")  # the raw reference's message: the payload's size
SUM = struct.Struct("<Q")  # every consumer's reply: the sum it read
ACK = b"A"  # latency mode: "I hold it", before reading
STOP = b"S"
REPLY_TIMEOUT_S = 120.0
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CUT = int(socket.MSG_TRUNC) | int(socket.MSG_CTRUNC)


# --------------------------------------------------------------------------- consumers


def shared_mappings() -> int:
    """Mappings of memfds and /dev/shm segments in this process."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "/memfd:" in line or "/dev/shm/" in line)


class Ledger:
    """What a consumer reports when it stops: its counts after the first and the last handoff."""

    def __init__(self) -> None:
        self.handoffs = 0
        self.first: tuple[int, int] | None = None
        # Slots a receiver keeps mapped on purpose (its channel's slot cache), each
        # with its fd and mapping: as many as the size classes it saw pooled.
        self.cached: set[int] = set()

    def count(self) -> None:
        self.handoffs += 1
        if self.first is None:
            self.first = (open_fds(), shared_mappings())

    def report(self) -> bytes:
        first = self.first or (open_fds(), shared_mappings())
        last = (open_fds(), shared_mappings())
        cached = len(self.cached)
        report = {"handoffs": self.handoffs, "first": first, "last": last, "cached": cached}
        return json.dumps(report).encode()


def consume_raw(fd: int, mode: Mode) -> None:
    ledger = Ledger()
    with socket.socket(fileno=fd) as sock:
        while True:
            data, fds, flags, _ = socket.recv_fds(sock, 16, 1, _MSG_CMSG_CLOEXEC)
            if flags & _CUT:
                raise SystemExit("raw consumer: a message or its fds were cut short")
            if len(data) != SIZE.size or len(fds) != 1:
                for extra in fds:
                    os.close(extra)
                sock.send(ledger.report())
                return
            (size,) = SIZE.unpack(data)
            received = fds[0]
            try:
                info = os.fstat(received)
                seals = fcntl.fcntl(received, fcntl.F_GET_SEALS)
                if not stat.S_ISREG(info.st_mode) or info.st_size < size or ~seals & SEALS:
                    raise SystemExit("raw consumer: not a sealed memfd of the announced size")
                mapped = mmap.mmap(received, size, access=mmap.ACCESS_READ)
            finally:
                os.close(received)
            if mode == "latency":
                sock.send(ACK)
            with memoryview(mapped) as view:
                checksum = read_every_byte(view)
            mapped.close()
            sock.send(SUM.pack(checksum))
            ledger.count()


def consume_blobplane(fd: int, mode: Mode) -> None:
    # The library acknowledges when the blob is mapped, whatever the mode.
    ledger = Ledger()
    with channel.from_socket(fd, timeout=None) as ch:
        while True:
            try:
                handoff = ch.recv_handoff()
            except UnexpectedMessage:
                ch.recv()  # the stop message
                ch.send(ledger.report())
                return
            with handoff, handoff.blob.as_slice() as view:
                checksum = read_every_byte(view)
            ch.send(SUM.pack(checksum))
            ledger.count()


def consume_blobplane_bytes(fd: int, mode: Mode) -> None:
    ledger = Ledger()
    with channel.from_socket(fd, timeout=None) as ch:
        while True:
            with ch.recv_bytes() as data, data.as_slice() as view:
                if len(view) == len(STOP) and view == STOP:
                    ch.send(ledger.report())
                    return
                if mode == "latency":
                    ch.send(ACK)
                checksum = read_every_byte(view)
                if len(view) > ch.payload_limit:
                    ledger.cached.add(slot_class(len(view)))
            ch.send(SUM.pack(checksum))
            ledger.count()


def consume_pipe(fd: int, mode: Mode) -> None:
    ledger = Ledger()
    with Connection(fd) as conn:
        while True:
            data = conn.recv_bytes()
            if data == STOP:
                conn.send_bytes(ledger.report())
                return
            if mode == "latency":
                conn.send_bytes(ACK)
            with memoryview(data) as view:
                checksum = read_every_byte(view)
            del data
            conn.send_bytes(SUM.pack(checksum))
            ledger.count()


def consume_shared_memory(fd: int, mode: Mode) -> None:
    ledger = Ledger()
    with Connection(fd) as conn:
        while True:
            name = conn.recv_bytes().decode()
            if name == STOP.decode():
                conn.send_bytes(ledger.report())
                return
            segment = SharedMemory(name=name)
            # Python 3.11 registers a segment it merely attached to; without this its
            # resource tracker would unlink the producer's segments at exit and warn.
            resource_tracker.unregister("/" + name, "shared_memory")
            if mode == "latency":
                conn.send_bytes(ACK)
            view = segment.buf
            assert view is not None
            checksum = read_every_byte(view)
            del view
            segment.close()
            conn.send_bytes(SUM.pack(checksum))
            ledger.count()


def consume_zmq(address: str, mode: Mode) -> None:
    if zmq is None:
        raise SystemExit("pyzmq is not installed")
    ledger = Ledger()
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        while True:
            frame = sock.recv(copy=False)
            if len(frame) == len(STOP) and frame.bytes == STOP:  # .bytes copies: small only
                sock.send(ledger.report())
                return
            if mode == "latency":
                sock.send(ACK)
            with frame.buffer as view:
                checksum = read_every_byte(view)
            del frame
            sock.send(SUM.pack(checksum))
            ledger.count()
    finally:
        sock.close()
        context.term()


CONSUMERS: dict[str, Callable[[Any, Mode], None]] = {
    "raw": consume_raw,
    "blobplane": consume_blobplane,
    "blobplane-bytes": consume_blobplane_bytes,
    "pipe": consume_pipe,
    "shared_memory": consume_shared_memory,
    "zmq": consume_zmq,
}


def consumer_main(kind: str, mode: Mode, endpoint: str) -> int:
    gc.disable()  # as the producer's timed regions; a leak check below catches cycles
    target: Any = endpoint if kind == "zmq" else int(endpoint)
    CONSUMERS[kind](target, mode)
    return 0


# --------------------------------------------------------------------------- producers


def spawn_consumer(kind: str, mode: Mode, endpoint: str, fd: int | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(Path(__file__).resolve()), "--consumer", kind]
    command += ["--mode", mode, "--endpoint", endpoint]
    return subprocess.Popen(command, pass_fds=() if fd is None else (fd,))


def checksum_of(reply: bytes, who: str) -> int:
    if len(reply) != SUM.size:
        raise SystemExit(f"{who}: the consumer answered {reply[:40]!r}; is it still running?")
    value: int = SUM.unpack(reply)[0]
    return value


def expect_ack(reply: bytes, who: str) -> None:
    if reply != ACK:
        raise SystemExit(f"{who}: expected the consumer's acknowledgement, got {reply[:40]!r}")


class Variant:
    """The producer side of one way to hand a payload over, with its consumer process."""

    name: str
    kind: str

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Connect and start the consumer process."""
        raise NotImplementedError

    def round_trip(self, payload: bytes) -> int:
        """Throughput: one whole handoff; returns the sum the consumer read."""
        raise NotImplementedError

    def handoff_latency(self, payload: bytes, clock: Callable[[], int]) -> tuple[int, int]:
        """Latency: prepare untimed, time send until acknowledged; returns (ns, sum)."""
        raise NotImplementedError

    def _send_stop(self) -> bytes:
        """Ask the consumer to stop; return its report."""
        raise NotImplementedError

    def check(self) -> None:
        """After each round: nothing of this variant's may be left behind."""

    def stop(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self._send_stop())
        self._close()
        if self.process is not None and self.process.wait(timeout=30) != 0:
            raise SystemExit(f"{self.name}: the consumer exited with {self.process.returncode}")
        return report

    def kill(self) -> None:
        self._close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _close(self) -> None:
        """Release this side's socket and resources."""


class RawMemfd(Variant):
    name = REFERENCE
    kind = "raw"

    def start(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            fd = theirs.fileno()
            self.process = spawn_consumer(self.kind, self.mode, str(fd), fd)

    @staticmethod
    def sealed_memfd(payload: bytes) -> int:
        n = len(payload)
        fd = os.memfd_create("bench-raw", MFD_FLAGS)
        try:
            os.ftruncate(fd, n)
            writable = mmap.mmap(fd, n, access=mmap.ACCESS_WRITE)
            writable.madvise(MADV_POPULATE_WRITE)
            writable[0:n] = payload
            writable.close()
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def round_trip(self, payload: bytes) -> int:
        fd = self.sealed_memfd(payload)
        try:
            socket.send_fds(self.sock, [SIZE.pack(len(payload))], [fd])
            reply = self.sock.recv(64)
        finally:
            os.close(fd)
        return checksum_of(reply, self.name)

    def handoff_latency(self, payload: bytes, clock: Callable[[], int]) -> tuple[int, int]:
        fd = self.sealed_memfd(payload)
        try:
            start = clock()
            socket.send_fds(self.sock, [SIZE.pack(len(payload))], [fd])
            ack = self.sock.recv(64)
            elapsed = clock() - start
        finally:
            os.close(fd)
        expect_ack(ack, self.name)
        return elapsed, checksum_of(self.sock.recv(64), self.name)

    def _send_stop(self) -> bytes:
        self.sock.send(STOP)
        return self.sock.recv(4096)

    def _close(self) -> None:
        self.sock.close()


class Blobplane(Variant):
    name = LIBRARY
    kind = "blobplane"

    def start(self) -> None:
        self.blobs = SharedMemoryBlobs(BlobBackend.MEMFD)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.ch = channel.from_socket(ours, timeout=REPLY_TIMEOUT_S)
            fd = theirs.fileno()
            self.process = spawn_consumer(self.kind, self.mode, str(fd), fd)

    def _reply(self) -> bytes:
        message, fds = self.ch.recv()
        if fds or not isinstance(message, UserPayload):
            raise SystemExit(f"{self.name}: unexpected reply {message!r}")
        return message.data

    def round_trip(self, payload: bytes) -> int:
        with self.blobs.create(len(payload)) as blob:
            blob.write_all(payload)
            blob.seal()
            self.ch.send_blob(blob)
        return checksum_of(self._reply(), self.name)

    def handoff_latency(self, payload: bytes, clock: Callable[[], int]) -> tuple[int, int]:
        with self.blobs.create(len(payload)) as blob:
            blob.write_all(payload)
            blob.seal()
            start = clock()
            self.ch.send_blob(blob)
            elapsed = clock() - start
        return elapsed, checksum_of(self._reply(), self.name)

    def check(self) -> None:
        if len(self.blobs):
            raise SystemExit(f"{self.name}: a blob was not cleaned up")

    def _send_stop(self) -> bytes:
        self.ch.send(STOP)
        return self._reply()

    def _close(self) -> None:
        self.ch.close()
        self.blobs.close()


class BlobplaneBytes(Blobplane):
    """`send_bytes`: a small payload inside the message, a large one in an AutoPool slot."""

    name = "blobplane channel, send_bytes"
    kind = "blobplane-bytes"
    sealed = False

    def round_trip(self, payload: bytes) -> int:
        self.ch.send_bytes(payload, sealed=self.sealed)
        return checksum_of(self._reply(), self.name)

    def handoff_latency(self, payload: bytes, clock: Callable[[], int]) -> tuple[int, int]:
        start = clock()
        self.ch.send_bytes(payload, sealed=self.sealed)
        expect_ack(self._reply(), self.name)
        elapsed = clock() - start
        return elapsed, checksum_of(self._reply(), self.name)


class BlobplaneBytesSealed(BlobplaneBytes):
    """`send_bytes(sealed=True)`: a large payload in a fresh memfd sealed against writes."""

    name = "blobplane channel, send_bytes(sealed=True)"
    sealed = True


class Pipe(Variant):
    name = "multiprocessing.Pipe"
    kind = "pipe"

    def start(self) -> None:
        self.conn, theirs = multiprocessing.Pipe(duplex=True)
        with theirs:
            fd = theirs.fileno()
            self.process = spawn_consumer(self.kind, self.mode, str(fd), fd)

    def _recv(self) -> bytes:
        if not self.conn.poll(REPLY_TIMEOUT_S):
            raise SystemExit(f"{self.name}: no reply within {REPLY_TIMEOUT_S} s")
        return self.conn.recv_bytes()

    def round_trip(self, payload: bytes) -> int:
        self.conn.send_bytes(payload)
        return checksum_of(self.conn.recv_bytes(), self.name)

    def handoff_latency(self, payload: bytes, clock: Callable[[], int]) -> tuple[int, int]:
        start = clock()
        self.conn.send_bytes(payload)
        ack = self.conn.recv_bytes()
        elapsed = clock() - start
        expect_ack(ack, self.name)
        return elapsed, checksum_of(self.conn.recv_bytes(), self.name)

    def _send_stop(self) -> bytes:
        self.conn.send_bytes(STOP)
        return self._recv()

    def _close(self) -> None:
        self.conn.close()


class SharedMemorySegments(Pipe):
    name = "multiprocessing.shared_memory"
    kind = "shared_memory"

    def __init__(self, mode: Mode) -> None:
        super().__init__(mode)
        self.last_name = ""

    def _segment(self, payload: bytes) -> SharedMemory:
        segment = SharedMemory(create=True, size=len(payload))
        try:
            view = segment.buf
            assert view is not None
            view[: len(payload)] = payload
        except BaseException:
            segment.close()
            segment.unlink()
            raise
        self.last_name = segment.name
        return segment

    def round_trip(self, payload: bytes) -> int:
        segment = self._segment(payload)
        try:
            self.conn.send_bytes(segment.name.encode())
            reply = self.conn.recv_bytes()
        finally:
            segment.close()
            segment.unlink()
        return checksum_of(reply, self.name)

    def handoff_latency(self, payload: bytes, clock: Callable[[], int]) -> tuple[int, int]:
        segment = self._segment(payload)
        try:
            start = clock()
            self.conn.send_bytes(segment.name.encode())
            ack = self.conn.recv_bytes()
            elapsed = clock() - start
            reply = self.conn.recv_bytes()
        finally:
            segment.close()
            segment.unlink()
        expect_ack(ack, self.name)
        return elapsed, checksum_of(reply, self.name)

    def check(self) -> None:
        if self.last_name and os.path.exists(os.path.join("/dev/shm", self.last_name)):
            raise SystemExit(f"{self.name}: segment {self.last_name} was not unlinked")


class Zmq(Variant):
    name = "pyzmq ipc, copy=False"
    kind = "zmq"

    def start(self) -> None:
        assert zmq is not None
        self.folder = tempfile.mkdtemp(prefix="blobplane-bench-")
        address = f"ipc://{self.folder}/zmq.sock"
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
        self.sock.bind(address)
        self.process = spawn_consumer(self.kind, self.mode, address, None)

    def _recv(self) -> bytes:
        reply: bytes = self.sock.recv()
        return reply

    def round_trip(self, payload: bytes) -> int:
        self.sock.send(payload, copy=False)
        return checksum_of(self._recv(), self.name)

    def handoff_latency(self, payload: bytes, clock: Callable[[], int]) -> tuple[int, int]:
        start = clock()
        self.sock.send(payload, copy=False)
        ack = self._recv()
        elapsed = clock() - start
        expect_ack(ack, self.name)
        return elapsed, checksum_of(self._recv(), self.name)

    def _send_stop(self) -> bytes:
        self.sock.send(STOP)
        return self._recv()

    def _close(self) -> None:
        self.sock.close()
        self.context.term()
        shutil.rmtree(self.folder, ignore_errors=True)


def variant_classes() -> tuple[list[type[Variant]], list[str]]:
    """The variants to run, and notes on those skipped."""
    classes: list[type[Variant]] = [
        RawMemfd,
        Blobplane,
        BlobplaneBytes,
        BlobplaneBytesSealed,
        Pipe,
        SharedMemorySegments,
    ]
    notes: list[str] = []
    if zmq is None:
        notes.append(f"{Zmq.name}: skipped, pyzmq is not installed (pip install '.[bench]')")
    else:
        classes.append(Zmq)
    return classes, notes


class Consumers:
    """Start one consumer process per variant; `close()` stops them and checks their reports."""

    def __init__(self, classes: list[type[Variant]], mode: Mode) -> None:
        self.variants: list[Variant] = []
        try:
            for cls in classes:
                variant = cls(mode)
                self.variants.append(variant)
                variant.start()
        except BaseException:
            self.kill()
            raise

    def close(self) -> None:
        try:
            for variant in self.variants:
                report = variant.stop()
                first, last, cached = report["first"], report["last"], report["cached"]
                if not first[0] <= last[0] <= first[0] + cached or last[1] > cached:
                    raise SystemExit(
                        f"{variant.name}: the consumer leaked (fds, shared mappings) after "
                        f"{report['handoffs']} handoffs: {tuple(first)} after the first, "
                        f"{tuple(last)} after the last"
                    )
        finally:
            self.kill()

    def kill(self) -> None:
        for variant in self.variants:
            variant.kill()


# --------------------------------------------------------------------------- measuring


def measure(
    phase: str,
    size: int,
    reps: int,
    variants: list[Variant],
    step: Callable[[Variant, bytes], tuple[int, int]],
    *,
    burst: int = 1,
) -> list[Result]:
    """Run *reps* interleaved rounds (after a warm-up) of every variant at *size*.

    Each round runs each variant *burst* times in a row (1: every handoff finds
    its consumer idle since the previous round; more: warm, as in a stream,
    and the first of each burst, which finds it idle, is not counted).
    """
    payload = make_payload(size)
    with memoryview(payload) as view:
        expected = read_every_byte(view)
    results = [Result(phase, size, variant.name) for variant in variants]
    warmup = max(1, min(10, reps // 10))
    shuffle = random.Random(f"{phase} {size}").shuffle
    baseline: tuple[int, int] | None = None
    for round_no in range(warmup + reps):
        order = list(range(len(variants)))
        shuffle(order)
        for index in order:
            variant = variants[index]
            for in_burst in range(burst):
                with gc_paused():
                    elapsed, checksum = step(variant, payload)
                if checksum != expected:
                    raise SystemExit(f"{variant.name} at {fmt_size(size)} read back wrong data")
                if round_no >= warmup and (burst == 1 or in_burst > 0):
                    results[index].samples_ns.append(elapsed)
            variant.check()
        # Untimed: every variant must have released everything it took this round.
        # Counted from the end of the warm-up on: libraries open what they need once.
        # Fewer is no leak: the auto pool drops slots of other sizes to make room.
        counts = (open_fds(), shared_mappings())
        if baseline is None and round_no >= warmup - 1:
            baseline = counts
        elif baseline is not None and (counts[0] > baseline[0] or counts[1] > baseline[1]):
            raise SystemExit(
                f"the producer's (fds, shared mappings) went from {baseline} to {counts} "
                f"at {fmt_size(size)}: a variant leaked"
            )
        gc.collect()
    return results


def throughput_step(variant: Variant, payload: bytes) -> tuple[int, int]:
    clock = time.perf_counter_ns
    start = clock()
    checksum = variant.round_trip(payload)
    return clock() - start, checksum


def latency_step(variant: Variant, payload: bytes) -> tuple[int, int]:
    return variant.handoff_latency(payload, time.perf_counter_ns)


# --------------------------------------------------------------------------- report


def paired_ratios(results: list[Result], phase: str, size: int, variant: str) -> list[float]:
    ours = next(r for r in results if (r.phase, r.size, r.variant) == (phase, size, variant))
    ref = next(r for r in results if (r.phase, r.size, r.variant) == (phase, size, REFERENCE))
    return [a / b for a, b in zip(ours.samples_ns, ref.samples_ns, strict=True)]


def reference_of(results: list[Result], r: Result) -> Result:
    return next(x for x in results if (x.phase, x.size, x.variant) == (r.phase, r.size, REFERENCE))


def latency_table(results: list[Result], phase: str) -> Table:
    def to_raw(r: Result) -> tuple[str, str]:
        ref = reference_of(results, r)
        return f"{r.median_ns / ref.median_ns:.2f}", f"{r.p99_ns / ref.p99_ns:.2f}"

    how = (
        "each variant once per round, so each handoff finds its consumer woken cold"
        if phase == COLD
        else "each variant --burst times in a row per round, the first not counted"
    )
    return _common.latency_table(
        [r for r in results if r.phase == phase],
        title=f"blobplane channel: handoff latency, {fmt_size(LATENCY_SIZE)}, "
        f"{LATENCY_PHASES[phase]} (send until the consumer acknowledges)",
        caption=(
            "payload prepared before the clock starts; the consumer acknowledges as soon as "
            "it holds the payload (mapped, received or attached), before reading it; "
            f"variants interleaved, {how}; x raw = this variant's percentile / the reference's"
        ),
        ratios=("x raw p50", "x raw p99"),
        ratio_cells=to_raw,
        bold=lambda r: r.variant == REFERENCE,
    )


def throughput_table(results: list[Result]) -> Table:
    return _common.throughput_table(
        results,
        title="blobplane channel: throughput, a fresh blob per handoff, the consumer "
        "(another process) reads every byte",
        caption=(
            "one whole handoff per run: create + fill + seal + send, the consumer maps, reads "
            "and unmaps, its reply reaches the producer, which releases its side (blobplane's "
            "consumer replies twice: the library's Ack when mapped, then the sum); median of "
            "the runs, variants interleaved in a new random order each round; IQR = "
            "25th-75th percentile; GB/s = size / median (10^9 B/s); x raw = median / the "
            "reference's median"
        ),
        ratio="x raw",
        ratio_cell=lambda r: f"{r.median_ns / reference_of(results, r).median_ns:.3f}",
        bold=lambda r: r.variant == REFERENCE,
    )


@dataclass
class Verdict:
    what: str
    target: float | None
    paired_median: float
    iqr: tuple[float, float]
    median_ratio: float

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.paired_median <= self.target

    def line(self) -> str:
        q1, q3 = self.iqr
        text = (
            f"{LIBRARY} / raw, {self.what}: paired median {self.paired_median:.3f}x "
            f"(IQR {q1:.3f}-{q3:.3f}; ratio of medians {self.median_ratio:.3f}x)"
        )
        if self.target is None:
            return f"{text}  (no target)"
        if self.met:
            return f"{text}  target ≤ {self.target}x met"
        if q1 <= self.target:
            return f"{text}  target ≤ {self.target}x: not met by the median (inside the IQR)"
        return f"{text}  target ≤ {self.target}x NOT met"


def verdicts(results: list[Result]) -> list[Verdict]:
    out: list[Verdict] = []
    for r in results:
        if r.variant != LIBRARY:
            continue
        ratios = paired_ratios(results, r.phase, r.size, LIBRARY)
        ref = reference_of(results, r)
        target: float | None
        if r.phase in LATENCY_PHASES:
            what = f"{fmt_size(r.size)} handoff latency (p50), {LATENCY_PHASES[r.phase]}"
            target = LATENCY_TARGET
        else:
            what = f"{fmt_size(r.size)} throughput"
            target = THROUGHPUT_TARGET if r.size >= THROUGHPUT_TARGET_FROM else None
        out.append(
            Verdict(
                what,
                target,
                statistics.median(ratios),
                quartiles(ratios),
                r.median_ns / ref.median_ns,
            )
        )
    return out


def overhead_lines(results: list[Result]) -> list[str]:
    """The library's time over the reference's, per handoff (median of paired differences)."""
    lines = []
    for r in results:
        if r.variant != LIBRARY:
            continue
        ref = reference_of(results, r)
        diffs = [float(a - b) for a, b in zip(r.samples_ns, ref.samples_ns, strict=True)]
        what = "throughput run"
        if r.phase in LATENCY_PHASES:
            what = f"handoff latency, {LATENCY_PHASES[r.phase]}"
        lines.append(
            f"  {fmt_size(r.size):>8} {what}: blobplane minus raw "
            f"{fmt_time(statistics.median(diffs))} a handoff (median of paired differences), "
            f"the reference taking {fmt_time(ref.median_ns)}"
        )
    return lines


def to_json(results: list[Result], notes: list[str], seconds: float) -> dict[str, Any]:
    return {
        "environment": environment(),
        "wall_seconds": round(seconds, 1),
        "notes": notes,
        "results": [
            r.to_json(ratio_to_raw=r.median_ns / reference_of(results, r).median_ns)
            for r in results
        ],
        "verdicts": [
            {
                "what": v.what,
                "target": v.target,
                "paired_median_ratio": v.paired_median,
                "paired_iqr": list(v.iqr),
                "ratio_of_medians": v.median_ratio,
                "met": v.met,
            }
            for v in verdicts(results)
        ],
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        help="comma-separated throughput sizes such as 4K,1M,64M (default: 4K,1M,64M,512M)",
    )
    parser.add_argument("--reps", type=int, help="throughput runs per size (default: by size)")
    parser.add_argument("--latency-reps", type=int, help=f"latency runs (default {LATENCY_REPS})")
    parser.add_argument(
        "--burst",
        type=int,
        default=BURST,
        help=f"handoffs of a variant in a row per round, back to back (default {BURST})",
    )
    parser.add_argument("--consumer", choices=sorted(CONSUMERS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["latency", "throughput"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consumer:
        return args

    plan = dict(QUICK_PLAN if args.quick else DEFAULT_PLAN)
    if args.sizes:
        plan = {size: plan.get(size, 3 if args.quick else 11) for size in args.sizes}
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be at least 1")
        plan = dict.fromkeys(plan, args.reps)
    args.plan = plan
    if args.latency_reps is None:
        args.latency_reps = QUICK_LATENCY_REPS if args.quick else LATENCY_REPS
    if args.latency_reps < 1:
        parser.error("--latency-reps must be at least 1")
    if args.burst < 2:
        parser.error("--burst must be at least 2 (the first of each burst is not counted)")
    return args


def run(args: argparse.Namespace, classes: list[type[Variant]], console: Console) -> list[Result]:
    """Both measurements, each with its own set of consumer processes."""
    results: list[Result] = []
    console.print(
        f"[dim]handoff latency at {fmt_size(LATENCY_SIZE)}: {args.latency_reps} runs of each "
        "variant…[/dim]"
    )
    consumers = Consumers(classes, "latency")
    try:
        results += measure(COLD, LATENCY_SIZE, args.latency_reps, consumers.variants, latency_step)
        rounds = max(1, args.latency_reps // (args.burst - 1))
        console.print(
            f"[dim]back to back: {rounds} rounds of {args.burst} handoffs of each variant…[/dim]"
        )
        results += measure(
            BACK_TO_BACK,
            LATENCY_SIZE,
            rounds,
            consumers.variants,
            latency_step,
            burst=args.burst,
        )
    finally:
        consumers.close()

    consumers = Consumers(classes, "throughput")
    try:
        for size, reps in args.plan.items():
            console.print(
                f"[dim]throughput at {fmt_size(size)}: {reps} runs of each variant…[/dim]"
            )
            results += measure("throughput", size, reps, consumers.variants, throughput_step)
    finally:
        consumers.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.consumer:
        return consumer_main(args.consumer, args.mode, args.endpoint)
    console = Console(width=None if sys.stdout.isatty() else 140)
    started = time.perf_counter()
    classes, notes = variant_classes()
    results = run(args, classes, console)

    for phase in LATENCY_PHASES:
        console.print(latency_table(results, phase))
    console.print(throughput_table(results))
    for note in notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    for verdict in verdicts(results):
        console.print(verdict.line())
    for line in overhead_lines(results):
        console.print(line)
    seconds = time.perf_counter() - started
    console.print(f"[dim]{seconds:.0f} s[/dim]")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results, notes, seconds), out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
