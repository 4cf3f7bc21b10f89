"""Benchmark of the broker: put-then-get latency, throughput and operations per second.

Run it with `make bench` or `.venv/bin/python bench/broker.py [--quick] [--json PATH]
[--no-ray]`. It starts its own broker (`blobplane serve` on a temporary socket).
This process is the producer; every variant has its own consumer, a separate
process started from this file (``--consumer KIND``). Variants, producer side
-> consumer side:

- ``broker, put_bytes`` (default arguments): up to 60 KiB the payload rides
  inside the request and the broker makes the memfd; from 64 KiB up it is
  copied into a slot of the process's automatic pool, put to stay published
  after the producer goes, the slot back through ``SlotFree`` once the key
  is deleted and released -> the same consumer side as below.
- ``broker, put_bytes(sealed=True)``: larger than 60 KiB, a new memfd,
  the payload copied in, sealed against writes, its fd handed to the broker
  (a fresh blob) -> the consumer's
  ``get(key)``, already waiting at the broker, is answered with a read-only fd,
  mapped; the consumer reads and closes it (which releases the reference).
- ``broker, pool slot``: ``broker.loan(pool)``, the payload copied into the
  slot, ``put_pooled(loan, key=...)`` -> the same consumer side, whose client
  maps each slot once and reuses the mapping for later gets of it (as the
  channel's receiver does); the slot comes back through the broker's
  ``SlotFree`` once the key is deleted and released.
- ``broker, pool slot written before the clock`` (info): the same, but the
  producer filled the slot before the clock started, as a producer that
  builds its data in the slot does: what is timed is the handoff alone.
- ``channel, fresh blob``: ``create``, copy, ``seal``, ``send_blob`` over a
  ``SOCK_SEQPACKET`` socketpair -> ``recv_blob`` (no broker).
- ``channel, pool slot``: ``ch.loan(pool)``, copy, ``send_blob(loan)``.
- ``Ray``: ``ray.put(array)`` in this process -> ``ray.get`` in an actor
  (optional: the ``bench-ray`` extra; its rows are skipped with a note when
  ``ray`` does not import, and with ``--quick``).

Every handoff is timed from the moment the producer starts publishing until
the consumer holds the payload and has let it go (mapped, read, closed;
for Ray, ``ray.get`` returned and the array was dropped), on the host's
monotonic clock, which both processes share. Before the clock starts the
consumer is already waiting: its ``get`` is parked at the broker (a key that
is not there yet), ``recv_blob`` blocks on the channel, the Ray actor is
idle. The key is deleted after each handoff, untimed.

- latency: 4 KiB; the consumer checks the first 8 bytes (a per-handoff tag)
  and does not read the rest. p50 and p99.
- throughput: 1 MiB, 64 MiB and 512 MiB; the consumer reads every byte (the
  wrapping uint64 sum of `bench/core.py`, checked against the producer's).
  GB/s = size / median time.
- operations per second: 1, 8 and 64 clients (asyncio clients, spread over two
  processes from 8 on), each doing ``get(key)`` + ``close()`` (the release) in a
  loop on 4 KiB blobs published before the clock; the broker's CPU time per
  request is read from ``/proc``.

Every round runs each variant once, in a new seeded random order; medians.
After each measurement the broker must hold nothing but the blobs published
for the operations runs: no reference, no stray fd. Compare variants within
one run, never across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

import _common
from _common import KIB, MIB, Result, environment, fmt_size, fmt_time, gc_paused
from blobplane import BlobBackend, BlobPool, SharedMemoryBlobs, channel
from blobplane.broker.process import BrokerProcess, start_broker
from blobplane.client import BrokerClient, connect_broker, connect_broker_async

Mode = Literal["latency", "throughput"]

LATENCY_SIZE = 4 * KIB
LATENCY_ROUNDS = 1001
QUICK_LATENCY_ROUNDS = 10
# Rounds per throughput size: the whole default run takes about three minutes here.
DEFAULT_PLAN: dict[int, int] = {1 * MIB: 101, 64 * MIB: 25, 512 * MIB: 9}
QUICK_PLAN: dict[int, int] = {1 * MIB: 3}
OPS_CLIENTS = (1, 8, 64)
OPS_PROCESSES = 2  # clients are spread over this many processes (from 2 clients on)
OPS_SECONDS = 3.0
OPS_ROUNDS = 5
QUICK_OPS_SECONDS = 0.5
QUICK_OPS_ROUNDS = 1
OPS_KEYS = 64

BROKER_AUTO = "broker, put_bytes"
BROKER_FRESH = "broker, put_bytes(sealed=True)"
BROKER_POOLED = "broker, pool slot"
BROKER_IN_PLACE = "broker, pool slot written before the clock (info)"
CHANNEL_FRESH = "channel, fresh blob"
CHANNEL_POOLED = "channel, pool slot"
RAY = "Ray (ray.put -> ray.get in an actor)"

LATENCY_TARGET = 20.0  # Ray's p50 / the broker's p50, 4 KiB
THROUGHPUT_TARGET = 2.0  # the broker's pooled GB/s / Ray's, 64 MiB and 512 MiB
THROUGHPUT_TARGET_FROM = 64 * MIB
OPS_TARGET = 10_000.0  # get + release pairs per second with 64 clients
OPS_TARGET_CLIENTS = 64

REPLY_TIMEOUT_S = 120.0
U64_MASK = (1 << 64) - 1
GO = struct.Struct("<cQ")  # b"L" latency / b"T" throughput, then the handoff's tag
READY = b"R"
STOP = b"S"
REPORT = struct.Struct("<QQQ")  # consumer's clock at the end, the tag it read, its sum


# --------------------------------------------------------------------------- payloads


def sum_words(view: memoryview) -> int:
    """Read every byte: the wrapping uint64 sum of the words (sizes are multiples of 8).

    Defined here rather than imported so that Ray ships it to its actor by value.
    """
    return int(np.frombuffer(view, dtype=np.uint64).sum()) & U64_MASK


def first_word(view: memoryview) -> int:
    return int.from_bytes(view[:8], "little")


class Payload:
    """The producer's bytes (private memory); the first 8 bytes carry each handoff's tag."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.array = np.frombuffer(bytearray(np.random.default_rng(size).bytes(size)), np.uint8)
        self.array[:8] = 0
        self.view = self.array.data
        self._base = sum_words(self.view)

    def tag(self, tag: int) -> None:
        self.array[:8] = np.frombuffer(tag.to_bytes(8, "little"), np.uint8)

    def expected(self, tag: int) -> int:
        return (self._base + tag) & U64_MASK


