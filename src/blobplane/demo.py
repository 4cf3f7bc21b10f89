"""`make demo`: a producer fills and seals a blob, a consumer process reads it in place.

The consumer is a second interpreter that inherits the memfd, checks it is
sealed, maps it read-only and verifies the checksum without copying.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zlib
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from blobplane import BlobBackend, SharedMemoryBlobs, UnixFd, decode_descriptor, map_descriptor
from blobplane.sizes import format_size

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Timings:
    fill_s: float
    seal_s: float
    consume_s: float
    consumer_read_s: float


def fill_pattern(view: memoryview, seed: int) -> int:
    """Fill *view* with a seeded pattern and return its CRC-32."""
    chunk = (seed.to_bytes(8, "little") * (_CHUNK // 8))[:_CHUNK]
    crc = 0
    for start in range(0, len(view), _CHUNK):
        part = chunk[: len(view) - start]
        view[start : start + len(part)] = part
        crc = zlib.crc32(part, crc)
    return crc


def consume(descriptor_json: str, size: int, expected_crc: int) -> float:
    """The consumer side: map, checksum in place, return the seconds it took."""
    started = time.perf_counter()
    descriptor = decode_descriptor(descriptor_json)
    with map_descriptor(descriptor, size) as mapped, mapped.as_slice() as view:
        crc = zlib.crc32(view)
    elapsed = time.perf_counter() - started
    if crc != expected_crc:
        raise SystemExit(f"checksum mismatch: got {crc:#010x}, expected {expected_crc:#010x}")
    return elapsed


def run(size: int, backend: BlobBackend, console: Console) -> Timings:
    with SharedMemoryBlobs(backend) as blobs:
        started = time.perf_counter()
        blob = blobs.create(size)
        with blob.buffer as view:
            crc = fill_pattern(view, seed=size)
        filled = time.perf_counter()
        blob.seal()
        sealed = time.perf_counter()
        inherited = (blob.fileno(),) if isinstance(blob.descriptor, UnixFd) else ()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "blobplane.demo",
                "consume",
                blob.descriptor.to_json().decode(),
                str(size),
                str(crc),
            ],
            pass_fds=inherited,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        consumed = time.perf_counter()
        blob.cleanup()
    if result.returncode != 0:
        raise SystemExit(f"consumer failed:\n{result.stderr}")
    timings = Timings(filled - started, sealed - filled, consumed - sealed, float(result.stdout))
    _report(console, size, blobs.backend, crc, timings)
    return timings


def _report(console: Console, size: int, backend: BlobBackend, crc: int, t: Timings) -> None:
    table = Table(title=f"one {format_size(size)} blob, {backend.value}, crc32 {crc:#010x}")
    table.add_column("step")
    table.add_column("time", justify="right")
    table.add_column("GB/s", justify="right")
    rows = [
        ("create + fill (producer)", t.fill_s),
        ("seal", t.seal_s),
        ("consumer map + checksum in place", t.consumer_read_s),
        ("consumer process, start to exit", t.consume_s),
    ]
    for label, seconds in rows:
        table.add_row(label, f"{seconds * 1e3:.1f} ms", f"{size / seconds / 1e9:.2f}")
    console.print(table)
    console.print(
        f"[green]verified[/green]: a second process read {size:,} bytes "
        "through a sealed, read-only mapping, no copy"
    )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "consume":
        print(consume(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    raise SystemExit("usage: python -m blobplane.demo consume DESCRIPTOR_JSON SIZE CRC")


if __name__ == "__main__":
    main()
