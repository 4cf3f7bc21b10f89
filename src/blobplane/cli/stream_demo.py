"""`blobplane demo --stream`: 1080p frames from a publisher to subscriber processes, live.

The publisher writes each frame in place into a loaned pool slot; every
subscriber is a separate interpreter that checks every frame (CRC-32 of
every byte, against the one in the frame's header) and reports its frame
rate, latency percentiles and missed frames twice a second.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from blobplane.streams import Backpressure, Publisher, Subscriber

FRAME_1080P = 1920 * 1080 * 3
_REPORT_EVERY_S = 0.5


@dataclass
class _Report:
    frames: int = 0
    missed: int = 0
    bad: int = 0
    p50_us: float = 0.0
    p99_us: float = 0.0
    fps: float = 0.0
    done: bool = False


@dataclass
class _Board:
    reports: dict[int, _Report] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def subscribe(path: str, delay_s: float) -> None:
    """The subscriber process: verify every frame, print a JSON report twice a second."""
    latencies: list[float] = []
    frames = missed = bad = 0
    started = last = time.monotonic()

    def report(done: bool) -> None:
        ordered = sorted(latencies) or [0.0]
        line = {
            "frames": frames,
            "missed": missed,
            "bad": bad,
            "p50_us": ordered[len(ordered) // 2] * 1e6,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
            "fps": frames / max(time.monotonic() - started, 1e-9),
            "done": done,
        }
        print(json.dumps(line), flush=True)

    with Subscriber(path, timeout=60) as subscriber:
        for receipt in subscriber:
            with receipt:
                latencies.append(receipt.latency_s)
                missed += receipt.missed
                if zlib.crc32(receipt.view) != int.from_bytes(receipt.header[:4], "little"):
                    bad += 1
                frames += 1
                if delay_s:
                    time.sleep(delay_s)
            if time.monotonic() - last >= _REPORT_EVERY_S:
                last = time.monotonic()
                report(False)
                del latencies[:-2000]
    report(True)


def _read_reports(index: int, child: subprocess.Popen[str], board: _Board) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        values = json.loads(line)
        with board.lock:
            board.reports[index] = _Report(**values)


def _table(board: _Board, published: int, elapsed: float, frame_size: int) -> Table:
    table = Table(title=f"{published} frames of {frame_size:,} bytes in {elapsed:.1f} s")
    for column in ("subscriber", "frames", "fps", "GB/s", "latency p50", "p99", "missed", "bad"):
        table.add_column(column, justify="right")
    with board.lock:
        for index, report in sorted(board.reports.items()):
            table.add_row(
                str(index),
                str(report.frames),
                f"{report.fps:.0f}",
                f"{report.fps * frame_size / 1e9:.2f}",
                f"{report.p50_us:.0f} µs",
                f"{report.p99_us:.0f} µs",
                str(report.missed),
                str(report.bad),
            )
    return table


def run(
    console: Console,
    *,
    seconds: float = 5.0,
    subscribers: int = 2,
    policy: Backpressure = Backpressure.BLOCK,
    frame_size: int = FRAME_1080P,
    slow_last: bool = True,
) -> dict[int, _Report]:
    """Publish frames for *seconds*; the last subscriber is slow if *slow_last*."""
    board = _Board()
    folder = tempfile.mkdtemp(prefix="blobplane-stream-demo-")
    path = os.path.join(folder, "stream.sock")
    children: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []
    # One pattern per slot-sized frame, varied per frame by its first 8 bytes.
    pattern = os.urandom(frame_size)
    try:
        with Publisher(path, slot_size=frame_size, slots=6, policy=policy) as publisher:
            for index in range(subscribers):
                delay = 0.01 if slow_last and index == subscribers - 1 and index else 0.0
                child = subprocess.Popen(
                    [sys.executable, "-m", "blobplane.cli.stream_demo", path, str(delay)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                children.append(child)
                reader = threading.Thread(target=_read_reports, args=(index, child, board))
                reader.start()
                readers.append(reader)
            publisher.wait_for_subscribers(subscribers, timeout=60)
            started = time.monotonic()
            published = 0
            with Live(console=console, refresh_per_second=4) as live:
                while (elapsed := time.monotonic() - started) < seconds:
                    with publisher.loan(timeout=30) as loan:
                        with loan.buffer as frame:
                            frame[:] = pattern
                            frame[:8] = published.to_bytes(8, "little")
                            crc = zlib.crc32(frame)
                        published += 1
                        publisher.publish(loan, header=crc.to_bytes(4, "little"))
                    if published % 16 == 0:
                        live.update(_table(board, published, elapsed, frame_size))
                publisher.close()
                for child in children:
                    child.wait(timeout=60)
                for reader in readers:
                    reader.join(timeout=60)
                live.update(_table(board, published, time.monotonic() - started, frame_size))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)
    reports = dict(board.reports)
    latencies = [r.p50_us for r in reports.values() if r.frames]
    if latencies:
        console.print()
        console.print(
            f"median subscriber latency p50 {statistics.median(latencies):.0f} µs; "
            f"frames checked in place by {len(reports)} processes, "
            f"{sum(r.bad for r in reports.values())} bad"
        )
    return reports


if __name__ == "__main__":
    subscribe(sys.argv[1], float(sys.argv[2]))
