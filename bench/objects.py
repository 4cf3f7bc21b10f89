"""Python objects from one process to another, summed there: blobplane objects against the rest.

Every run sends one object to a receiver process that rebuilds it, sums it
(every byte read) and replies with the sum; the time is from the send until
that reply. Variants, interleaved in a new random order each round:

- raw bytes, blobplane channel: the array's bytes in a fresh sealed blob
  (the reference for the pickling overhead: same transport, no pickle)
- blobplane objects, default (`send_obj`: in a slot of the channel's AutoPool)
- blobplane objects, sealed=True (`send_obj(sealed=True)`: a fresh sealed blob)
- blobplane objects, own pool slot (`send_obj(pool=...)`)
- blobplane broker, put_object (default arguments: in a slot of the client's
  AutoPool) -> get_object in a receiver process whose get already waits at
  the broker; the key is deleted after the reply, as a user's loop would
- multiprocessing.Queue (pickle through a pipe)
- Ray (`ray.put` in the driver, `ray.get` in an actor), if `ray` imports

Run: .venv/bin/python bench/objects.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from _common import environment
from blobplane import BlobPool, SharedMemoryBlobs, channel
from blobplane.broker.process import start_broker
from blobplane.client import connect_broker
from blobplane.objects import recv_obj, send_obj
from blobplane.types import BlobBackend
from blobplane.wire import UserPayload

MIB = 1 << 20
RAW = "raw bytes, blobplane channel"
AUTO = "blobplane objects, default (auto pool)"
SEALED = "blobplane objects, sealed=True (fresh blob)"
POOLED = "blobplane objects, own pool slot"
BROKER = "blobplane broker, put_object -> get_object"


def total(obj: Any) -> float:
    """Sum every number in the payload (reads every byte of it)."""
    if isinstance(obj, pd.DataFrame):
        return float(sum(obj[column].to_numpy().sum() for column in obj.columns))
    return float(np.asarray(obj).sum())


def make_payload(name: str) -> Any:
    if name == "DataFrame 10M rows":
        rows = 10_000_000
        return pd.DataFrame(
            {"x": np.arange(rows, dtype=np.int64), "y": np.ones(rows, dtype=np.float64)}
        )
    size = {"1 MiB": MIB, "64 MiB": 64 * MIB, "512 MiB": 512 * MIB}[name]
    return np.ones(size // 8, dtype=np.float64)


def nbytes(obj: Any) -> int:
    if isinstance(obj, pd.DataFrame):
        return int(obj.memory_usage(index=False).sum())
    return int(obj.nbytes)


# -- receivers (child processes) ---------------------------------------------------------


def _channel_receiver(path: str, mode: str) -> None:
    with channel.connect(path, timeout=120) as ch:
        while True:
            message, _ = ch.recv(timeout=None)
            assert isinstance(message, UserPayload)
            if message.data == b"stop":
                return
            if mode == "raw":
                with ch.recv_blob(timeout=120) as mapped, mapped.as_slice() as view:
                    result = float(np.frombuffer(view, dtype=np.float64).sum())
            else:
                obj = recv_obj(ch, timeout=120)
                result = total(obj)
                del obj
            ch.send(UserPayload(data=json.dumps(result).encode()))


def _broker_receiver(socket_path: str, replies: Any) -> None:
    with connect_broker(socket_path, timeout=300) as client:
        for number in range(1_000_000):
            key = f"object-{number}"
            obj = client.get_object(key, timeout=300)  # waits for the key to be published
            if isinstance(obj, str) and obj == "stop":
                return
            replies.send(total(obj))
            del obj


def _queue_receiver(inbox: Any, outbox: Any) -> None:
    while True:
        obj = inbox.get()
        if obj is None:
            return
        outbox.put(total(obj))
        del obj


# -- senders ---------------------------------------------------------------------------


@dataclass
class ChannelVariant:
    mode: str  # raw | auto | sealed | pooled
    path: str
    process: Any = None
    ch: Any = None
    pool: BlobPool | None = None
    blobs: SharedMemoryBlobs = field(default_factory=lambda: SharedMemoryBlobs(BlobBackend.MEMFD))

    def start(self, listener: channel.Listener, slot_size: int) -> None:
        self.process = mp.get_context("spawn").Process(
            target=_channel_receiver, args=(self.path, self.mode)
        )
        self.process.start()
        self.ch = listener.accept(timeout=120)
        if self.mode == "pooled":
            self.pool = BlobPool(slot_size, 2)

    def send(self, obj: Any) -> float:
        self.ch.send(b"go")
        if self.mode == "raw":
            with self.blobs.create(obj.nbytes) as blob:
                blob.write_all(obj)
                blob.seal()
                self.ch.send_blob(blob, timeout=120)
        else:
            send_obj(self.ch, obj, pool=self.pool, sealed=self.mode == "sealed", timeout=120)
        while True:
            message, _ = self.ch.recv(timeout=120)
            if isinstance(message, UserPayload):
                return float(json.loads(message.data))

    def stop(self) -> None:
        self.ch.send(b"stop")
        self.process.join(60)
        self.ch.close()
        if self.pool is not None:
            self.pool.close()
        self.blobs.close()


class BrokerVariant:
    """`put_object` to a broker, `get_object` in another process, the key deleted after."""

    def __init__(self, folder: str) -> None:
        self.broker = start_broker(os.path.join(folder, "broker.sock"))
        self.client = connect_broker(self.broker.socket_path, timeout=300)
        self.replies, theirs = mp.get_context("spawn").Pipe(duplex=False)
        self.process = mp.get_context("spawn").Process(
            target=_broker_receiver, args=(self.broker.socket_path, theirs)
        )
        self.process.start()
        theirs.close()
        self.number = 0

    def send(self, obj: Any) -> float:
        key = f"object-{self.number}"
        self.number += 1
        self.client.put_object(obj, key=key)
        result = float(self.replies.recv())
        self.client.delete(key)
        return result

    def stop(self) -> None:
        self.client.put_object("stop", key=f"object-{self.number}")
        self.process.join(60)
        self.client.close()
        self.broker.stop()


@dataclass
class QueueVariant:
    inbox: Any = None
    outbox: Any = None
    process: Any = None

    def start(self) -> None:
        context = mp.get_context("spawn")
        self.inbox, self.outbox = context.Queue(), context.Queue()
        self.process = context.Process(target=_queue_receiver, args=(self.inbox, self.outbox))
        self.process.start()

    def send(self, obj: Any) -> float:
        self.inbox.put(obj)
        return float(self.outbox.get(timeout=300))

    def stop(self) -> None:
        self.inbox.put(None)
        self.process.join(60)


class RayVariant:
    def __init__(self) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

        @ray.remote
        class Summer:
            def total(self, refs: list[Any]) -> float:
                return total(ray.get(refs[0]))

        self.actor = Summer.remote()  # type: ignore[attr-defined]

    def send(self, obj: Any) -> float:
        ref = self.ray.put(obj)
        return float(self.ray.get(self.actor.total.remote([ref])))

    def stop(self) -> None:
        self.ray.shutdown()


# -- the run -------------------------------------------------------------------------------


def run(payload_names: list[str], rounds: int, use_ray: bool) -> dict[str, dict[str, list[float]]]:
    # The channels' sockets live here, and go with it.
    with tempfile.TemporaryDirectory(prefix="blobplane-bench-objects-") as folder:
        return _run_in(folder, payload_names, rounds, use_ray)


def _run_in(
    folder: str, payload_names: list[str], rounds: int, use_ray: bool
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    ray_variant = None
    if use_ray:
        try:
            ray_variant = RayVariant()
        except Exception as exc:  # ray missing or refusing to start: say so, go on
            print(f"ray unavailable, skipped: {exc}", file=sys.stderr)
    try:
        for name in payload_names:
            obj = make_payload(name)
            expected = total(obj)
            slot_size = nbytes(obj) + 4 * MIB
            senders: dict[str, Callable[[Any], float]] = {}
            stops: list[Callable[[], None]] = []
            modes = [
                ("auto", AUTO),
                ("sealed", SEALED),
                ("pooled", POOLED),
            ]
            if isinstance(obj, np.ndarray):  # raw bytes are the reference for arrays only
                modes.insert(0, ("raw", RAW))
            for mode, label in modes:
                path = os.path.join(folder, f"{name.replace(' ', '_')}-{mode}.sock")
                listener = channel.listen(path, timeout=120)
                variant = ChannelVariant(mode, path)
                variant.start(listener, slot_size)
                listener.close()
                senders[label] = variant.send
                stops.append(variant.stop)
            broker = BrokerVariant(folder)
            senders[BROKER] = broker.send
            stops.append(broker.stop)
            queue = QueueVariant()
            queue.start()
            senders["multiprocessing.Queue"] = queue.send
            stops.append(queue.stop)
            if ray_variant is not None:
                senders["Ray put/get"] = ray_variant.send
            try:
                results[name] = _rounds(senders, obj, expected, rounds)
            finally:
                for stop in stops:
                    stop()
            del obj
    finally:
        if ray_variant is not None:
            ray_variant.stop()
    return results


def _rounds(
    senders: dict[str, Callable[[Any], float]], obj: Any, expected: float, rounds: int
) -> dict[str, list[float]]:
    """Each sender's times for *obj*, in a new random order each round; round 0 warms up."""
    timings: dict[str, list[float]] = {label: [] for label in senders}
    for round_number in range(rounds + 1):
        order = list(senders)
        random.shuffle(order)
        for label in order:
            started = time.perf_counter()
            got = senders[label](obj)
            elapsed = time.perf_counter() - started
            if got != expected:
                raise SystemExit(f"{label} summed {got}, expected {expected}")
            if round_number:
                timings[label].append(elapsed)
    return timings


