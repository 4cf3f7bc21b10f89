"""`blobplane demo-broker`: a broker, a producer publishing frames under keys, two consumers.

Four processes that know nothing of each other but the broker's socket: the
broker (`blobplane serve` on a temporary socket), a producer that has the
broker allocate each frame, fills it in place and seals it, and two
consumers that ask for every key (waiting for the ones not published yet),
check each frame's CRC-32 in place through a read-only mapping, and release
it. The broker's stats close the show, then it is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

from rich.console import Console
from rich.table import Table

from blobplane.broker.process import start_broker
from blobplane.cli.tables import stats_table
from blobplane.sizes import format_size

__all__ = ["expected_crc", "fill_frame", "run"]

FRAMES = 24
FRAME_SIZE = 4 << 20
_TIMEOUT_S = 60.0
_BLOCK = 64 << 10


def _block(frame: int) -> bytes:
    seed = f"frame {frame} ".encode()
    return (seed * (_BLOCK // len(seed) + 1))[:_BLOCK]


def fill_frame(view: memoryview, frame: int) -> None:
    """Write frame number *frame*'s pattern into *view*, in place."""
    block = _block(frame)
    for start in range(0, len(view), _BLOCK):
        part = view[start : start + _BLOCK]
        part[:] = block[: len(part)]


def expected_crc(size: int, frame: int) -> int:
    block = _block(frame)
    crc = 0
    for start in range(0, size, _BLOCK):
        crc = zlib.crc32(block[: min(_BLOCK, size - start)], crc)
    return crc


def _role(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blobplane.cli.broker_demo", *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str], name: str) -> dict[str, float]:
    out, _ = process.communicate(timeout=_TIMEOUT_S)
    if process.returncode != 0:
        raise SystemExit(f"the {name} failed (exit status {process.returncode})")
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def run(console: Console, *, frames: int = FRAMES, frame_size: int = FRAME_SIZE) -> None:
    """Run the whole demo and print what happened."""
    from blobplane.client import connect_broker

    folder = tempfile.mkdtemp(prefix="blobplane-demo-")
    socket_path = os.path.join(folder, "broker.sock")
    broker = start_broker(socket_path, "--memory-limit", "1GiB")
    try:
        console.print(f"broker pid {broker.process.pid} listening at {socket_path}")
        # The consumers start first: their gets wait for keys nobody has published yet.
        consumers = [_role("consume", socket_path, str(frames), name) for name in ("A", "B")]
        producer = _role("produce", socket_path, str(frames), str(frame_size))
        results = {"producer": _finish(producer, "producer")}
        for name, consumer in zip(("A", "B"), consumers, strict=True):
            results[f"consumer {name}"] = _finish(consumer, f"consumer {name}")
        _report(console, results, frames, frame_size)
        with connect_broker(socket_path, name="demo") as client:
            console.print(stats_table(client.stats()))
        status = broker.stop()
        gone = not os.path.exists(socket_path)
        console.print(
            f"[green]broker stopped[/green] (exit status {status}, socket file "
            f"{'removed' if gone else 'LEFT BEHIND'}); its memfds went with it"
        )
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _report(console: Console, results: dict[str, dict[str, float]], frames: int, size: int) -> None:
    table = Table(title=f"{frames} frames of {format_size(size)} through the broker")
    table.add_column("process")
    table.add_column("frames", justify="right")
    table.add_column("time", justify="right")
    table.add_column("GB/s", justify="right")
    for name, result in results.items():
        seconds = result["seconds"]
        table.add_row(
            name,
            f"{int(result['frames'])}",
            f"{seconds * 1e3:.1f} ms",
            f"{result['frames'] * size / seconds / 1e9:.2f}",
        )
    console.print(table)
    console.print(
        "[green]verified[/green]: both consumers read every frame in place (CRC-32 checked "
        "through read-only mappings of sealed memfds), no copy"
    )


# -- the child processes -------------------------------------------------------------------


def produce(socket_path: str, frames: int, size: int) -> dict[str, float]:
    from blobplane.client import connect_broker

    started = time.perf_counter()
    with connect_broker(socket_path, name="demo producer") as broker:
        for frame in range(frames):
            with broker.create(size, key=f"frame-{frame}") as blob:
                with blob.buffer as view:
                    fill_frame(view, frame)
                blob.seal()
    return {"frames": frames, "seconds": time.perf_counter() - started}


def consume(socket_path: str, frames: int, name: str) -> dict[str, float]:
    from blobplane.client import connect_broker

    started = time.perf_counter()
    with connect_broker(socket_path, name=f"demo consumer {name}") as broker:
        for frame in range(frames):
            with broker.get(f"frame-{frame}", timeout=_TIMEOUT_S) as mapped:
                with mapped.as_slice() as view:
                    crc = zlib.crc32(view)
                if crc != expected_crc(len(mapped), frame):
                    raise SystemExit(f"consumer {name}: frame {frame} has the wrong checksum")
    return {"frames": frames, "seconds": time.perf_counter() - started}


def main() -> None:
    match sys.argv[1:]:
        case ["produce", socket_path, frames, size]:
            result = produce(socket_path, int(frames), int(size))
        case ["consume", socket_path, frames, name]:
            result = consume(socket_path, int(frames), name)
        case _:
            raise SystemExit(
                "usage: python -m blobplane.broker_demo produce SOCKET FRAMES SIZE | "
                "consume SOCKET FRAMES NAME"
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
