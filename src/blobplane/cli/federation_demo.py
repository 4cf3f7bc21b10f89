"""`blobplane demo-federation`: two brokers here, blobs put on one and got from the other.

Both brokers (`blobplane serve` on temporary sockets) share one key file and
serve Arrow Flight on loopback; the second names the first as its peer. A
producer puts blobs on the first through its Unix socket; a consumer of the
second asks for them by key, and the second broker fetches each from the
first over Flight, seals its copy and hands the consumer an fd, as for any
blob. Every byte is checked (SHA-256), the throughput shown, and each key is
got once more: from the copy, at local speed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from blobplane.broker.process import BrokerProcess, start_broker
from blobplane.sizes import format_size

__all__ = ["run"]


def _rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"


def _start(folder: str, name: str, *args: str) -> BrokerProcess:
    return start_broker(
        os.path.join(folder, f"{name}.sock"),
        "--key-file", os.path.join(folder, "shared.key"),
        "--flight", "grpc://127.0.0.1:0",
        *args,
    )  # fmt: skip


def run(console: Console, *, size: int = 256 << 20, count: int = 4) -> None:
    """Run the demo: *count* blobs of *size* bytes from the first broker to the second."""
    from blobplane.client import connect_broker

    folder = tempfile.mkdtemp(prefix="blobplane-federation-")
    os.chmod(folder, 0o700)
    brokers: list[BrokerProcess] = []
    try:
        first = _start(folder, "first")
        brokers.append(first)
        assert first.flight_url is not None
        second = _start(folder, "second", "--peer", first.flight_url)
        brokers.append(second)
        console.print(f"first broker:  {first.socket_path}  flight {first.flight_url}")
        console.print(
            f"second broker: {second.socket_path}  flight {second.flight_url}  "
            f"peer {first.flight_url}"
        )
        keys = [f"demo-{index}" for index in range(count)]
        digests = {}
        with connect_broker(first.socket_path, name="demo producer") as producer:
            for index, key in enumerate(keys):
                data = np.random.default_rng(index).bytes(size)
                digests[key] = hashlib.sha256(data).hexdigest()
                producer.put_bytes(data, key=key)
        console.print(f"put {count} blobs of {format_size(size)} on the first broker")
        rows = []
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=console,
        )
        with connect_broker(second.socket_path, name="demo consumer") as consumer, progress:
            task = progress.add_task("get from the second broker", total=size * count)
            for key in keys:
                started = time.perf_counter()
                with consumer.get(key) as mapped:
                    remote = time.perf_counter() - started
                    digest = hashlib.sha256(mapped.as_slice()).hexdigest()
                progress.advance(task, size)
                started = time.perf_counter()
                with consumer.get(key) as mapped:
                    cached = time.perf_counter() - started
                rows.append((key, remote, cached, digest == digests[key]))
        table = Table(title=f"{count} x {format_size(size)}, first broker -> second broker")
        for column in ("key", "remote get", "throughput", "cached get", "sha256"):
            table.add_column(column, justify="left" if column == "key" else "right")
        for key, remote, cached, same in rows:
            table.add_row(
                key,
                f"{remote * 1000:.1f} ms",
                _rate(size, remote),
                f"{cached * 1000:.2f} ms",
                "equal" if same else "[red]DIFFERENT[/red]",
            )
        console.print(table)
        total = sum(row[1] for row in rows)
        console.print(
            f"moved {format_size(size * count)} in {total:.2f} s: "
            f"{_rate(size * count, total)} (remote gets, including the copy's allocation)"
        )
        if not all(row[3] for row in rows):
            raise SystemExit("a blob arrived different from what was put")
    finally:
        for broker in reversed(brokers):
            broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
