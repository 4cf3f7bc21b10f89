"""Benchmark of blobplane streams against the other ways to push frames to other processes.

Run it with `make bench` or `.venv/bin/python bench/streams.py` (``--quick``
for a smoke test, ``--json PATH`` to keep the numbers, ``--experiment ring``
for the wake-up experiment alone). This process publishes; every variant has
its own subscribers, separate processes started from this file
(``--subscriber KIND``). Every subscriber reads every byte of every frame in
place (the wrapping uint64 sum of `bench/core.py`, from ``_common``) and
checks it against the payload's.

Variants, publisher side -> subscriber side:

- ``in-process copy + read (reference)``: the physical floor. The payload is
  copied into one pre-faulted, reused, page-aligned buffer and read in the
  same process, once per subscriber; no second process, no hand-over.
- ``blobplane streams``: ``Publisher(slots=4)``; ``loan()``, the payload is
  written in place into ``loan.buffer``, ``publish()``; each ``Subscriber``
  reads ``receipt.view`` in place and closes the receipt (the release).
- ``blobplane streams, spin 50 µs``: the same with ``spin_us=50`` on the
  publisher and every subscriber (each looks at the shared counters that
  long before sleeping in poll()).
- ``blobplane channel, fresh blob``: ``SharedMemoryBlobs.create`` +
  ``write_all`` + ``seal`` + ``send_blob`` (to each subscriber, returns when
  it mapped the blob) + ``cleanup`` per frame; ``recv_handoff`` on the other
  side.
- ``multiprocessing.Pipe``: ``send_bytes`` -> ``recv_bytes``; every byte goes
  through the kernel, and the subscriber reads the bytes it received.
- ``iceoryx2`` (optional: ``pip install '.[bench-iceoryx]'``): a
  ``Slice[c_uint8]`` publish-subscribe service; ``loan_slice_uninit``, the
  payload copied into the sample, ``send``, and an iceoryx2 event to wake the
  subscribers, who ``receive``, read the sample in place, drop it and answer
  with an 8-byte sample on an acknowledgement service plus an event (the
  publisher's releases, as the streams' Release messages).

Every source buffer is page-aligned (an mmap), so no variant copies into a
destination at another page offset than its source (such a copy of 512 MiB
runs a few percent slower here), except where a library places its payload itself (iceoryx2 puts
each sample's payload 0xb8-0x148 bytes into a page: noted in the output).

Every frame carries, in its first 16 bytes, the publish time
(``CLOCK_MONOTONIC``, taken after the payload was written, just before it
is handed over) and flags; the subscriber takes the time as soon as it holds
the frame, before reading it. Two measurements per frame size and subscriber
count, with fresh subscriber processes:

- latency: one frame in flight. Each frame is published only once the
  previous one was released by every subscriber: publish -> receive
  (one-way, per subscriber, p50 and p99) and publish -> receive -> read ->
  release -> seen by the publisher (the round trip, p50 and p99).
- back to back (4 KiB only): the same round trip, but in bursts of frames of
  one variant, each published as soon as the last came back, so the
  subscriber is still waiting (or spinning) when it comes, as in a busy
  stream; the first frame of each burst is not counted.
- throughput: rounds of several frames pipelined through 4 slots (the
  channel waits for each subscriber to map its blob, the Pipe for the
  kernel's socket buffer), timed until the last frame was released by every
  subscriber. Frames per second = frames / time; GB/s = frame bytes / time
  (each subscriber reads them all).

As in the other benchmarks: every round runs each variant once, in a new
seeded random order; medians over the rounds; ratios to the reference also
as the median of per-round (paired) ratios; the garbage collector is off
while a round runs. Compare variants within one run, never across runs.

``--experiment ring`` (also part of the default run) compares, raw and for
4 KiB frames, the two ways a subscriber can be woken for a frame in shared
memory: one small message per frame over a ``SOCK_SEQPACKET`` socket (what
blobplane streams did first) against an index ring in a shared memfd with an
``eventfd`` wake-up (what they do now, as the ring measured better).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import mmap
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from _common import (
    KIB,
    MADV_POPULATE_WRITE,
    MIB,
    U64_MASK,
    environment,
    fmt_size,
    fmt_time,
    gc_paused,
    make_payload,
    parse_size,
    quartiles,
    read_every_byte,
)
from blobplane import BlobBackend, SharedMemoryBlobs, channel
from blobplane.streams import Publisher, Subscriber
from blobplane.wire import UserPayload

# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Step:
    """How much to run at one frame size (for each subscriber count).

    The variants that are an order of magnitude slower at large frames (a
    fresh blob per frame, a Pipe) get fewer frames there: ``slow_*``.
    """

    latency_frames: int  # paced frames (one in flight) per variant
    rounds: int  # throughput rounds
    frames: int  # frames per throughput round
    slow_latency_frames: int
    slow_frames: int


def step(latency: int, rounds: int, frames: int, slow: tuple[int, int] | None = None) -> Step:
    slow_latency, slow_frames = slow or (latency, frames)
    return Step(latency, rounds, frames, slow_latency, slow_frames)


# Sized so that the default run takes about three and a half minutes here (2 cores).
DEFAULT_PLAN: dict[int, Step] = {
    4 * KIB: step(latency=2001, rounds=21, frames=200),
    1 * MIB: step(latency=201, rounds=15, frames=24),
    64 * MIB: step(latency=11, rounds=7, frames=8, slow=(5, 2)),
    512 * MIB: step(latency=4, rounds=5, frames=4, slow=(2, 1)),
}
QUICK_PLAN: dict[int, Step] = {
    4 * KIB: step(latency=40, rounds=3, frames=10),
    1 * MIB: step(latency=5, rounds=2, frames=6),
}
DEFAULT_SUBSCRIBERS = (1, 4)
QUICK_SUBSCRIBERS = (1,)
RING_REPS = 3001
QUICK_RING_REPS = 50

SLOTS = 4  # frames in flight: the streams' pool, iceoryx2's window
REPLY_TIMEOUT_S = 120.0
HEADROOM = 4 * KIB  # room in the source buffers beyond the frame

REFERENCE = "in-process copy + read (reference)"
STREAMS = "blobplane streams"
SPIN_US = 50.0  # the spin budget of the spinning streams variant, both sides
STREAMS_SPIN = f"blobplane streams, spin {SPIN_US:.0f} µs"
CHANNEL = "blobplane channel, fresh blob"
PIPE = "multiprocessing.Pipe"
ICEORYX = "iceoryx2"
ICEORYX_OFFSETS: set[int] = set()  # page offsets of iceoryx2's sample payloads, for the notes

# Targets (issue 4): streams with one subscriber within 1.2x the reference's time
# at 64 MiB and up; faster than iceoryx2 from 1 MiB up; the 4 KiB round trip.
REFERENCE_TARGET = 1.2
REFERENCE_TARGET_FROM = 64 * MIB
ICEORYX_TARGET_FROM = 1 * MIB
ROUND_TRIP_SIZE = 4 * KIB
ROUND_TRIP_P50_NS = 50_000
ROUND_TRIP_P99_NS = 200_000
BURST = 100  # frames per back-to-back burst

# The first 16 bytes of every frame: publish time (ns, CLOCK_MONOTONIC) and flags.
STAMP = struct.Struct("<QQ")
LAST = 1  # the subscriber answers DONE once it has read this frame (channel, Pipe)
PACED = 2  # a latency frame: the subscriber records its one-way latency
STOP = 4  # the last frame of all: the subscriber reports and exits
DONE = b"D"
REPORT_PREFIX = "REPORT "

monotonic_ns = time.monotonic_ns


# --------------------------------------------------------------------------- payloads


def page_aligned(size: int) -> mmap.mmap:
    """A pre-faulted anonymous mapping: page-aligned, so copies out of it are at offset 0."""
    buffer = mmap.mmap(-1, size + HEADROOM)
    buffer.madvise(MADV_POPULATE_WRITE)
    return buffer


class Source:
    """The payload every variant publishes, in a page-aligned buffer, and its checksum.

    Its first 16 bytes are zero: every frame carries its stamp there, and a
    subscriber checks ``sum - stamp - flags == base``.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer = page_aligned(size)
        self.buffer[:size] = make_payload(size)
        self.buffer[: STAMP.size] = bytes(STAMP.size)
        self.view = memoryview(self.buffer)[:size]
        self.base = read_every_byte(self.view)

    def close(self) -> None:
        self.view.release()
        self.buffer.close()


