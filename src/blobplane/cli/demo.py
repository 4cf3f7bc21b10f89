"""`make demo`: a producer streams blobs to a consumer process over a Unix socket channel.

The producer listens at a socket in a private temporary folder and starts the
consumer, a second interpreter (``python -m blobplane.cli.demo consume PATH``),
which connects. For every blob the producer creates a memfd blob, fills it in
place, computes its CRC-32 in place, seals it and hands it over with
``send_blob`` (the fd travels with ``SCM_RIGHTS``, the index, size and CRC in
the handoff's ``meta``); ``send_blob`` returns when the consumer has mapped
it. The consumer checks the seals, maps the blob read-only, recomputes the
CRC-32 over the mapping without copying, and at the end sends back a
summary, which the producer prints with the throughput and the per-blob
handoff latency.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from blobplane import channel
from blobplane.blobs import ProducerBlob, SharedMemoryBlobs
from blobplane.errors import BlobError, UnexpectedMessage
from blobplane.sizes import format_size
from blobplane.types import BlobBackend
from blobplane.wire import UserPayload

__all__ = ["ConsumerReport", "Summary", "consume", "run"]

# What rides in each handoff's meta: blob index, size, CRC-32.
META = struct.Struct("<QQI")
DONE = b"done"
_PATTERN_SIZE = 1 << 20
_CONNECT_TIMEOUT_S = 30.0
_TIMEOUT_S = 60.0


class ConsumerReport(msgspec.Struct, frozen=True):
    """What the consumer sends back at the end (JSON in a UserPayload)."""

    blobs: int
    bytes: int
    read_seconds: float
    mismatches: list[int]


@dataclass(frozen=True)
class Summary:
    """What one run of the demo measured."""

    blobs: int
    total: int
    seconds: float
    latencies_s: list[float]
    consumer_checked: int
    consumer_bytes: int
    consumer_read_s: float
    mismatches: list[int]

    @property
    def gb_per_s(self) -> float:
        return self.total / self.seconds / 1e9

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies_s)

    @property
    def p99_s(self) -> float:
        if len(self.latencies_s) < 2:
            return self.latencies_s[0]
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[98]


# -- the producer --------------------------------------------------------------------


def _pattern() -> bytes:
    """1 MiB of seeded pseudo-random bytes; each blob gets it rotated differently."""
    return random.Random(0xB10B).randbytes(_PATTERN_SIZE)


def fill(blob: ProducerBlob, pattern: bytes, index: int) -> int:
    """Fill *blob* in place with *pattern* rotated by *index*; return its CRC-32, read in place."""
    shift = (index * 4099) % len(pattern)
    chunk = pattern[shift:] + pattern[:shift]
    with blob.buffer as view:
        for start in range(0, len(view), len(chunk)):
            part = min(len(chunk), len(view) - start)
            view[start : start + part] = chunk[:part]
        return zlib.crc32(view)


def _start_consumer(path: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "blobplane.cli.demo", "consume", path])


def _accept(listener: channel.Listener, consumer: subprocess.Popen[bytes]) -> channel.Channel:
    """The consumer's connection; gives up if it exits first or takes too long."""
    deadline = time.monotonic() + _CONNECT_TIMEOUT_S
    while True:
        try:
            return listener.accept(timeout=0.2)
        except BlobError as exc:
            if consumer.poll() is not None:
                raise SystemExit(
                    f"the consumer exited with {consumer.returncode} before connecting"
                ) from exc
            if time.monotonic() >= deadline:
                raise SystemExit(
                    f"the consumer did not connect within {_CONNECT_TIMEOUT_S:.0f} s"
                ) from exc