def report(results: dict[str, dict[str, list[float]]], console: Console) -> None:
    table = Table(title="one object sent to another process and summed there (median)")
    for column in ("payload", "variant", "runs", "median", "GB/s", "x Queue", "x Ray"):
        table.add_column(column, justify="left" if column in ("payload", "variant") else "right")
    for name, timings in results.items():
        size = nbytes(make_payload(name))
        medians = {label: statistics.median(values) for label, values in timings.items()}
        queue = medians.get("multiprocessing.Queue")
        ray = medians.get("Ray put/get")
        for row, (label, median) in enumerate(medians.items()):
            table.add_row(
                name if row == 0 else "",
                label,
                str(len(timings[label])),
                f"{median * 1e3:.1f} ms",
                f"{size / median / 1e9:.2f}",
                f"{queue / median:.2f}" if queue else "-",
                f"{ray / median:.2f}" if ray else "-",
            )
    console.print(table)
    for name, timings in results.items():
        if RAW not in timings:
            continue
        raw = statistics.median(timings[RAW])
        fresh = statistics.median(timings[SEALED])
        console.print(f"{name}: pickling overhead over raw bytes {100 * (fresh / raw - 1):+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small payloads, 2 rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--no-ray", action="store_true", help="skip Ray even if installed")
    args = parser.parse_args()
    if args.quick:
        names, rounds = ["1 MiB", "64 MiB"], 2
    else:
        names, rounds = ["1 MiB", "64 MiB", "512 MiB", "DataFrame 10M rows"], 5
    started = time.monotonic()
    results = run(names, rounds, use_ray=not args.no_ray and not args.quick)
    report(results, Console(width=120))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results, time.monotonic() - started), out, indent=2)


def to_json(results: dict[str, dict[str, list[float]]], seconds: float) -> dict[str, Any]:
    """The runs as the other benchmarks write them: the machine, then one row per variant."""
    rows = []
    for name, timings in results.items():
        size = nbytes(make_payload(name))
        for label, values in timings.items():
            rows.append(
                {
                    "payload": name,
                    "size": size,
                    "variant": label,
                    "runs": len(values),
                    "median_ns": statistics.median(values) * 1e9,
                    "samples_ns": [round(value * 1e9) for value in values],
                }
            )
    return {"environment": environment(), "wall_seconds": round(seconds, 1), "results": rows}


if __name__ == "__main__":
    main()