# --------------------------------------------------------------------------- subscribers


class Ledger:
    """What a subscriber keeps: one-way latencies of paced frames, frame and error counts."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.frames = 0
        self.bad = 0
        self.latencies_ns: list[int] = []

    def frame(self, received_ns: int, view: memoryview) -> int:
        """Read every byte of *view*, check it, return its flags."""
        stamp, flags = STAMP.unpack_from(view)
        checksum = read_every_byte(view)
        if (checksum - stamp - flags) & U64_MASK != self.base:
            self.bad += 1
        self.frames += 1
        if flags & PACED:
            self.latencies_ns.append(received_ns - stamp)
        return int(flags)

    def report(self) -> None:
        data = {"frames": self.frames, "bad": self.bad, "latencies_ns": self.latencies_ns}
        sys.stdout.write(REPORT_PREFIX + json.dumps(data) + "\n")
        sys.stdout.flush()


def subscribe_streams(endpoint: str, ledger: Ledger, index: int, spin_us: float = 0.0) -> None:
    with Subscriber(endpoint, timeout=None, spin_us=spin_us) as sub:
        for receipt in sub:
            received = monotonic_ns()
            flags = ledger.frame(received, receipt.view)
            receipt.close()
            if flags & STOP:
                return


def subscribe_channel(endpoint: str, ledger: Ledger, index: int) -> None:
    with channel.from_socket(int(endpoint), timeout=None) as ch:
        while True:
            handoff = ch.recv_handoff()
            received = monotonic_ns()
            with handoff, handoff.blob.as_slice() as view:
                flags = ledger.frame(received, view)
            if flags & STOP:
                return
            if flags & LAST:
                ch.send(DONE)


def subscribe_pipe(endpoint: str, ledger: Ledger, index: int) -> None:
    with Connection(int(endpoint)) as conn:
        while True:
            data = conn.recv_bytes()
            received = monotonic_ns()
            with memoryview(data) as view:
                flags = ledger.frame(received, view)
            del data
            if flags & STOP:
                return
            if flags & LAST:
                conn.send_bytes(DONE)


def load_iceoryx2() -> Any:
    """The iceoryx2 module, or None when it is not installed (an optional extra)."""
    try:
        module = importlib.import_module("iceoryx2")
    except ImportError:
        return None
    module.set_log_level(module.LogLevel.Error)
    return module


class IceoryxPorts:
    """Both ends of the two iceoryx2 services a frame stream needs, named after *prefix*.

    ``frames``: a ``Slice[c_uint8]`` publish-subscribe service plus an event to
    wake the subscribers; ``acks``: a ``c_uint64`` service plus an event to wake
    the publisher, which each subscriber uses to say which frame it released.
    """

    def __init__(self, iox2: Any, prefix: str, size: int, subscribers: int, creator: bool) -> None:
        self.iox2 = iox2
        self.node = (
            iox2.NodeBuilder.new()
            .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
            .create(iox2.ServiceType.Ipc)
        )
        frames = (
            self.node.service_builder(iox2.ServiceName.new(f"{prefix}/frames"))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .max_publishers(1)
            .max_subscribers(subscribers)
            .subscriber_max_buffer_size(SLOTS)
            .subscriber_max_borrowed_samples(1)
            .history_size(0)
            .enable_safe_overflow(False)
        )
        acks = (
            self.node.service_builder(iox2.ServiceName.new(f"{prefix}/acks"))
            .publish_subscribe(ctypes.c_uint64)
            .max_publishers(subscribers)
            .max_subscribers(1)
            .subscriber_max_buffer_size(2 * SLOTS * subscribers + 2)
            .history_size(0)
            .enable_safe_overflow(False)
        )
        wake = (
            self.node.service_builder(iox2.ServiceName.new(f"{prefix}/wake"))
            .event()
            .max_notifiers(1)
            .max_listeners(subscribers)
        )
        back = (
            self.node.service_builder(iox2.ServiceName.new(f"{prefix}/back"))
            .event()
            .max_notifiers(subscribers)
            .max_listeners(1)
        )
        self.ports: list[Any] = []  # deleted first, in `close()`
        if creator:
            self.frames, self.acks = frames.create(), acks.create()
            self.wake, self.back = wake.create(), back.create()
        else:
            self.frames, self.acks = frames.open(), acks.open()
            self.wake, self.back = wake.open(), back.open()

    def port(self, port: Any) -> Any:
        """Keep *port* (a publisher, subscriber, notifier or listener) for `close()`."""
        self.ports.append(port)
        return port

    def close(self) -> None:
        for port in self.ports:
            port.delete()
        self.ports.clear()
        for name in ("frames", "acks", "wake", "back", "node"):
            if hasattr(self, name):
                delattr(self, name)


def subscribe_iceoryx(endpoint: str, ledger: Ledger, index: int) -> None:
    iox2 = load_iceoryx2()
    if iox2 is None:
        raise SystemExit("iceoryx2 is not installed")
    prefix, size, subscribers = endpoint.rsplit(":", 2)
    ports = IceoryxPorts(iox2, prefix, int(size), int(subscribers), creator=False)
    try:
        subscriber = ports.port(ports.frames.subscriber_builder().create())
        listener = ports.port(ports.wake.listener_builder().create())
        ack_pub = ports.port(ports.acks.publisher_builder().create())
        notifier = ports.port(ports.back.notifier_builder().create())
        tag = index << 48
        ack_pub.send_copy(ctypes.c_uint64(tag))  # hello: this subscriber is connected
        notifier.notify()
        seen = 0
        while True:
            listener.blocking_wait()
            while (sample := subscriber.receive()) is not None:
                received = monotonic_ns()
                view = sample.payload().as_memory_view()
                flags = ledger.frame(received, view)
                view.release()
                sample.delete()
                seen += 1
                ack_pub.send_copy(ctypes.c_uint64(tag | seen))
                notifier.notify()
                if flags & STOP:
                    return
    finally:
        ports.close()


def subscribe_streams_spin(endpoint: str, ledger: Ledger, index: int) -> None:
    subscribe_streams(endpoint, ledger, index, SPIN_US)


SUBSCRIBERS: dict[str, Callable[[str, Ledger, int], None]] = {
    "streams": subscribe_streams,
    "streams-spin": subscribe_streams_spin,
    "channel": subscribe_channel,
    "pipe": subscribe_pipe,
    "iceoryx2": subscribe_iceoryx,
}


def subscriber_main(kind: str, endpoint: str, base: int, index: int) -> int:
    gc.disable()  # as the publisher's timed regions
    ledger = Ledger(base)
    SUBSCRIBERS[kind](endpoint, ledger, index)
    ledger.report()
    return 0


def spawn_subscriber(
    kind: str, endpoint: str, source: Source, index: int, fd: int | None = None
) -> subprocess.Popen[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--subscriber", kind]
    command += ["--endpoint", endpoint, "--base", str(source.base), "--index", str(index)]
    return subprocess.Popen(
        command, pass_fds=() if fd is None else (fd,), stdout=subprocess.PIPE, text=True
    )


# --------------------------------------------------------------------------- publishers


class Variant:
    """The publisher side of one way to push frames, with its subscriber processes."""

    name: str
    kind: str
    slow = False  # gets `Step.slow_*` frames

    def __init__(self, source: Source, subscribers: int) -> None:
        self.source = source
        self.size = source.size
        self.subscribers = subscribers
        self.processes: list[subprocess.Popen[str]] = []

    def launch(self) -> None:
        """Start the subscriber processes (do not wait for them)."""

    def connect(self) -> None:
        """Wait until every subscriber is connected."""

    def publish(self, flags: int) -> int:
        """Write the payload, stamp it, hand it over; return the stamp (ns)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Return once every frame published so far was released by every subscriber."""
        raise NotImplementedError

    def begin_paced(self) -> None:
        """From here on one frame is in flight at a time."""

    def end_paced(self) -> None:
        """Back to pipelined frames."""

    def paced(self, flags: int = LAST | PACED) -> int:
        """One latency frame: publish, wait for every release; the round trip in ns."""
        stamp = self.publish(flags)
        self.sync()
        return monotonic_ns() - stamp

    def stop(self) -> list[dict[str, Any]]:
        """Send the STOP frame, close, and collect every subscriber's report."""
        self.publish(STOP)
        self.close()
        reports = []
        for process in self.processes:
            out, _ = process.communicate(timeout=REPLY_TIMEOUT_S)
            if process.returncode != 0:
                raise SystemExit(f"{self.name}: a subscriber exited with {process.returncode}")
            lines = [line for line in out.splitlines() if line.startswith(REPORT_PREFIX)]
            if not lines:
                raise SystemExit(f"{self.name}: a subscriber sent no report")
            reports.append(json.loads(lines[-1].removeprefix(REPORT_PREFIX)))
        return reports

    def close(self) -> None:
        """Release this side's resources (idempotent)."""

    def kill(self) -> None:
        self.close()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


