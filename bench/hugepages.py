"""Benchmark of a fresh sealed blob's life with 4 KiB pages and with transparent huge pages.

Run it with `make bench` (or `.venv/bin/python bench/hugepages.py`). One
blob life, as in `bench/core.py`: ``create`` -> ``write_all`` -> ``seal`` ->
``map_read`` -> read every byte -> ``cleanup``, through the public API, at
each size. It runs under the machine's own setting of
/sys/kernel/mm/transparent_hugepage/shmem_enabled and, when this process may
change it (root), also under ``advise``, where blobplane asks for huge pages;
the setting is put back as it was afterwards, whatever happens. Where huge
pages can be reserved (root: ``vm.nr_hugepages``, given back afterwards), a
third row makes the blobs of reserved huge pages
(``SharedMemoryBlobs(reserved_huge_pages=True)``, ``MFD_HUGETLB``).

Each round runs every setting once, in a fresh child process (a process reads
the setting when it makes its first large blob), so that drift of the machine
falls on both alike. Reported: the median GB/s of each, and the ratio of
``advise`` to the 4 KiB-page path (the target is 5x at 64 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from _common import MIB, environment, fmt_size, parse_size
from blobplane.backends.hugepages import SHMEM_ENABLED, read_shmem_thp_mode, reserved_huge_pages

TARGET = 5.0  # advise over the 4 KiB-page path, at 64 MiB
DEFAULT_SIZES = [64 * MIB, 512 * MIB]
DEFAULT_ROUNDS = 7
RUNS_PER_CHILD = 3
RESERVED = "reserved huge pages"
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"

CHILD = """
import mmap, os, sys, time
sys.path.insert(0, sys.argv[3])
from _common import make_payload, read_every_byte
from blobplane import BlobBackend, SharedMemoryBlobs
from blobplane.backends.hugepages import shmem_thp_mode
size, runs, reserved = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4] == "reserved"
payload = make_payload(size)
blobs = SharedMemoryBlobs(BlobBackend.MEMFD, reserved_huge_pages=reserved)
times = []
mode = shmem_thp_mode()
for _ in range(runs):
    start = time.perf_counter_ns()
    blob = blobs.create(size)
    if reserved:
        huge = os.fstat(blob.fileno()).st_blksize > mmap.PAGESIZE
        mode = RESERVED if huge else RESERVED + " (too few free)"
    try:
        blob.write_all(payload)
        blob.seal()
        with blobs.map_read(blob.token, blob.descriptor) as mapped, mapped.as_slice() as view:
            read_every_byte(view)
    finally:
        blobs.cleanup(blob.token)
    times.append(time.perf_counter_ns() - start)
blobs.close()
print(mode.replace(" ", "_"), *times)
"""


def current_setting() -> str | None:
    return read_shmem_thp_mode() or None


def set_setting(mode: str) -> None:
    with open(SHMEM_ENABLED, "w") as file:
        file.write(mode)


def run_child(size: int, runs: int, *, reserved: bool = False) -> tuple[str, list[int]]:
    here = os.path.dirname(os.path.abspath(__file__))
    code = CHILD.replace("RESERVED", repr(RESERVED))
    kind = "reserved" if reserved else "usual"
    result = subprocess.run(
        [sys.executable, "-c", code, str(size), str(runs), here, kind],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    mode, *times = result.stdout.split()
    return mode.replace("_", " "), [int(t) for t in times]


@contextlib.contextmanager
def pages_reserved(count: int) -> Iterator[bool]:
    """*count* more reserved huge pages for the block, given back after it; whether it could."""
    try:
        with open(NR_HUGEPAGES) as file:
            before = int(file.read())
        with open(NR_HUGEPAGES, "w") as file:
            file.write(str(before + count))
    except (OSError, ValueError):
        yield False
        return
    try:
        yield True
    finally:
        with open(NR_HUGEPAGES, "w") as file:
            file.write(str(before))


def run_rounds(
    sizes: list[int],
    rounds: int,
    settings: list[str | None],
    *,
    machine_setting: str | None,
    reserved: bool,
    samples: dict[tuple[int, str], list[float]],
    console: Console,
) -> None:
    """Each round: a child per setting (and one with reserved huge pages), GB/s into *samples*."""
    try:
        for size in sizes:
            for number in range(rounds):
                console.print(f"[dim]{fmt_size(size)}: round {number + 1} of {rounds}…[/dim]")
                runs: list[tuple[str | None, bool]] = [(wanted, False) for wanted in settings]
                if reserved:
                    runs.append((None, True))
                for wanted, from_reserved in runs:
                    mode_now = wanted or machine_setting
                    if len(settings) > 1 and mode_now is not None:
                        set_setting(mode_now)
                    mode, times = run_child(size, RUNS_PER_CHILD, reserved=from_reserved)
                    samples.setdefault((size, mode or "unknown"), []).extend(
                        size / t
                        for t in times  # bytes per ns = GB/s
                    )
    finally:
        if machine_setting is not None and current_setting() != machine_setting:
            set_setting(machine_setting)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="4 MiB, 2 rounds: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        help="comma-separated sizes (default: 64M,512M)",
    )
    parser.add_argument("--rounds", type=int, help=f"rounds (default {DEFAULT_ROUNDS})")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([4 * MIB] if args.quick else DEFAULT_SIZES)
    rounds = args.rounds or (2 if args.quick else DEFAULT_ROUNDS)

    console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.perf_counter()
    machine_setting = current_setting()
    settings: list[str | None] = [None]  # None: as the machine has it
    if machine_setting not in (None, "advise") and os.access(SHMEM_ENABLED, os.W_OK):
        settings.append("advise")
    samples: dict[tuple[int, str], list[float]] = {}
    page = reserved_huge_pages().page_size or 2 * MIB
    with pages_reserved(max(sizes) // page + 2) as reserving:
        run_rounds(
            sizes,
            rounds,
            settings,
            machine_setting=machine_setting,
            reserved=reserving,
            samples=samples,
            console=console,
        )

    rows: list[dict[str, Any]] = [
        {"size": size, "setting": mode, "runs": len(values), "gb_per_s": statistics.median(values)}
        for (size, mode), values in samples.items()
    ]
    base = {r["size"]: r["gb_per_s"] for r in rows if r["setting"] == machine_setting}
    for row in rows:
        reference = base.get(row["size"])
        row["ratio_to_machine_setting"] = row["gb_per_s"] / reference if reference else None
    table = Table(title="a fresh sealed memfd blob: create, fill, seal, map, read, free")
    for column in ("size", "shmem_enabled", "runs", "GB/s", "x machine's setting"):
        table.add_column(column, justify="right")
    for row in rows:
        ratio = row["ratio_to_machine_setting"]
        table.add_row(
            fmt_size(row["size"]),
            row["setting"],
            str(row["runs"]),
            f"{row['gb_per_s']:.2f}",
            "-" if ratio is None else f"{ratio:.2f}",
        )
    console.print(table)
    if len(settings) == 1:
        console.print(
            "only the machine's setting was measured: changing shmem_enabled needs root"
            if machine_setting != "advise"
            else "the machine's setting is advise already"
        )
    seconds = time.perf_counter() - started
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "benchmark": "hugepages",
                    "environment": environment(),
                    "machine_setting": machine_setting,
                    "target_ratio_at_64MiB": TARGET,
                    "results": rows,
                    "wall_seconds": seconds,
                },
                out,
                indent=2,
            )
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