def _stream(
    ch: channel.Channel, blobs: SharedMemoryBlobs, total: int, blob_size: int, console: Console
) -> list[float]:
    """Hand `total` bytes over in blobs; return each `send_blob`'s time until the ack."""
    pattern = _pattern()
    latencies: list[float] = []
    columns = (
        TextColumn("[bold]streaming"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("blobs", total=total)
        sent = 0
        index = 0
        while sent < total:
            size = min(blob_size, total - sent)
            with blobs.create(size) as blob:
                crc = fill(blob, pattern, index)
                blob.seal()
                started = time.perf_counter()
                ch.send_blob(blob, meta=META.pack(index, size, crc), timeout=_TIMEOUT_S)
                latencies.append(time.perf_counter() - started)
            # The consumer holds its own mapping now: cleaning up our side frees nothing
            # it reads; the memory goes when its mapping closes.
            sent += size
            index += 1
            progress.update(task, completed=sent)
    return latencies


def _report_from(ch: channel.Channel) -> ConsumerReport:
    ch.send(DONE)
    message, fds = ch.recv(timeout=_TIMEOUT_S)
    for fd in fds:
        os.close(fd)
    if not isinstance(message, UserPayload):
        raise SystemExit(f"the consumer answered {type(message).__name__}, not its report")
    return msgspec.json.decode(message.data, type=ConsumerReport)


def run(
    total: int,
    blob_size: int,
    console: Console,
    backend: BlobBackend = BlobBackend.MEMFD,
) -> Summary:
    """Stream *total* bytes to a consumer process in blobs of *blob_size*; report and return."""
    if total <= 0 or blob_size <= 0:
        raise SystemExit("--total and --blob-size must be positive")
    folder = tempfile.mkdtemp(prefix="blobplane-demo-")  # 0700: only we can connect
    path = os.path.join(folder, "demo.sock")
    consumer: subprocess.Popen[bytes] | None = None
    try:
        with SharedMemoryBlobs(backend) as blobs, channel.listen(path) as listener:
            consumer = _start_consumer(path)
            with _accept(listener, consumer) as ch:
                console.print(
                    f"producer pid {os.getpid()} -> consumer pid {ch.peer_credentials.pid} "
                    f"over {ch.transport} socket {path}"
                )
                started = time.perf_counter()
                latencies = _stream(ch, blobs, total, blob_size, console)
                report = _report_from(ch)
                seconds = time.perf_counter() - started
        returncode = consumer.wait(timeout=_TIMEOUT_S)
    finally:
        if consumer is not None and consumer.poll() is None:
            consumer.kill()
            consumer.wait()
        shutil.rmtree(folder, ignore_errors=True)
    mismatches = report.mismatches
    summary = Summary(
        blobs=len(latencies),
        total=total,
        seconds=seconds,
        latencies_s=latencies,
        consumer_checked=report.blobs,
        consumer_bytes=report.bytes,
        consumer_read_s=report.read_seconds,
        mismatches=mismatches,
    )
    _report(console, summary, blob_size)
    if mismatches or returncode != 0 or summary.consumer_checked != summary.blobs:
        raise SystemExit(
            f"verification FAILED: consumer exit {returncode}, "
            f"{summary.consumer_checked} of {summary.blobs} blobs checked, "
            f"CRC-32 mismatches at {mismatches[:10]}"
        )
    return summary


def _report(console: Console, s: Summary, blob_size: int) -> None:
    table = Table(
        title=f"{format_size(s.total)} in {s.blobs} blobs of {format_size(blob_size)}, "
        "memfd over a Unix socket channel"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("wall time, first create to the consumer's summary", f"{s.seconds:.2f} s")
    table.add_row("throughput", f"{s.gb_per_s:.2f} GB/s")
    table.add_row("handoff latency p50 (send_blob until the ack)", f"{s.p50_s * 1e3:.2f} ms")
    table.add_row("handoff latency p99", f"{s.p99_s * 1e3:.2f} ms")
    read_rate = s.consumer_bytes / s.consumer_read_s / 1e9 if s.consumer_read_s else 0.0
    table.add_row(
        "consumer: CRC-32 over the read-only mapping, in total",
        f"{s.consumer_read_s:.2f} s ({read_rate:.2f} GB/s)",
    )
    console.print(table)
    if not s.mismatches and s.consumer_checked == s.blobs:
        console.print(
            f"[green]verified[/green]: the consumer process checked the CRC-32 of all "
            f"{s.consumer_checked} blobs ({s.consumer_bytes:,} bytes) in place, no copy: "
            "all match"
        )


# -- the consumer --------------------------------------------------------------------


def consume(path: str) -> int:
    """Connect to the producer at *path*, verify every blob it hands over, report back."""
    checked = 0
    total = 0
    read_s = 0.0
    mismatches: list[int] = []
    with channel.connect(path, timeout=_TIMEOUT_S) as ch:
        while True:
            try:
                handoff = ch.recv_handoff()
            except UnexpectedMessage:
                message, fds = ch.recv()
                for fd in fds:
                    os.close(fd)
                if isinstance(message, UserPayload) and message.data == DONE:
                    break
                raise
            with handoff:
                index, size, crc = META.unpack(handoff.meta)
                started = time.perf_counter()
                with handoff.blob.as_slice() as view:
                    actual = zlib.crc32(view)
                read_s += time.perf_counter() - started
            if actual != crc or index != checked or size != handoff.token.size:
                mismatches.append(index)
            checked += 1
            total += handoff.token.size
        report = ConsumerReport(checked, total, read_s, mismatches)
        ch.send(msgspec.json.encode(report))
    return 1 if mismatches else 0


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "consume":
        sys.exit(consume(sys.argv[2]))
    raise SystemExit("usage: python -m blobplane.cli.demo consume SOCKET_PATH")


if __name__ == "__main__":
    main()