class Reference(Variant):
    """Copy into a reused pre-faulted buffer and read it, in this process, once per subscriber."""

    name = REFERENCE
    kind = "reference"

    def __init__(self, source: Source, subscribers: int) -> None:
        super().__init__(source, subscribers)
        self.buffer = page_aligned(self.size)
        self.view = memoryview(self.buffer)[: self.size]
        self.bad = 0

    def publish(self, flags: int) -> int:
        view = self.view
        view[:] = self.source.view
        stamp = monotonic_ns()
        STAMP.pack_into(view, 0, stamp, flags)
        for _ in range(self.subscribers):
            if (read_every_byte(view) - stamp - flags) & U64_MASK != self.source.base:
                self.bad += 1
        return stamp

    def sync(self) -> None:
        pass

    def stop(self) -> list[dict[str, Any]]:
        self.close()
        return []

    def close(self) -> None:
        if not self.buffer.closed:
            self.view.release()
            self.buffer.close()


class Streams(Variant):
    name = STREAMS
    kind = "streams"
    spin_us = 0.0

    def __init__(self, source: Source, subscribers: int) -> None:
        super().__init__(source, subscribers)
        self.folder = tempfile.mkdtemp(prefix="blobplane-bench-")
        self.publisher = Publisher(
            os.path.join(self.folder, "stream.sock"),
            slot_size=self.size,
            slots=SLOTS,
            timeout=REPLY_TIMEOUT_S,
            spin_us=self.spin_us,
        )
        self.pending: Any = None  # the loan for the next frame, taken by sync() when paced
        self.held: list[Any] = []  # slots kept out of circulation while paced

    def launch(self) -> None:
        for index in range(self.subscribers):
            self.processes.append(
                spawn_subscriber(self.kind, self.publisher.path, self.source, index)
            )

    def connect(self) -> None:
        self.publisher.wait_for_subscribers(self.subscribers, timeout=REPLY_TIMEOUT_S)

    def publish(self, flags: int) -> int:
        loan = self.pending
        if loan is None:
            loan = self.publisher.loan(timeout=REPLY_TIMEOUT_S)
        self.pending = None
        with loan.buffer as buffer:
            buffer[:] = self.source.view
            stamp = monotonic_ns()
            STAMP.pack_into(buffer, 0, stamp, flags)
        self.publisher.publish(loan)
        return stamp

    def sync(self) -> None:
        if self.held:
            # Paced: one slot circulates; it is free again once every subscriber released it.
            self.pending = self.publisher.loan(timeout=REPLY_TIMEOUT_S)
            return
        loans = [self.publisher.loan(timeout=REPLY_TIMEOUT_S) for _ in range(SLOTS)]
        for loan in loans:
            loan.close()

    def begin_paced(self) -> None:
        self.sync()
        self.held = [self.publisher.loan(timeout=REPLY_TIMEOUT_S) for _ in range(SLOTS - 1)]

    def end_paced(self) -> None:
        for loan in [*self.held, self.pending]:
            if loan is not None:
                loan.close()
        self.held, self.pending = [], None

    def close(self) -> None:
        self.end_paced()
        self.publisher.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class StreamsSpin(Streams):
    """The same, with `spin_us` on the publisher and every subscriber."""

    name = STREAMS_SPIN
    kind = "streams-spin"
    spin_us = SPIN_US