# --------------------------------------------------------------------------- consumers


def _send_report(ctl: socket.socket, tag: int, checksum: int) -> None:
    ctl.send(REPORT.pack(time.monotonic_ns(), tag, checksum))


def _mode_of(command: bytes) -> tuple[Mode, int]:
    kind, tag = GO.unpack(command)
    return ("latency" if kind == b"L" else "throughput"), tag


def consume_broker(ctl: socket.socket, socket_path: str) -> None:
    """Wait for each handoff's key at the broker (a parked get), map, read, close, report."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ctl.setblocking(False)
        client = await connect_broker_async(socket_path, name="bench-consumer")
        async with client:
            while True:
                command = await loop.sock_recv(ctl, 64)
                if len(command) != GO.size:
                    return
                mode, tag = _mode_of(command)
                # Said on the loop's next turn: the get's first step has sent its request
                # by then. Awaited directly, not as a task: no extra turn once it is answered.
                loop.call_soon(ctl.send, READY)
                mapped = await client.get(key_of(tag), timeout=REPLY_TIMEOUT_S)
                view = mapped.as_slice()
                tag = first_word(view)
                checksum = sum_words(view) if mode == "throughput" else 0
                view.release()
                mapped.close()  # releases the reference
                _send_report(ctl, tag, checksum)
                await asyncio.sleep(0)  # let the release go out

    asyncio.run(main())


def consume_channel(ctl: socket.socket, channel_fd: int) -> None:
    """Block in recv_blob for each handoff; map, read, close (a pool slot's release), report."""
    with channel.from_socket(channel_fd, timeout=REPLY_TIMEOUT_S) as ch:
        while True:
            command = ctl.recv(64)
            if len(command) != GO.size:
                return
            mode, _ = _mode_of(command)
            ctl.send(READY)
            with ch.recv_blob() as mapped:
                view = mapped.as_slice()
                tag = first_word(view)
                checksum = sum_words(view) if mode == "throughput" else 0
                view.release()
            _send_report(ctl, tag, checksum)


def key_of(tag: int) -> str:
    return f"bench-{tag}"


# --------------------------------------------------------------------------- ops workers


def ops_worker(ctl: socket.socket, socket_path: str) -> None:
    """Run the clients the producer asks for; answer with their count and this process's CPU."""

    async def run(keys: list[str], start_ns: int, seconds: float) -> dict[str, float]:
        clients = [
            await connect_broker_async(socket_path, name=f"bench-ops-{index}")
            for index in range(len(keys))
        ]
        counts = [0] * len(keys)
        stop_ns = start_ns + int(seconds * 1e9)

        async def loop(index: int) -> None:
            client, key, done = clients[index], keys[index], 0
            while time.monotonic_ns() < stop_ns:
                mapped = await client.get(key)
                mapped.close()
                done += 1
            counts[index] = done

        try:
            await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
            before = resource.getrusage(resource.RUSAGE_SELF)
            began = time.monotonic_ns()
            await asyncio.gather(*(loop(index) for index in range(len(keys))))
            ended = time.monotonic_ns()
            after = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            for client in clients:
                await client.aclose()
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return {"ops": sum(counts), "began": began, "ended": ended, "cpu": cpu}

    while True:
        command = ctl.recv(1 << 16)
        if not command or command == STOP:
            return
        order = json.loads(command)
        result = asyncio.run(run(order["keys"], order["start_ns"], order["seconds"]))
        ctl.send(json.dumps(result).encode())


def consumer_main(kind: str, ctl_fd: int, endpoint: str) -> int:
    if kind != "ops":
        gc.disable()  # as the producer's timed regions; the broker's leak check still applies
    ctl = socket.socket(fileno=ctl_fd)
    with ctl:
        if kind == "broker":
            consume_broker(ctl, endpoint)
        elif kind == "channel":
            consume_channel(ctl, int(endpoint))
        else:
            ops_worker(ctl, endpoint)
    return 0


def spawn(kind: str, endpoint: str, pass_fd: int | None = None) -> tuple[Any, socket.socket]:
    """A consumer process of *kind* and our end of its control socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        fds = (theirs.fileno(),) if pass_fd is None else (theirs.fileno(), pass_fd)
        command = [sys.executable, str(Path(__file__).resolve()), "--consumer", kind]
        command += ["--ctl", str(theirs.fileno()), "--endpoint", endpoint]
        process = subprocess.Popen(command, pass_fds=fds)
    ours.settimeout(REPLY_TIMEOUT_S)
    return process, ours


# --------------------------------------------------------------------------- producers


class Variant:
    """The producer side of one way to hand a payload over, with its consumer process."""

    name: str

    def __init__(self) -> None:
        self.process: Any = None
        self.ctl: socket.socket | None = None

    def start(self, socket_path: str) -> None:
        raise NotImplementedError

    def prepare(self, size: int) -> None:
        """Before the first round at *size* (pools are made here)."""

    def handoff(self, payload: Payload, tag: int, mode: Mode) -> tuple[int, int, int]:
        """One timed handoff: (ns from the start until the consumer let go, tag read, sum)."""
        assert self.ctl is not None
        self.ctl.send(GO.pack(b"L" if mode == "latency" else b"T", tag))
        if self.ctl.recv(64) != READY:
            raise SystemExit(f"{self.name}: the consumer did not get ready")
        payload.tag(tag)
        before = self.before_clock(payload, tag)
        start = time.monotonic_ns()
        self.publish(payload, tag, before)
        end, seen, checksum = REPORT.unpack(self.ctl.recv(64))
        self.after(tag)
        return end - start, seen, checksum

    def before_clock(self, payload: Payload, tag: int) -> Any:
        return None

    def publish(self, payload: Payload, tag: int, before: Any) -> None:
        raise NotImplementedError

    def after(self, tag: int) -> None:
        """Untimed clean-up once the consumer reported."""

    def finish(self) -> None:
        """After the last round at a size (pools are closed here)."""

    def stop(self) -> None:
        if self.ctl is not None:
            self.ctl.send(STOP)
            self.ctl.close()
        if self.process is not None and self.process.wait(timeout=60) != 0:
            raise SystemExit(f"{self.name}: the consumer exited with {self.process.returncode}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class BrokerVariant(Variant):
    def start(self, socket_path: str) -> None:
        self.client: BrokerClient = connect_broker(
            socket_path, timeout=REPLY_TIMEOUT_S, name="bench-producer"
        )
        self.process, self.ctl = spawn("broker", socket_path)

    def after(self, tag: int) -> None:
        self.client.delete(key_of(tag))

    def stop(self) -> None:
        super().stop()
        self.client.close()


class BrokerAuto(BrokerVariant):
    name = BROKER_AUTO

    def publish(self, payload: Payload, tag: int, before: Any) -> None:
        self.client.put_bytes(payload.view, key=key_of(tag))

    def finish(self) -> None:
        self.client.pump()  # the last slots' SlotFree


class BrokerFresh(BrokerVariant):
    name = BROKER_FRESH

    def publish(self, payload: Payload, tag: int, before: Any) -> None:
        self.client.put_bytes(payload.view, key=key_of(tag), sealed=True)


class BrokerPooled(BrokerVariant):
    name = BROKER_POOLED
    pool: BlobPool | None = None

    def prepare(self, size: int) -> None:
        self.pool = BlobPool(size, 2)

    def publish(self, payload: Payload, tag: int, before: Any) -> None:
        assert self.pool is not None
        with self.client.loan(self.pool, timeout=REPLY_TIMEOUT_S) as loan:
            loan.write_all(payload.view)
            self.client.put_pooled(loan, key=key_of(tag))

    def finish(self) -> None:
        self.client.pump()  # the last slots' SlotFree
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class BrokerInPlace(BrokerPooled):
    name = BROKER_IN_PLACE

    def before_clock(self, payload: Payload, tag: int) -> Any:
        assert self.pool is not None
        loan = self.client.loan(self.pool, timeout=REPLY_TIMEOUT_S)
        loan.write_all(payload.view)
        return loan

    def publish(self, payload: Payload, tag: int, before: Any) -> None:
        with before as loan:
            self.client.put_pooled(loan, key=key_of(tag))


class ChannelVariant(Variant):
    def start(self, socket_path: str) -> None:
        self.blobs = SharedMemoryBlobs(BlobBackend.MEMFD)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.ch = channel.from_socket(ours, timeout=REPLY_TIMEOUT_S)
            self.process, self.ctl = spawn("channel", str(theirs.fileno()), theirs.fileno())

    def stop(self) -> None:
        super().stop()
        self.ch.close()
        self.blobs.close()


class ChannelFresh(ChannelVariant):
    name = CHANNEL_FRESH

    def publish(self, payload: Payload, tag: int, before: Any) -> None:
        with self.blobs.create(payload.size) as blob:
            blob.write_all(payload.view)
            blob.seal()
            self.ch.send_blob(blob)


class ChannelPooled(ChannelVariant):
    name = CHANNEL_POOLED
    pool: BlobPool | None = None

    def prepare(self, size: int) -> None:
        self.pool = BlobPool(size, 2)

    def publish(self, payload: Payload, tag: int, before: Any) -> None:
        assert self.pool is not None
        with self.ch.loan(self.pool) as loan:
            loan.write_all(payload.view)
            self.ch.send_blob(loan, wait=False)  # acknowledged when the consumer releases it

    def finish(self) -> None:
        assert self.pool is not None
        # Take every slot back: once none is free, loan() waits for the consumer's releases.
        loans = [self.ch.loan(self.pool) for _ in range(self.pool.slots)]
        for loan in loans:
            loan.close()
        self.pool.close()
        self.pool = None


class RayVariant(Variant):
    name = RAY

    def start(self, socket_path: str) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

        @ray.remote
        class Consumer:
            def take(self, refs: list[Any], throughput: bool) -> tuple[int, int, int]:
                array = ray.get(refs[0])
                view = memoryview(array)
                tag = first_word(view)
                checksum = sum_words(view) if throughput else 0
                view.release()
                del array
                return time.monotonic_ns(), tag, checksum

        self.actor = Consumer.remote()  # type: ignore[attr-defined]
        self.ray.get(self.actor.take.remote([ray.put(np.zeros(8, np.uint8))], True))

    def handoff(self, payload: Payload, tag: int, mode: Mode) -> tuple[int, int, int]:
        payload.tag(tag)
        start = time.monotonic_ns()
        ref = self.ray.put(payload.array)
        result = self.actor.take.remote([ref], mode == "throughput")
        end, seen, checksum = self.ray.get(result)
        del ref
        return int(end) - start, int(seen), int(checksum)

    def stop(self) -> None:
        self.ray.shutdown()


# --------------------------------------------------------------------------- measuring


class Broker:
    """The broker process under test and a watcher connection for its stats."""

    def __init__(self, folder: str) -> None:
        self.handle: BrokerProcess = start_broker(os.path.join(folder, "broker.sock"))
        self.socket_path = self.handle.socket_path
        self.watcher = connect_broker(self.socket_path, name="bench-watcher")
        self.idle_fds = self.fds()  # the listener, the watcher's connection, the log...

    @property
    def pid(self) -> int:
        return self.handle.process.pid

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_for_clients(self, clients: int) -> None:
        deadline = time.monotonic() + 30
        while self.watcher.stats().clients != clients:
            if time.monotonic() > deadline:
                raise SystemExit(f"the broker did not see {clients} clients connect")
            time.sleep(0.02)

    def check_idle(self, blobs: int, fds: int, clients: int, what: str) -> None:
        """Nothing of *what* may be left at the broker (waiting for its clients to go first)."""
        deadline = time.monotonic() + 20
        while True:
            stats = self.watcher.stats()
            now = (stats.clients, stats.blobs, stats.references, self.fds())
            if now == (clients, blobs, 0, fds):
                return
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"after {what} the broker holds (clients, blobs, references, fds) {now}, "
                    f"expected {(clients, blobs, 0, fds)}: something leaked"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self.watcher.close()
        status = self.handle.stop()
        if status != 0:
            raise SystemExit(f"the broker exited with status {status}")


def measure(
    phase: Mode, size: int, rounds: int, variants: list[Variant], seed: int
) -> list[Result]:
    payload = Payload(size)
    for variant in variants:
        variant.prepare(size)
    results = [Result(phase, size, variant.name) for variant in variants]
    warmup = max(1, min(10, rounds // 10))
    shuffle = random.Random(seed + size).shuffle
    tag = 0
    try:
        for round_no in range(warmup + rounds):
            order = list(range(len(variants)))
            shuffle(order)
            for index in order:
                tag += 1
                variant = variants[index]
                with gc_paused():
                    elapsed, seen, checksum = variant.handoff(payload, tag, phase)
                wrong = seen != tag or (phase == "throughput" and checksum != payload.expected(tag))
                if wrong:
                    raise SystemExit(f"{variant.name} at {fmt_size(size)} read back wrong data")
                if round_no >= warmup:
                    results[index].samples_ns.append(elapsed)
            gc.collect()
    finally:
        for variant in variants:
            variant.finish()
    return results


@dataclass
class OpsResult:
    clients: int
    processes: int
    rates: list[float] = field(default_factory=list)
    broker_us: list[float] = field(default_factory=list)  # broker CPU per request
    client_us: list[float] = field(default_factory=list)  # clients' CPU per get+release

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def measure_ops(broker: Broker, rounds: int, seconds: float, seed: int) -> list[OpsResult]:
    """Get + release pairs per second with 1, 8 and 64 clients, interleaved rounds."""
    workers = [spawn("ops", broker.socket_path) for _ in range(OPS_PROCESSES)]
    keys = [f"ops-{index}" for index in range(OPS_KEYS)]
    for key in keys:
        broker.watcher.put_bytes(bytes(LATENCY_SIZE), key=key)
    results = {
        clients: OpsResult(clients, 1 if clients == 1 else OPS_PROCESSES) for clients in OPS_CLIENTS
    }
    shuffle = random.Random(seed).shuffle
    try:
        for _ in range(rounds):
            order = list(OPS_CLIENTS)
            shuffle(order)
            for clients in order:
                result = results[clients]
                per = [clients // result.processes] * result.processes
                per[0] += clients - sum(per)
                start_ns = time.monotonic_ns() + int(0.3e9 + 0.02e9 * clients)
                assigned = 0
                for (_, ctl), count in zip(workers, per, strict=False):
                    order_keys = [keys[(assigned + i) % OPS_KEYS] for i in range(count)]
                    assigned += count
                    command = {"keys": order_keys, "start_ns": start_ns, "seconds": seconds}
                    ctl.send(json.dumps(command).encode())
                cpu_before: float | None = None
                while time.monotonic_ns() < start_ns:
                    time.sleep(min(0.01, max(0.0, (start_ns - time.monotonic_ns()) / 1e9)))
                cpu_before = broker.cpu_seconds()
                replies = [
                    json.loads(ctl.recv(1 << 16)) for (_, ctl), _ in zip(workers, per, strict=False)
                ]
                cpu_after = broker.cpu_seconds()
                ops = sum(int(reply["ops"]) for reply in replies)
                span = (max(r["ended"] for r in replies) - min(r["began"] for r in replies)) / 1e9
                result.rates.append(ops / span)
                result.broker_us.append((cpu_after - cpu_before) / (2 * ops) * 1e6)
                result.client_us.append(sum(r["cpu"] for r in replies) / ops * 1e6)
    finally:
        for process, ctl in workers:
            ctl.send(STOP)
            ctl.close()
            process.wait(timeout=60)
        for key in keys:
            broker.watcher.delete(key)
    return list(results.values())


# --------------------------------------------------------------------------- report


def _ray_of(results: list[Result], r: Result) -> Result | None:
    return next(
        (x for x in results if (x.phase, x.size, x.variant) == (r.phase, r.size, RAY)), None
    )


def latency_table(results: list[Result]) -> Table:
    def to_ray(r: Result) -> tuple[str, str]:
        ray = _ray_of(results, r)
        if ray is None:
            return "-", "-"
        return f"{ray.median_ns / r.median_ns:.1f}", f"{ray.p99_ns / r.p99_ns:.1f}"

    return _common.latency_table(
        [r for r in results if r.phase == "latency"],
        title=f"broker: put-then-get latency, {fmt_size(LATENCY_SIZE)} (publish until the "
        "consumer, another process, has mapped and released it)",
        caption=(
            "the consumer waits before the clock starts (a get parked at the broker, "
            "recv_blob, an idle Ray actor); timed on the shared monotonic clock from the "
            "first call of the publish to the consumer's close; variants interleaved; "
            "x Ray = Ray's percentile / this variant's (> 1: faster than Ray)"
        ),
        ratios=("x Ray p50", "x Ray p99"),
        ratio_cells=to_ray,
    )


def throughput_table(results: list[Result]) -> Table:
    def to_ray(r: Result) -> str:
        ray = _ray_of(results, r)
        return "-" if ray is None else f"{r.gbps / ray.gbps:.2f}"

    return _common.throughput_table(
        results,
        title="broker: throughput, one handoff at a time, the consumer (another process) "
        "reads every byte",
        caption=(
            "publish (the payload copied from the producer's memory into a fresh blob or a "
            "pool slot; for Ray, ray.put) until the consumer has read every byte and "
            "released it; (info): the slot filled before the clock, as by a producer that "
            "builds its data in place; median of the runs, variants interleaved in a new "
            "random order each round; IQR = 25th-75th percentile; GB/s = size / median (10^9 B/s); "
            "x Ray = this variant's GB/s / Ray's"
        ),
        ratio="x Ray",
        ratio_cell=to_ray,
    )


def ops_table(results: list[OpsResult], seconds: float) -> Table:
    table = Table(
        title="broker: get + release pairs per second, 4 KiB blobs published beforehand",
        caption=(
            f"each client (an asyncio client, its own connection) loops get(key) + close() "
            f"for {seconds:g} s; clients spread over the processes; median of the rounds, "
            "configurations interleaved; CPU per request = the broker's user + system time "
            "over the run / (2 x pairs); client CPU = the client processes' time per pair"
        ),
    )
    for name in (
        "clients",
        "processes",
        "runs",
        "pairs/s",
        "range",
        "broker CPU / request",
        "client CPU / pair",
    ):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            str(r.clients),
            str(r.processes),
            str(len(r.rates)),
            f"{r.rate:,.0f}",
            f"{min(r.rates):,.0f}-{max(r.rates):,.0f}",
            f"{statistics.median(r.broker_us):.1f} µs",
            f"{statistics.median(r.client_us):.1f} µs",
        )
    return table


@dataclass
class Verdict:
    what: str
    target: str
    value: float | None
    met: bool | None
    detail: str

    def line(self) -> str:
        if self.met is None:
            return f"{self.what}: {self.detail}  target {self.target}: not judged"
        verdict = "met" if self.met else "NOT met"
        return f"{self.what}: {self.detail}  target {self.target} {verdict}"


def _find(results: list[Result], phase: Mode, size: int, variant: str) -> Result | None:
    return next(
        (r for r in results if (r.phase, r.size, r.variant) == (phase, size, variant)), None
    )


def verdicts(results: list[Result], ops: list[OpsResult]) -> list[Verdict]:
    out: list[Verdict] = []
    ray = _find(results, "latency", LATENCY_SIZE, RAY)
    for variant in (BROKER_FRESH, BROKER_AUTO, BROKER_POOLED):
        ours = _find(results, "latency", LATENCY_SIZE, variant)
        if ours is None:
            continue
        what = f"{fmt_size(LATENCY_SIZE)} put-then-get, {variant}, Ray p50 / ours"
        if ray is None:
            out.append(Verdict(what, f">= {LATENCY_TARGET:g}x", None, None, "no Ray rows"))
            continue
        ratio = ray.median_ns / ours.median_ns
        detail = f"{ratio:.1f}x ({fmt_time(ray.median_ns)} / {fmt_time(ours.median_ns)})"
        out.append(Verdict(what, f">= {LATENCY_TARGET:g}x", ratio, ratio >= LATENCY_TARGET, detail))
    sizes = sorted({r.size for r in results if r.phase == "throughput"})
    for size, variant in itertools.product(sizes, (BROKER_AUTO, BROKER_POOLED)):
        if size < THROUGHPUT_TARGET_FROM:
            continue
        ours = _find(results, "throughput", size, variant)
        ray = _find(results, "throughput", size, RAY)
        if ours is None:
            continue
        what = f"{fmt_size(size)} throughput, {variant} / Ray"
        if ray is None:
            detail = f"{ours.gbps:.2f} GB/s, no Ray rows"
            out.append(Verdict(what, f">= {THROUGHPUT_TARGET:g}x", None, None, detail))
            continue
        ratio = ours.gbps / ray.gbps
        detail = f"{ratio:.2f}x ({ours.gbps:.2f} / {ray.gbps:.2f} GB/s)"
        in_place = _find(results, "throughput", size, BROKER_IN_PLACE)
        if in_place is not None and variant == BROKER_POOLED:
            detail += f"; written before the clock {in_place.gbps / ray.gbps:.2f}x"
        met = ratio >= THROUGHPUT_TARGET
        out.append(Verdict(what, f">= {THROUGHPUT_TARGET:g}x", ratio, met, detail))
    for r in ops:
        if r.clients != OPS_TARGET_CLIENTS:
            continue
        detail = f"{r.rate:,.0f} pairs/s (runs {', '.join(f'{x:,.0f}' for x in r.rates)})"
        what = f"{r.clients} clients, get + release pairs per second"
        out.append(Verdict(what, f">= {OPS_TARGET:,.0f}", r.rate, r.rate >= OPS_TARGET, detail))
    return out


def to_json(
    results: list[Result], ops: list[OpsResult], notes: list[str], seconds: float
) -> dict[str, Any]:
    return {
        "environment": environment(),
        "wall_seconds": round(seconds, 1),
        "notes": notes,
        "results": [r.to_json() for r in results],
        "operations": [
            {
                "clients": r.clients,
                "processes": r.processes,
                "pairs_per_s": r.rates,
                "median_pairs_per_s": r.rate,
                "broker_cpu_us_per_request": r.broker_us,
                "client_cpu_us_per_pair": r.client_us,
            }
            for r in ops
        ],
        "verdicts": [
            {"what": v.what, "target": v.target, "value": v.value, "met": v.met}
            for v in verdicts(results, ops)
        ],
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs, no Ray")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray out even if installed")
    parser.add_argument("--consumer", choices=["broker", "channel", "ops"], help=argparse.SUPPRESS)
    parser.add_argument("--ctl", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consumer:
        return args
    args.plan = dict(QUICK_PLAN if args.quick else DEFAULT_PLAN)
    args.latency_rounds = QUICK_LATENCY_ROUNDS if args.quick else LATENCY_ROUNDS
    args.ops_seconds = QUICK_OPS_SECONDS if args.quick else OPS_SECONDS
    args.ops_rounds = QUICK_OPS_ROUNDS if args.quick else OPS_ROUNDS
    args.ray = not (args.quick or args.no_ray)
    return args


def start_variants(socket_path: str, use_ray: bool, notes: list[str]) -> list[Variant]:
    classes: list[type[Variant]] = [
        BrokerFresh,
        BrokerAuto,
        BrokerPooled,
        BrokerInPlace,
        ChannelFresh,
        ChannelPooled,
    ]
    if use_ray:
        classes.append(RayVariant)
    else:
        notes.append(f"{RAY}: left out (--quick or --no-ray)")
    variants: list[Variant] = []
    try:
        for cls in classes:
            variant = cls()
            try:
                variant.start(socket_path)
            except ImportError as exc:
                notes.append(
                    f"{RAY}: skipped, ray does not import ({exc}); pip install '.[bench-ray]'"
                )
                continue
            variants.append(variant)
    except BaseException:
        for variant in variants:
            variant.kill()
        raise
    return variants


def run(
    args: argparse.Namespace, broker: Broker, console: Console, notes: list[str]
) -> tuple[list[Result], list[OpsResult]]:
    results: list[Result] = []
    console.print("[dim]starting the consumers (and Ray)…[/dim]")
    variants = start_variants(broker.socket_path, args.ray, notes)
    # The watcher, and a producer and a consumer connection per broker variant.
    clients = 1 + 2 * sum(isinstance(variant, BrokerVariant) for variant in variants)
    broker.wait_for_clients(clients)
    baseline_fds = broker.fds()
    try:
        console.print(
            f"[dim]put-then-get latency at {fmt_size(LATENCY_SIZE)}: {args.latency_rounds} "
            "runs of each variant…[/dim]"
        )
        results += measure("latency", LATENCY_SIZE, args.latency_rounds, variants, seed=1)
        broker.check_idle(0, baseline_fds, clients, "the latency runs")
        for size, rounds in args.plan.items():
            console.print(
                f"[dim]throughput at {fmt_size(size)}: {rounds} runs of each variant…[/dim]"
            )
            results += measure("throughput", size, rounds, variants, seed=2)
            broker.check_idle(0, baseline_fds, clients, f"the {fmt_size(size)} runs")
    finally:
        for variant in variants:
            try:
                variant.stop()
            finally:
                variant.kill()
    console.print(
        f"[dim]get + release pairs per second with {', '.join(map(str, OPS_CLIENTS))} clients: "
        f"{args.ops_rounds} runs of {args.ops_seconds:g} s each…[/dim]"
    )
    ops = measure_ops(broker, args.ops_rounds, args.ops_seconds, seed=3)
    broker.check_idle(0, broker.idle_fds, 1, "the operations runs")
    return results, ops


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.consumer:
        return consumer_main(args.consumer, args.ctl, args.endpoint)
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = time.perf_counter()
    notes: list[str] = []
    folder = tempfile.mkdtemp(prefix="bp-bench-")
    try:
        broker = Broker(folder)
        try:
            results, ops = run(args, broker, console, notes)
        finally:
            broker.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    console.print(latency_table(results))
    console.print(throughput_table(results))
    console.print(ops_table(ops, args.ops_seconds))
    for note in notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    for verdict in verdicts(results, ops):
        console.print(verdict.line())
    seconds = time.perf_counter() - started
    console.print(f"[dim]{seconds:.0f} s[/dim]")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results, ops, notes, seconds), out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