class FreshBlobs(Variant):
    name = CHANNEL
    kind = "channel"
    slow = True

    def __init__(self, source: Source, subscribers: int) -> None:
        super().__init__(source, subscribers)
        self.blobs = SharedMemoryBlobs(BlobBackend.MEMFD)
        self.channels: list[channel.Channel] = []

    def launch(self) -> None:
        for index in range(self.subscribers):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with theirs:
                self.channels.append(channel.from_socket(ours, timeout=REPLY_TIMEOUT_S))
                fd = theirs.fileno()
                self.processes.append(spawn_subscriber(self.kind, str(fd), self.source, index, fd))

    def publish(self, flags: int) -> int:
        with self.blobs.create(self.size) as blob:
            blob.write_all(self.source.view)
            stamp = monotonic_ns()
            blob.write_all(STAMP.pack(stamp, flags))
            blob.seal()
            for ch in self.channels:
                ch.send_blob(blob)
        return stamp

    def sync(self) -> None:
        for ch in self.channels:
            message, fds = ch.recv()
            if fds or not isinstance(message, UserPayload) or message.data != DONE:
                raise SystemExit(f"{self.name}: unexpected reply {message!r}")

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.blobs.close()


class Pipe(Variant):
    name = PIPE
    kind = "pipe"
    slow = True

    def __init__(self, source: Source, subscribers: int) -> None:
        super().__init__(source, subscribers)
        self.connections: list[Connection] = []

    def launch(self) -> None:
        for index in range(self.subscribers):
            ours, theirs = multiprocessing.Pipe(duplex=True)
            with theirs:
                self.connections.append(ours)
                fd = theirs.fileno()
                self.processes.append(spawn_subscriber(self.kind, str(fd), self.source, index, fd))

    def publish(self, flags: int) -> int:
        view = self.source.view
        stamp = monotonic_ns()
        STAMP.pack_into(view, 0, stamp, flags)  # the source's own first 16 bytes
        for conn in self.connections:
            conn.send_bytes(view)
        return stamp

    def sync(self) -> None:
        for conn in self.connections:
            if not conn.poll(REPLY_TIMEOUT_S) or conn.recv_bytes() != DONE:
                raise SystemExit(f"{self.name}: no reply from a subscriber")

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.source.view[: STAMP.size] = bytes(STAMP.size)


class Iceoryx(Variant):
    name = ICEORYX
    kind = "iceoryx2"

    def __init__(self, source: Source, subscribers: int) -> None:
        super().__init__(source, subscribers)
        self.iox2 = load_iceoryx2()
        self.prefix = f"blobplane-bench/{os.getpid()}/{self.size}/{subscribers}/{time.time_ns()}"
        self.ports = IceoryxPorts(self.iox2, self.prefix, self.size, subscribers, creator=True)
        self.publisher = self.ports.port(
            self.ports.frames.publisher_builder()
            .initial_max_slice_len(self.size)
            .allocation_strategy(self.iox2.AllocationStrategy.Static)
            .max_loaned_samples(1)
            .create()
        )
        self.notifier = self.ports.port(self.ports.wake.notifier_builder().create())
        self.ack_sub = self.ports.port(self.ports.acks.subscriber_builder().create())
        self.listener = self.ports.port(self.ports.back.listener_builder().create())
        self.released = [0] * subscribers  # the last frame each subscriber released
        self.hellos = 0
        self.seq = 0
        self.source_address = ctypes.addressof(ctypes.c_char.from_buffer(source.buffer))
        self.wait_timeout = self.iox2.Duration.from_secs_f64(REPLY_TIMEOUT_S)

    def launch(self) -> None:
        endpoint = f"{self.prefix}:{self.size}:{self.subscribers}"
        for index in range(self.subscribers):
            self.processes.append(spawn_subscriber(self.kind, endpoint, self.source, index))

    def _take_acks(self) -> None:
        # An empty answer is not always a timeout: a wake-up whose events an earlier
        # wait already collected returns at once with nothing.
        started = monotonic_ns()
        while not self.listener.timed_wait(self.wait_timeout):
            if monotonic_ns() - started > REPLY_TIMEOUT_S * 1e9:
                raise SystemExit(f"{self.name}: no acknowledgement within {REPLY_TIMEOUT_S} s")
        while (sample := self.ack_sub.receive()) is not None:
            value = sample.payload().contents.value
            sample.delete()
            index, seq = value >> 48, value & 0xFFFF_FFFF_FFFF
            if seq == 0:
                self.hellos += 1
            else:
                self.released[index] = seq

    def connect(self) -> None:
        while self.hellos < self.subscribers:
            self._take_acks()

    def publish(self, flags: int) -> int:
        while self.seq - min(self.released) >= SLOTS:
            self._take_acks()
        sample = self.publisher.loan_slice_uninit(self.size)
        address = sample.payload_ptr
        ICEORYX_OFFSETS.add(address % mmap.PAGESIZE)
        ctypes.memmove(address, self.source_address, self.size)
        stamp = monotonic_ns()
        STAMP.pack_into((ctypes.c_char * STAMP.size).from_address(address), 0, stamp, flags)
        sample.assume_init().send()
        self.notifier.notify()
        self.seq += 1
        return stamp

    def sync(self) -> None:
        while min(self.released) < self.seq:
            self._take_acks()

    def close(self) -> None:
        self.ports.close()


def variant_classes(subscribers: int) -> tuple[list[type[Variant]], list[str]]:
    classes: list[type[Variant]] = [Reference, Streams, StreamsSpin, FreshBlobs, Pipe]
    notes: list[str] = []
    if load_iceoryx2() is None:
        notes.append(
            f"{ICEORYX}: skipped, not installed (pip install '.[bench-iceoryx]'; "
            "`make bench` tries to)"
        )
    else:
        classes.append(Iceoryx)
    return classes, notes


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    size: int
    subscribers: int
    variant: str
    frame_ns: list[float] = field(default_factory=list)  # per throughput round: time / frame
    latency_ns: list[int] = field(default_factory=list)  # one-way, every subscriber's
    round_trip_ns: list[int] = field(default_factory=list)
    # The same, frames back to back (the next one published as soon as the last came back).
    burst_round_trip_ns: list[int] = field(default_factory=list)

    @property
    def median_ns(self) -> float:
        return statistics.median(self.frame_ns)

    @property
    def fps(self) -> float:
        return 1e9 / self.median_ns

    @property
    def gbps(self) -> float:
        return self.size / self.median_ns


def percentile(values: list[int], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) < 2:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_bursts(
    variants: list[Variant],
    results: list[Result],
    paced: list[int],
    *,
    step: Step,
    shuffle: Callable[[list[int]], None],
    console: Console,
) -> list[int]:
    """Round trips back to back (at `ROUND_TRIP_SIZE` only); how many frames each variant sent.

    The subscriber is still waiting (or spinning) when the next frame comes, as
    in a busy stream; bursts of each variant, variants interleaved.
    """
    burst_frames = [0] * len(variants)
    size, subscribers = results[0].size, results[0].subscribers
    if size != ROUND_TRIP_SIZE:
        return burst_frames
    console.print(
        f"[dim]{fmt_size(size)}, {subscribers} subscriber(s): round trip back to "
        f"back, {step.latency_frames} frames of each variant in bursts of {BURST}…[/dim]"
    )
    for _ in range(-(-step.latency_frames // BURST)):
        shuffle(paced)
        for i in paced:
            with gc_paused():
                times = [variants[i].paced(LAST) for _ in range(BURST + 1)]
            # The first frame of a burst finds its subscriber asleep: a paced frame.
            results[i].burst_round_trip_ns += times[1:]
            burst_frames[i] += BURST + 1
        gc.collect()
    return burst_frames


def run_group(
    size: int, subscribers: int, step: Step, console: Console
) -> tuple[list[Result], list[str]]:
    """Every variant at one frame size and subscriber count, with fresh subscribers."""
    source = Source(size)
    classes, notes = variant_classes(subscribers)
    variants: list[Variant] = []
    try:
        for cls in classes:
            variants.append(cls(source, subscribers))
        for variant in variants:
            variant.launch()
        for variant in variants:
            variant.connect()
        results = [Result(size, subscribers, v.name) for v in variants]
        shuffle = random.Random(size * 10 + subscribers).shuffle
        order = list(range(len(variants)))

        # Warm-up: every slot goes round once, every subscriber has mapped what it needs.
        for variant in variants:
            for _ in range(SLOTS + 1):
                variant.publish(0)
            variant.publish(LAST)
            variant.sync()

        console.print(
            f"[dim]{fmt_size(size)}, {subscribers} subscriber(s): latency, "
            f"{step.latency_frames} frames of each variant…[/dim]"
        )
        latency_frames = [
            step.slow_latency_frames if v.slow else step.latency_frames for v in variants
        ]
        frames = [step.slow_frames if v.slow else step.frames for v in variants]
        paced = [i for i in order if variants[i].name != REFERENCE]
        for i in paced:
            variants[i].begin_paced()
        for rep in range(step.latency_frames):
            shuffle(paced)
            for i in paced:
                if rep >= latency_frames[i]:
                    continue
                with gc_paused():
                    results[i].round_trip_ns.append(variants[i].paced())
            gc.collect()
        burst_frames = run_bursts(
            variants, results, paced, step=step, shuffle=shuffle, console=console
        )
        for i in paced:
            variants[i].end_paced()

        console.print(
            f"[dim]{fmt_size(size)}, {subscribers} subscriber(s): throughput, "
            f"{step.rounds} rounds of {step.frames} frames of each variant…[/dim]"
        )
        for _ in range(step.rounds):
            shuffle(order)
            for i in order:
                variant, count = variants[i], frames[i]
                with gc_paused():
                    start = time.perf_counter_ns()
                    for k in range(count):
                        variant.publish(LAST if k == count - 1 else 0)
                    variant.sync()
                    elapsed = time.perf_counter_ns() - start
                results[i].frame_ns.append(elapsed / count)
            gc.collect()

        for index, (variant, result) in enumerate(zip(variants, results, strict=True)):
            expected = (
                (SLOTS + 2)
                + latency_frames[index]
                + burst_frames[index]
                + step.rounds * frames[index]
                + 1
            )
            reports = variant.stop()
            if isinstance(variant, Reference) and variant.bad:
                raise SystemExit(f"{variant.name} read back wrong data")
            for report in reports:
                if report["bad"] or report["frames"] != expected:
                    raise SystemExit(
                        f"{variant.name} at {fmt_size(size)}: a subscriber read "
                        f"{report['frames']} frames (expected {expected}), "
                        f"{report['bad']} with wrong data"
                    )
                result.latency_ns += report["latencies_ns"]
    except BaseException:
        for variant in variants:
            variant.kill()
        raise
    finally:
        source.close()
    return results, notes


# --------------------------------------------------------------------------- ring experiment

RING_SLOTS = 4
RING_SIZE = 4 * KIB
MESSAGE = struct.Struct("<QQQ")  # slot, seq, publish time
RELEASE = struct.Struct("<Q")  # seq
RING_ENTRIES = 64
HEAD_OFFSET = 0  # the publisher's count of frames written (u64)
RELEASED_OFFSET = 64  # the subscriber's count of frames released, another cache line (u64)
ENTRIES_OFFSET = 128  # RING_ENTRIES entries: slot, seq, publish time
COUNTER = struct.Struct("<Q")


def ring_subscriber_main(kind: str, fd: int, cpus: str) -> int:
    """The subscriber of the ring experiment: `message` or `eventfd`, on socket *fd*."""
    gc.disable()
    if cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    with socket.socket(fileno=fd) as sock:
        _, fds, _, _ = socket.recv_fds(sock, 16, 4)
        data = mmap.mmap(fds[0], RING_SLOTS * RING_SIZE, access=mmap.ACCESS_READ)
        os.close(fds[0])
        slots = memoryview(data)
        latencies: list[int] = []
        if kind == "message":
            unpack, release = MESSAGE.unpack, RELEASE.pack
            recv, send = sock.recv, sock.send
            while True:
                message = recv(64)
                received = monotonic_ns()
                if not message:
                    break
                slot, seq, stamp = unpack(message)
                read_every_byte(slots[slot * RING_SIZE : (slot + 1) * RING_SIZE])
                latencies.append(received - stamp)
                send(release(seq))
        else:
            _, control_fd, ready, released = fds
            control = mmap.mmap(control_fd, mmap.PAGESIZE)
            os.close(control_fd)
            entry = MESSAGE.unpack_from
            counter, set_counter = COUNTER.unpack_from, COUNTER.pack_into
            wait, wake = os.eventfd_read, os.eventfd_write
            done = 0
            while True:
                wait(ready)
                received = monotonic_ns()
                (head,) = counter(control, HEAD_OFFSET)
                if head == U64_MASK:
                    break
                while done < head:
                    slot, seq, stamp = entry(control, ENTRIES_OFFSET + (done % RING_ENTRIES) * 24)
                    read_every_byte(slots[slot * RING_SIZE : (slot + 1) * RING_SIZE])
                    latencies.append(received - stamp)
                    done += 1
                set_counter(control, RELEASED_OFFSET, done)
                wake(released, 1)
            control.close()
            os.close(ready)
            os.close(released)
        slots.release()
        data.close()
        sock.sendall(json.dumps(latencies).encode())
        sock.shutdown(socket.SHUT_WR)
    return 0


class RingSide:
    """The publisher side of one wake-up mechanism; `frame()` returns the round trip in ns.

    Both sides share a memfd of `RING_SLOTS` 4 KiB slots: the publisher copies
    the payload into the next slot and tells the subscriber, who reads it and
    answers with a release. ``message``: a 24-byte message (slot, sequence
    number, publish time) over a SOCK_SEQPACKET socket, an 8-byte one back.
    ``eventfd``: the same 24 bytes in an entry of a ring in a second shared
    memfd, the ring's head counter bumped, then ``eventfd_write``; the
    subscriber wakes in ``eventfd_read``, takes every entry up to the head,
    stores its released count in the control memfd and wakes the publisher
    with a second eventfd. The fds travel once, with ``socket.send_fds``.
    """

    def __init__(self, kind: str, source: Source, cpus: set[int] | None) -> None:
        self.kind = kind
        self.source = source.view[:RING_SIZE]
        self.data_fd = os.memfd_create(f"bench-ring-{kind}", os.MFD_CLOEXEC)
        os.ftruncate(self.data_fd, RING_SLOTS * RING_SIZE)
        self.data = mmap.mmap(self.data_fd, RING_SLOTS * RING_SIZE)
        self.data.madvise(MADV_POPULATE_WRITE)
        self.slots = memoryview(self.data)
        self.seq = 0
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = [self.data_fd]
        if kind == "eventfd":
            self.control_fd = os.memfd_create("bench-ring-control", os.MFD_CLOEXEC)
            os.ftruncate(self.control_fd, mmap.PAGESIZE)
            self.control = mmap.mmap(self.control_fd, mmap.PAGESIZE)
            self.ready = os.eventfd(0, os.EFD_CLOEXEC)
            self.released = os.eventfd(0, os.EFD_CLOEXEC)
            fds += [self.control_fd, self.ready, self.released]
        with theirs:
            command = [sys.executable, str(Path(__file__).resolve()), "--ring-subscriber", kind]
            command += ["--endpoint", str(theirs.fileno())]
            command += ["--cpus", ",".join(map(str, sorted(cpus))) if cpus else ""]
            self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),))
        socket.send_fds(self.sock, [b"fds"], fds)
        # Should the subscriber die, wake a publisher blocked in eventfd_read (a socket
        # reports the end of stream by itself); its check of the release then fails.
        self.closing = False
        self.watchdog = threading.Thread(target=self._watch, daemon=True)
        self.watchdog.start()

    def _watch(self) -> None:
        if self.process.wait() != 0 and self.kind == "eventfd" and not self.closing:
            os.eventfd_write(self.released, 1)

    def frame(self) -> int:
        seq = self.seq = self.seq + 1
        slot = seq % RING_SLOTS
        self.slots[slot * RING_SIZE : (slot + 1) * RING_SIZE] = self.source
        if self.kind == "message":
            stamp = monotonic_ns()
            self.sock.send(MESSAGE.pack(slot, seq, stamp))
            reply = self.sock.recv(64)
            elapsed = monotonic_ns() - stamp
            if len(reply) != RELEASE.size or RELEASE.unpack(reply)[0] != seq:
                raise SystemExit("ring experiment: a release out of order, or the subscriber died")
            return elapsed
        control = self.control
        stamp = monotonic_ns()
        MESSAGE.pack_into(
            control, ENTRIES_OFFSET + ((seq - 1) % RING_ENTRIES) * 24, slot, seq, stamp
        )
        COUNTER.pack_into(control, HEAD_OFFSET, seq)
        os.eventfd_write(self.ready, 1)
        os.eventfd_read(self.released)
        elapsed = monotonic_ns() - stamp
        if COUNTER.unpack_from(control, RELEASED_OFFSET)[0] != seq:
            raise SystemExit("ring experiment: a release out of order, or the subscriber died")
        return elapsed

    def stop(self) -> list[int]:
        if self.kind == "message":
            self.sock.send(b"")
        else:
            COUNTER.pack_into(self.control, HEAD_OFFSET, U64_MASK)
            os.eventfd_write(self.ready, 1)
        chunks = []
        while chunk := self.sock.recv(1 << 20):
            chunks.append(chunk)
        if self.process.wait(timeout=REPLY_TIMEOUT_S) != 0:
            raise SystemExit(f"ring experiment: the {self.kind} subscriber failed")
        latencies: list[int] = json.loads(b"".join(chunks))
        self.close()
        return latencies

    def close(self) -> None:
        if self.data.closed:
            return
        self.closing = True
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.watchdog.join()  # before the fds it may write to are closed
        self.slots.release()
        self.source.release()
        self.data.close()
        os.close(self.data_fd)
        self.sock.close()
        if self.kind == "eventfd":
            self.control.close()
            for fd in (self.control_fd, self.ready, self.released):
                os.close(fd)


@dataclass
class RingResult:
    placement: str
    kind: str
    one_way_ns: list[int]
    round_trip_ns: list[int]


RING_NAMES = {
    "message": "one message per frame, SOCK_SEQPACKET",
    "eventfd": "index ring in a memfd + eventfd",
}


def placements() -> dict[str, tuple[set[int], set[int]] | None]:
    """Where the publisher and the subscriber run: left to the scheduler, or pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, tuple[set[int], set[int]] | None] = {"scheduler's choice": None}
    out["same CPU"] = ({cpus[0]}, {cpus[0]})
    if len(cpus) > 1:
        out["two CPUs"] = ({cpus[0]}, {cpus[1]})
    return out


def run_ring(reps: int, console: Console) -> list[RingResult]:
    """Both wake-ups, one frame in flight, interleaved frame by frame, in every placement."""
    console.print(
        f"[dim]ring experiment: {reps} frames of {fmt_size(RING_SIZE)} of each variant "
        "in each placement…[/dim]"
    )
    source = Source(RING_SIZE)
    everywhere = os.sched_getaffinity(0)
    out: list[RingResult] = []
    try:
        for placement, pinned in placements().items():
            publisher_cpus, subscriber_cpus = pinned or (everywhere, None)
            os.sched_setaffinity(0, publisher_cpus)
            sides = [RingSide(kind, source, subscriber_cpus) for kind in RING_NAMES]
            try:
                round_trips: dict[str, list[int]] = {side.kind: [] for side in sides}
                shuffle = random.Random(len(placement)).shuffle
                warmup = 50
                for rep in range(warmup + reps):
                    shuffle(sides)
                    for side in sides:
                        with gc_paused():
                            elapsed = side.frame()
                        if rep >= warmup:
                            round_trips[side.kind].append(elapsed)
                for kind in RING_NAMES:
                    side = next(side for side in sides if side.kind == kind)
                    one_way = side.stop()[warmup:]
                    out.append(RingResult(placement, kind, one_way, round_trips[kind]))
            finally:
                for side in sides:
                    side.close()
    finally:
        os.sched_setaffinity(0, everywhere)
        source.close()
    return out


# --------------------------------------------------------------------------- report


def by_key(results: list[Result]) -> dict[tuple[int, int, str], Result]:
    return {(r.size, r.subscribers, r.variant): r for r in results}


def paired(ours: Result, theirs: Result) -> list[float]:
    return [a / b for a, b in zip(ours.frame_ns, theirs.frame_ns, strict=True)]


def streams_table(results: list[Result]) -> Table:
    table = Table(
        title="blobplane streams: frames to other processes, each subscriber reads every byte",
        caption=(
            "fps and GB/s: pipelined throughput rounds (4 frames in flight), median round; "
            "GB/s = frame bytes / time; x ref = time per frame / the in-process reference's "
            "(copy + one read per subscriber); latency: one frame in flight, publish -> "
            "receive per subscriber; round trip: publish -> receive -> read -> release seen "
            "by the publisher; variants interleaved in a new random order each round"
        ),
    )
    for name, justify in (
        ("size", "right"),
        ("subs", "right"),
        ("variant", "left"),
        ("frames/s", "right"),
        ("GB/s", "right"),
        ("x ref", "right"),
        ("latency p50", "right"),
        ("latency p99", "right"),
        ("round trip p50", "right"),
        ("round trip p99", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    keys = by_key(results)
    groups: dict[tuple[int, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.size, r.subscribers), []).append(r)
    for (size, subscribers), group in groups.items():
        ref = keys[(size, subscribers, REFERENCE)]
        for i, r in enumerate(group):
            has_latency = bool(r.round_trip_ns)
            table.add_row(
                fmt_size(size) if i == 0 else "",
                str(subscribers) if i == 0 else "",
                r.variant,
                f"{r.fps:,.0f}" if r.fps >= 100 else f"{r.fps:.1f}",
                f"{r.gbps:.2f}",
                f"{r.median_ns / ref.median_ns:.2f}",
                fmt_time(percentile(r.latency_ns, 50)) if has_latency else "-",
                fmt_time(percentile(r.latency_ns, 99)) if has_latency else "-",
                fmt_time(percentile(r.round_trip_ns, 50)) if has_latency else "-",
                fmt_time(percentile(r.round_trip_ns, 99)) if has_latency else "-",
                style="bold" if r.variant in (STREAMS, STREAMS_SPIN) else "",
                end_section=i == len(group) - 1,
            )
    return table


def burst_table(results: list[Result]) -> Table:
    table = Table(
        title="round trip with frames back to back (a busy stream)",
        caption=(
            "one frame in flight, the next published as soon as every subscriber released "
            f"the last; bursts of {BURST} frames of each variant (after one not counted, which "
            "finds its subscriber asleep), variants interleaved. In the "
            "main table the subscriber has gone to sleep before each frame (other variants run "
            "in between), as for a paced source"
        ),
    )
    for name, justify in (
        ("size", "right"),
        ("subs", "right"),
        ("variant", "left"),
        ("frames", "right"),
        ("round trip p50", "right"),
        ("round trip p99", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in results:
        if r.burst_round_trip_ns:
            table.add_row(
                fmt_size(r.size),
                str(r.subscribers),
                r.variant,
                str(len(r.burst_round_trip_ns)),
                fmt_time(percentile(r.burst_round_trip_ns, 50)),
                fmt_time(percentile(r.burst_round_trip_ns, 99)),
                style="bold" if r.variant in (STREAMS, STREAMS_SPIN) else "",
            )
    return table


@dataclass
class Verdict:
    what: str
    met: bool
    detail: str

    def line(self) -> str:
        mark = "[green]met[/green]" if self.met else "[red]NOT met[/red]"
        return f"{self.what}: {self.detail}  {mark}"


def verdicts(results: list[Result]) -> list[Verdict]:
    keys = by_key(results)
    out: list[Verdict] = []
    sizes = sorted({r.size for r in results})
    for size in sizes:
        ours, ref = keys.get((size, 1, STREAMS)), keys.get((size, 1, REFERENCE))
        if size >= REFERENCE_TARGET_FROM and ours and ref:
            ratios = paired(ours, ref)
            q1, q3 = quartiles(ratios)
            value = statistics.median(ratios)
            out.append(
                Verdict(
                    f"{fmt_size(size)}, 1 subscriber: streams / reference time "
                    f"≤ {REFERENCE_TARGET}x",
                    value <= REFERENCE_TARGET,
                    f"paired median {value:.2f}x (IQR {q1:.2f}-{q3:.2f}; ratio of medians "
                    f"{ours.median_ns / ref.median_ns:.2f}x)",
                )
            )
    for size in sizes:
        if size < ICEORYX_TARGET_FROM:
            continue
        for subscribers in sorted({r.subscribers for r in results}):
            for name in (STREAMS, STREAMS_SPIN):
                ours, theirs = (
                    keys.get((size, subscribers, name)),
                    keys.get((size, subscribers, ICEORYX)),
                )
                if not ours or not theirs:
                    continue
                ratios = paired(ours, theirs)
                value = statistics.median(ratios)
                out.append(
                    Verdict(
                        f"{fmt_size(size)}, {subscribers} subscriber(s): {name} faster than "
                        "iceoryx2",
                        value < 1.0,
                        f"{ours.fps:,.1f} vs {theirs.fps:,.1f} frames/s; paired median time "
                        f"ratio {value:.2f}x",
                    )
                )
    for name in (STREAMS, STREAMS_SPIN):
        ours = keys.get((ROUND_TRIP_SIZE, 1, name))
        if not ours or not ours.round_trip_ns:
            continue
        for how, times in (
            ("paced", ours.round_trip_ns),
            ("back to back", ours.burst_round_trip_ns),
        ):
            if not times:
                continue
            p50, p99 = percentile(times, 50), percentile(times, 99)
            out.append(
                Verdict(
                    f"{fmt_size(ROUND_TRIP_SIZE)} round trip ({how}), 1 subscriber, {name}: "
                    f"p50 ≤ {fmt_time(ROUND_TRIP_P50_NS)}, p99 ≤ {fmt_time(ROUND_TRIP_P99_NS)}",
                    p50 <= ROUND_TRIP_P50_NS and p99 <= ROUND_TRIP_P99_NS,
                    f"p50 {fmt_time(p50)}, p99 {fmt_time(p99)} ({len(times)} frames)",
                )
            )
    return out


def ring_table(ring: list[RingResult]) -> Table:
    table = Table(
        title=f"wake-up experiment: {fmt_size(RING_SIZE)} frames in a shared memfd, raw code",
        caption=(
            "one-way: publish -> the subscriber awake with the frame's slot; round trip: "
            "publish -> read -> release seen by the publisher; one frame in flight, the two "
            "variants interleaved frame by frame; placement: where the two processes run"
        ),
    )
    table.add_column("placement", justify="left")
    table.add_column("variant", justify="left")
    for name in ("frames", "one-way p50", "one-way p99", "round trip p50", "round trip p99"):
        table.add_column(name, justify="right")
    for i, r in enumerate(ring):
        table.add_row(
            r.placement if i % 2 == 0 else "",
            RING_NAMES[r.kind],
            str(len(r.round_trip_ns)),
            fmt_time(percentile(r.one_way_ns, 50)),
            fmt_time(percentile(r.one_way_ns, 99)),
            fmt_time(percentile(r.round_trip_ns, 50)),
            fmt_time(percentile(r.round_trip_ns, 99)),
            end_section=i % 2 == 1,
        )
    return table


def ring_verdicts(ring: list[RingResult]) -> list[str]:
    lines = []
    for placement in dict.fromkeys(r.placement for r in ring):
        kinds = {r.kind: r for r in ring if r.placement == placement}
        message, indexed = kinds["message"], kinds["eventfd"]
        parts = []
        for what, a, b in (
            ("one-way", message.one_way_ns, indexed.one_way_ns),
            ("round trip", message.round_trip_ns, indexed.round_trip_ns),
        ):
            pa, pb = percentile(a, 50), percentile(b, 50)
            parts.append(
                f"{what} p50 message {fmt_time(pa)}, ring {fmt_time(pb)} "
                f"(ring {'-' if pb < pa else '+'}{fmt_time(abs(pb - pa))}, {(pb - pa) / pa:+.0%})"
            )
        lines.append(f"{placement}: " + "; ".join(parts))
    return lines


def to_json(
    results: list[Result], ring: list[RingResult], notes: list[str], seconds: float
) -> dict[str, Any]:
    keys = by_key(results)
    return {
        "environment": environment(),
        "wall_seconds": round(seconds, 1),
        "notes": notes,
        "results": [
            {
                "size": r.size,
                "subscribers": r.subscribers,
                "variant": r.variant,
                "rounds": len(r.frame_ns),
                "frame_ns_median": r.median_ns,
                "frames_per_s": r.fps,
                "gb_per_s": r.gbps,
                "ratio_to_reference": r.median_ns
                / keys[(r.size, r.subscribers, REFERENCE)].median_ns,
                "latency_ns_p50": percentile(r.latency_ns, 50) if r.latency_ns else None,
                "latency_ns_p99": percentile(r.latency_ns, 99) if r.latency_ns else None,
                "round_trip_ns_p50": percentile(r.round_trip_ns, 50) if r.round_trip_ns else None,
                "round_trip_ns_p99": percentile(r.round_trip_ns, 99) if r.round_trip_ns else None,
                "back_to_back_round_trip_ns_p50": (
                    percentile(r.burst_round_trip_ns, 50) if r.burst_round_trip_ns else None
                ),
                "back_to_back_round_trip_ns_p99": (
                    percentile(r.burst_round_trip_ns, 99) if r.burst_round_trip_ns else None
                ),
                "frame_ns": r.frame_ns,
            }
            for r in results
        ],
        "verdicts": [{"what": v.what, "met": v.met, "detail": v.detail} for v in verdicts(results)],
        "ring": [
            {
                "placement": r.placement,
                "variant": RING_NAMES[r.kind],
                "one_way_ns_p50": percentile(r.one_way_ns, 50),
                "one_way_ns_p99": percentile(r.one_way_ns, 99),
                "round_trip_ns_p50": percentile(r.round_trip_ns, 50),
                "round_trip_ns_p99": percentile(r.round_trip_ns, 99),
            }
            for r in ring
        ],
    }


# --------------------------------------------------------------------------- main


def print_results(console: Console, results: list[Result], notes: list[str]) -> None:
    console.print(streams_table(results))
    if any(r.burst_round_trip_ns for r in results):
        console.print(burst_table(results))
    for note in notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    for verdict in verdicts(results):
        console.print(verdict.line())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, few frames: a smoke test"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--experiment",
        choices=["all", "streams", "ring"],
        default="all",
        help="the frame table, the ring-versus-message experiment, or both (default)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        help="comma-separated frame sizes such as 4K,1M (default: 4K,1M,64M,512M)",
    )
    parser.add_argument(
        "--subscribers",
        type=lambda text: [int(part) for part in text.split(",")],
        help="comma-separated subscriber counts (default: 1,4)",
    )
    parser.add_argument("--subscriber", choices=sorted(SUBSCRIBERS), help=argparse.SUPPRESS)
    parser.add_argument("--ring-subscriber", choices=sorted(RING_NAMES), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscriber:
        return subscriber_main(args.subscriber, args.endpoint, args.base, args.index)
    if args.ring_subscriber:
        return ring_subscriber_main(args.ring_subscriber, int(args.endpoint), args.cpus)

    plan = dict(QUICK_PLAN if args.quick else DEFAULT_PLAN)
    if args.sizes:
        fallback = QUICK_PLAN[4 * KIB] if args.quick else step(latency=101, rounds=5, frames=8)
        plan = {size: plan.get(size, fallback) for size in args.sizes}
    counts = args.subscribers or (QUICK_SUBSCRIBERS if args.quick else DEFAULT_SUBSCRIBERS)
    if any(count < 1 for count in counts):
        parser.error("--subscribers must be at least 1")

    console = Console(width=None if sys.stdout.isatty() else 160)
    started = time.perf_counter()
    results: list[Result] = []
    notes: list[str] = []
    ring: list[RingResult] = []
    if args.experiment in ("all", "streams"):
        for size, todo in plan.items():
            for subscribers in counts:
                group, group_notes = run_group(size, subscribers, todo, console)
                results += group
                notes += [note for note in group_notes if note not in notes]
        if ICEORYX_OFFSETS:
            offsets = ", ".join(f"{offset:#x}" for offset in sorted(ICEORYX_OFFSETS))
            notes.append(
                f"{ICEORYX}: its samples' payloads start at page offsets {offsets} "
                "(its own layout; the source is page-aligned as for every variant)"
            )
    if results:
        print_results(console, results, notes)
    if args.experiment in ("all", "ring"):
        ring = run_ring(QUICK_RING_REPS if args.quick else RING_REPS, console)
    if ring:
        console.print(ring_table(ring))
        for line in ring_verdicts(ring):
            console.print(line)
    seconds = time.perf_counter() - started
    console.print(f"[dim]{seconds:.0f} s[/dim]")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results, ring, notes, seconds), out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
