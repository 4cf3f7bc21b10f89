"""Benchmark of the blobplane core: create + fill + seal + map_read + read every byte.

Run it with `make bench` (or `.venv/bin/python bench/core.py`). For each size
it times, in the same run and interleaved (every round runs each variant once,
in a new order), one whole blob life per repetition:

- ``raw memfd (reference)``: the same steps with no library: ``memfd_create``,
  ``ftruncate``, writable ``mmap``, pre-fault with ``MADV_POPULATE_WRITE`` (as
  the library does), copy, close the writable map, ``F_ADD_SEALS``, read-only
  ``mmap``, read, close. This is the honest limit for a fresh blob.
- ``blobplane <backend>`` for memfd, posix_shm and temp_file:
  ``create`` -> ``write_all`` -> ``seal`` -> ``map_read`` -> read -> close ->
  ``cleanup``.
- for information only: the raw reference without the pre-fault (what
  ``MADV_POPULATE_WRITE`` buys), the raw reference sizing the memfd with
  ``posix_fallocate`` instead of ``ftruncate`` (pages allocated in one pass
  before the pre-fault maps them), and an in-process numpy copy and read (no
  shared memory at all; private anonymous memory, which numpy backs with huge
  pages where the host allows them).

"Read every byte" is the same function in every variant: a wrapping uint64 sum
with numpy over the read-only view (plus the < 8 trailing bytes), checked
against the payload's own sum so that no variant can skip the work.

The variants run in a new random order every round (seeded, so the same in
every run), so drift of the machine and whatever one variant leaves for the
next to pay (freeing memory, writeback) fall on all of them alike. The
garbage collector is off while a repetition runs, as in `timeit`. Every
repetition must leave no fd and no blob mapping behind: a deferred unmap
would move teardown cost out of the timed region.

Medians, not means: on the project's virtual machines one run in six or so of
any variant takes two to three times as long. The guest hands freed memory back
to the host (virtio-balloon free page reporting), so a fresh page is sometimes
also a fault on the host. Compare variants within one run, never across runs.

A second pass breaks the memfd backend's time at 64 MiB (or the largest size
run) into steps next to the raw reference's steps, and splits it into page
faults, copy, read, other syscalls and Python overhead.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import mmap
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import blobplane
from _common import (
    KIB,
    MADV_POPULATE_WRITE,
    MFD_FLAGS,
    MIB,
    SEALS,
    blob_mappings,
    environment,
    fmt_size,
    fmt_time,
    gc_paused,
    make_payload,
    minor_faults,
    open_fds,
    parse_size,
    quartiles,
    read_every_byte,
)
from blobplane import BlobBackend

# Repetitions per size: the whole default run takes two to two and a half minutes here.
DEFAULT_PLAN: dict[int, int] = {4 * KIB: 1001, 1 * MIB: 301, 64 * MIB: 61, 512 * MIB: 31}
QUICK_PLAN: dict[int, int] = {4 * KIB: 2, 1 * MIB: 2}
BREAKDOWN_SIZE = 64 * MIB
BREAKDOWN_REPS = 31
QUICK_BREAKDOWN_REPS = 2

REFERENCE = "raw memfd (reference)"

Variant = Callable[[bytes], int]


# --------------------------------------------------------------------------- variants


def raw_memfd(payload: bytes, *, prefault: bool = True, fallocate: bool = False) -> int:
    """The reference: the library's steps as bare syscalls, nothing else."""
    n = len(payload)
    fd = os.memfd_create("bench-raw", MFD_FLAGS)
    try:
        if fallocate:
            os.posix_fallocate(fd, 0, n)  # sizes the memfd and allocates its pages
        else:
            os.ftruncate(fd, n)
        writable = mmap.mmap(fd, n, access=mmap.ACCESS_WRITE)
        if prefault:
            writable.madvise(MADV_POPULATE_WRITE)
        writable[0:n] = payload
        writable.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        readable = mmap.mmap(fd, n, access=mmap.ACCESS_READ)
        with memoryview(readable) as view:
            checksum = read_every_byte(view)
        readable.close()
    finally:
        os.close(fd)
    return checksum


def raw_memfd_no_prefault(payload: bytes) -> int:
    return raw_memfd(payload, prefault=False)


def raw_memfd_fallocate(payload: bytes) -> int:
    return raw_memfd(payload, fallocate=True)


def library_variant(blobs: blobplane.SharedMemoryBlobs) -> Variant:
    """One blob life through the public API of an allocator made once, outside the timing."""

    def run(payload: bytes) -> int:
        blob = blobs.create(len(payload))
        try:
            blob.write_all(payload)
            blob.seal()
            with blobs.map_read(blob.token, blob.descriptor) as mapped, mapped.as_slice() as view:
                checksum = read_every_byte(view)
        finally:
            blobs.cleanup(blob.token)
        return checksum

    return run


def numpy_copy(payload: bytes) -> int:
    """For information: copy into a fresh private array and read it, in one process."""
    source = np.frombuffer(payload, dtype=np.uint8)
    target = np.empty_like(source)
    np.copyto(target, source)
    with target.data.toreadonly() as view:
        checksum = read_every_byte(view)
    del target
    return checksum


# --------------------------------------------------------------------------- main pass


@dataclass
class Result:
    size: int
    variant: str
    samples_ns: list[int] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    informational: bool = False

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples_ns)

    @property
    def gbps(self) -> float:
        return self.size / self.median_ns  # bytes per ns == GB/s


def make_variants() -> tuple[list[tuple[str, Variant, bool]], list[blobplane.SharedMemoryBlobs]]:
    allocators: list[blobplane.SharedMemoryBlobs] = []
    variants: list[tuple[str, Variant, bool]] = [(REFERENCE, raw_memfd, False)]
    for kind in (BlobBackend.MEMFD, BlobBackend.POSIX_SHM, BlobBackend.TEMP_FILE):
        blobs = blobplane.SharedMemoryBlobs(kind)
        allocators.append(blobs)
        variants.append((f"blobplane {kind.name.lower()}", library_variant(blobs), False))
    variants.append(("raw memfd, no pre-fault (info)", raw_memfd_no_prefault, True))
    variants.append(("raw memfd, fallocate+pre-fault (info)", raw_memfd_fallocate, True))
    variants.append(("numpy copy+read, in-process (info)", numpy_copy, True))
    return variants, allocators


def measure_size(
    size: int,
    reps: int,
    variants: list[tuple[str, Variant, bool]],
    allocators: list[blobplane.SharedMemoryBlobs],
) -> list[Result]:
    payload = make_payload(size)
    with memoryview(payload) as view:
        expected = read_every_byte(view)
    results = [Result(size, name, informational=info) for name, _, info in variants]
    fds_before = open_fds()
    maps_before = blob_mappings()
    warmup = max(1, min(10, reps // 10))
    shuffle = random.Random(size).shuffle  # a new order every round, the same every run
    clock = time.perf_counter_ns
    for round_no in range(warmup + reps):
        order = list(range(len(variants)))
        shuffle(order)
        for index in order:
            name, run, _ = variants[index]
            with gc_paused():
                faults0 = minor_faults()
                start = clock()
                checksum = run(payload)
                elapsed = clock() - start
                faults1 = minor_faults()
            if checksum != expected:
                raise SystemExit(f"{name} at {fmt_size(size)} read back wrong data")
            if round_no >= warmup:
                results[index].samples_ns.append(elapsed)
                results[index].faults.append(faults1 - faults0)
        # Untimed: every variant must have released everything inside its timed region.
        if open_fds() != fds_before or blob_mappings() != maps_before:
            raise SystemExit(f"a variant leaked an fd or a mapping at {fmt_size(size)}")
        if any(len(blobs) for blobs in allocators):
            raise SystemExit("a blob was not cleaned up")
        gc.collect()
    return results


# --------------------------------------------------------------------------- breakdown


class Steps:
    """Per-step wall time and minor faults (recording costs well under 1 µs a step)."""

    __slots__ = ("faults", "names", "times")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.times: list[int] = []
        self.faults: list[int] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        faults = minor_faults()
        start = time.perf_counter_ns()
        yield
        self.times.append(time.perf_counter_ns() - start)
        self.faults.append(minor_faults() - faults)
        self.names.append(name)


def raw_steps(payload: bytes, steps: Steps) -> int:
    n = len(payload)
    s = steps.step
    with s("memfd_create+ftruncate"):
        fd = os.memfd_create("bench-raw", MFD_FLAGS)
        os.ftruncate(fd, n)
    with s("mmap writable"):
        writable = mmap.mmap(fd, n, access=mmap.ACCESS_WRITE)
    with s("pre-fault (MADV_POPULATE_WRITE)"):
        writable.madvise(MADV_POPULATE_WRITE)
    with s("copy"):
        writable[0:n] = payload
    with s("munmap writable"):
        writable.close()
    with s("F_ADD_SEALS"):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    with s("mmap read-only"):
        readable = mmap.mmap(fd, n, access=mmap.ACCESS_READ)
    view = memoryview(readable)
    with s("read"):
        checksum = read_every_byte(view)
    with s("read again (faults done)"):
        read_every_byte(view)
    view.release()
    with s("munmap + close"):
        readable.close()
        os.close(fd)
    return checksum


def library_steps(blobs: blobplane.SharedMemoryBlobs, payload: bytes, steps: Steps) -> int:
    s = steps.step
    with s("create"):
        blob = blobs.create(len(payload))
    with s("write_all"):
        blob.write_all(payload)
    with s("seal"):
        blob.seal()
    with s("map_read"):
        mapped = blobs.map_read(blob.token, blob.descriptor)
    view = mapped.as_slice()
    with s("read"):
        checksum = read_every_byte(view)
    with s("read again (faults done)"):
        read_every_byte(view)
    view.release()
    with s("close"):
        mapped.close()
    with s("cleanup"):
        blobs.cleanup(blob.token)
    return checksum


@dataclass
class Breakdown:
    size: int
    reps: int
    lib: dict[str, tuple[float, float]]  # step -> (median ns, median faults)
    raw: dict[str, tuple[float, float]]
    lib_total_ns: float
    raw_total_ns: float
    paired_difference_ns: list[float]  # library minus raw, per pair of runs at this size
    python_overhead_ns: float  # per blob, library minus raw at the smallest size
    categories: dict[str, float]  # category -> ns; they add up to lib_total_ns


def _medians(samples: list[Steps]) -> dict[str, tuple[float, float]]:
    names = samples[0].names
    return {
        name: (
            statistics.median(s.times[i] for s in samples),
            statistics.median(s.faults[i] for s in samples),
        )
        for i, name in enumerate(names)
    }


def _total(steps: Steps) -> int:
    return sum(t for name, t in zip(steps.names, steps.times, strict=True) if "again" not in name)


def measure_breakdown(
    size: int, reps: int, blobs: blobplane.SharedMemoryBlobs, python_overhead_ns: float
) -> Breakdown:
    """Step-by-step times of the library and the reference, interleaved, at *size*.

    *python_overhead_ns* is the library's fixed cost per blob over the reference,
    measured where it is not lost in the noise (the smallest size of the main pass).
    """
    payload = make_payload(size)
    with memoryview(payload) as view:
        expected = read_every_byte(view)
    lib_samples: list[Steps] = []
    raw_samples: list[Steps] = []
    for round_no in range(reps + 1):
        for which in (0, 1) if round_no % 2 == 0 else (1, 0):
            steps = Steps()
            with gc_paused():
                if which == 0:
                    checksum = library_steps(blobs, payload, steps)
                else:
                    checksum = raw_steps(payload, steps)
            if checksum != expected:
                raise SystemExit("the breakdown pass read back wrong data")
            if round_no:  # the first round warms up
                (lib_samples if which == 0 else raw_samples).append(steps)
        gc.collect()
    lib = _medians(lib_samples)
    raw = _medians(raw_samples)
    # Totals are sums of the step medians, so that the shares add up to 100%.
    lib_total = sum(t for name, (t, _) in lib.items() if "again" not in name)
    raw_total = sum(t for name, (t, _) in raw.items() if "again" not in name)
    paired = [float(_total(a) - _total(b)) for a, b in zip(lib_samples, raw_samples, strict=True)]

    # Attribution, from the library's own steps: create is memfd_create + mmap
    # (priced by the reference's same steps, tens of µs) plus the pre-fault,
    # i.e. the allocation and mapping of every fresh page; the first read pays
    # the reader's page faults, which the second read no longer does.
    fixed = raw["memfd_create+ftruncate"][0] + raw["mmap writable"][0]
    read_again = lib["read again (faults done)"][0]
    categories = {
        "page faults, producer (create: allocate and pre-fault every page)": max(
            0.0, lib["create"][0] - fixed
        ),
        "page faults, reader (first touch of the read-only map)": max(
            0.0, lib["read"][0] - read_again
        ),
        "copy (write_all's memcpy into the blob)": lib["write_all"][0],
        "read (numpy sum over pages already mapped)": read_again,
        "other syscalls: memfd_create, mmap, munmap, seals, close, freeing the pages": fixed
        + lib["seal"][0]
        + lib["map_read"][0]
        + lib["close"][0]
        + lib["cleanup"][0],
    }
    return Breakdown(
        size, reps, lib, raw, lib_total, raw_total, paired, python_overhead_ns, categories
    )


# --------------------------------------------------------------------------- report


def results_table(results: list[Result]) -> Table:
    table = Table(
        title="blobplane core: create + fill + seal + map_read + read every byte + cleanup",
        caption=(
            "median of the repetitions, variants interleaved in a new random order each "
            "round; IQR = 25th-75th percentile; GB/s = size / median time (10^9 B/s); "
            "x raw = median / median of the raw reference (< 1 is faster); "
            "faults = minor page faults per run"
        ),
    )
    table.add_column("size", justify="right")
    table.add_column("variant")
    table.add_column("runs", justify="right")
    table.add_column("median", justify="right")
    table.add_column("IQR", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("x raw", justify="right")
    table.add_column("faults", justify="right")
    by_size: dict[int, list[Result]] = {}
    for result in results:
        by_size.setdefault(result.size, []).append(result)
    for size, group in by_size.items():
        reference = next(r for r in group if r.variant == REFERENCE)
        for i, r in enumerate(group):
            q1, q3 = quartiles([float(x) for x in r.samples_ns])
            style = "dim" if r.informational else ("bold" if r is reference else "")
            table.add_row(
                fmt_size(size) if i == 0 else "",
                r.variant,
                str(len(r.samples_ns)),
                fmt_time(r.median_ns),
                f"{fmt_time(q1)}-{fmt_time(q3)}",
                f"{r.gbps:.2f}",
                f"{r.median_ns / reference.median_ns:.3f}",
                f"{statistics.median(r.faults):.0f}",
                style=style,
                end_section=i == len(group) - 1,
            )
    return table


def paired_ratios(results: list[Result], size: int, variant: str) -> list[float]:
    ours = next(r for r in results if r.size == size and r.variant == variant)
    ref = next(r for r in results if r.size == size and r.variant == REFERENCE)
    return [a / b for a, b in zip(ours.samples_ns, ref.samples_ns, strict=True)]


def verdict_lines(results: list[Result]) -> list[str]:
    lines = []
    for size in sorted({r.size for r in results}):
        ratios = paired_ratios(results, size, "blobplane memfd")
        median = statistics.median(ratios)
        q1, q3 = quartiles(ratios)
        if size < 64 * MIB:
            verdict = "(no target below 64 MiB)"
        elif median <= 1.0:
            verdict = "target ≤ 1.0x met"
        elif q1 <= 1.0:
            verdict = "target ≤ 1.0x: indistinguishable from raw (1.0 inside the IQR)"
        else:
            verdict = f"target ≤ 1.0x NOT met: {100 * (median - 1):.1f}% slower than raw"
        lines.append(
            f"memfd / raw at {fmt_size(size):>8}: paired median {median:.3f}x "
            f"(IQR {q1:.3f}-{q3:.3f})  {verdict}"
        )
    return lines


def per_blob_overhead(results: list[Result]) -> float:
    """Library minus raw at the smallest size: the fixed Python cost of one blob life."""
    smallest = min(r.size for r in results)
    lib = next(r for r in results if r.size == smallest and r.variant == "blobplane memfd")
    ref = next(r for r in results if r.size == smallest and r.variant == REFERENCE)
    diffs = [a - b for a, b in zip(lib.samples_ns, ref.samples_ns, strict=True)]
    return float(statistics.median(diffs))


def breakdown_table(b: Breakdown) -> Table:
    table = Table(
        title=f"where the time goes: blobplane memfd at {fmt_size(b.size)} "
        f"(median of {b.reps} runs, interleaved with the raw reference)",
    )
    table.add_column("blobplane memfd step")
    table.add_column("median", justify="right")
    table.add_column("faults", justify="right")
    table.add_column("share", justify="right")
    table.add_column("raw reference step")
    table.add_column("median", justify="right")
    table.add_column("faults", justify="right")
    lib_rows = list(b.lib.items())
    raw_rows = list(b.raw.items())
    # Line the raw steps up under the library call that does the same work.
    groups: list[tuple[list[str], list[str]]] = [
        (
            ["create"],
            ["memfd_create+ftruncate", "mmap writable", "pre-fault (MADV_POPULATE_WRITE)"],
        ),
        (["write_all"], ["copy"]),
        (["seal"], ["munmap writable", "F_ADD_SEALS"]),
        (["map_read"], ["mmap read-only"]),
        (["read"], ["read"]),
        (["read again (faults done)"], ["read again (faults done)"]),
        (["close", "cleanup"], ["munmap + close"]),
    ]
    lib_map = dict(lib_rows)
    raw_map = dict(raw_rows)
    for lib_names, raw_names in groups:
        for i in range(max(len(lib_names), len(raw_names))):
            lib_cells = ["", "", "", ""]
            raw_cells = ["", "", ""]
            if i < len(lib_names):
                name = lib_names[i]
                t, f = lib_map[name]
                share = "" if "again" in name else f"{100 * t / b.lib_total_ns:.1f}%"
                lib_cells = [name, fmt_time(t), f"{f:.0f}", share]
            if i < len(raw_names):
                name = raw_names[i]
                t, f = raw_map[name]
                raw_cells = [name, fmt_time(t), f"{f:.0f}"]
            rows = max(len(lib_names), len(raw_names))
            table.add_row(*lib_cells, *raw_cells, end_section=i == rows - 1)
    table.add_row(
        "total (sum of the medians)",
        fmt_time(b.lib_total_ns),
        "",
        "100%",
        "total (sum of the medians)",
        fmt_time(b.raw_total_ns),
        "",
        style="bold",
    )
    return table


def summary_line(b: Breakdown) -> str:
    def share(prefix: str) -> float:
        ns = sum(v for k, v in b.categories.items() if k.startswith(prefix))
        return 100 * ns / b.lib_total_ns

    producer, reader = share("page faults, producer"), share("page faults, reader")
    return (
        f"memfd at {fmt_size(b.size)}: page faults {producer + reader:.0f}% "
        f"(producer {producer:.0f}%, reader {reader:.0f}%), copy {share('copy'):.0f}%, "
        f"read {share('read'):.0f}%, other syscalls and freeing {share('other'):.0f}%; "
        f"Python overhead {100 * b.python_overhead_ns / b.lib_total_ns:.2f}% "
        f"({fmt_time(b.python_overhead_ns)} a blob, included in the above)"
    )


def to_json(results: list[Result], breakdown: Breakdown | None, seconds: float) -> dict[str, Any]:
    refs = {r.size: r.median_ns for r in results if r.variant == REFERENCE}
    data: dict[str, Any] = {
        "environment": environment(),
        "wall_seconds": round(seconds, 1),
        "results": [
            {
                "size": r.size,
                "variant": r.variant,
                "informational": r.informational,
                "runs": len(r.samples_ns),
                "median_ns": r.median_ns,
                "iqr_ns": list(quartiles([float(x) for x in r.samples_ns])),
                "gb_per_s": r.gbps,
                "ratio_to_raw": r.median_ns / refs[r.size],
                "median_minor_faults": statistics.median(r.faults),
                "samples_ns": r.samples_ns,
            }
            for r in results
        ],
        "memfd_vs_raw_paired": {
            str(size): statistics.median(paired_ratios(results, size, "blobplane memfd"))
            for size in sorted(refs)
        },
    }
    if breakdown is not None:
        data["breakdown"] = {
            "size": breakdown.size,
            "runs": breakdown.reps,
            "library_steps": {
                k: {"median_ns": t, "faults": f} for k, (t, f) in breakdown.lib.items()
            },
            "raw_steps": {k: {"median_ns": t, "faults": f} for k, (t, f) in breakdown.raw.items()},
            "library_total_ns": breakdown.lib_total_ns,
            "raw_total_ns": breakdown.raw_total_ns,
            "paired_difference_median_ns": statistics.median(breakdown.paired_difference_ns),
            "python_overhead_per_blob_ns": breakdown.python_overhead_ns,
            "categories_ns": breakdown.categories,
            "categories_share": {
                k: v / breakdown.lib_total_ns for k, v in breakdown.categories.items()
            },
        }
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 runs: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        help="comma-separated sizes such as 4K,1M,64M (default: 4K,1M,64M,512M)",
    )
    parser.add_argument("--reps", type=int, help="runs per size (default: depends on the size)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the breakdown pass")
    args = parser.parse_args(argv)

    plan = dict(QUICK_PLAN if args.quick else DEFAULT_PLAN)
    if args.sizes:
        plan = {size: plan.get(size, 2 if args.quick else 11) for size in args.sizes}
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be at least 1")
        plan = dict.fromkeys(plan, args.reps)

    console = Console(width=None if sys.stdout.isatty() else 140)
    started = time.perf_counter()
    variants, allocators = make_variants()
    try:
        results: list[Result] = []
        for size, reps in plan.items():
            console.print(f"[dim]measuring {fmt_size(size)}: {reps} runs of each variant…[/dim]")
            results += measure_size(size, reps, variants, allocators)
        console.print(results_table(results))
        for line in verdict_lines(results):
            console.print(line)

        breakdown = None
        if not args.no_breakdown:
            size = BREAKDOWN_SIZE if BREAKDOWN_SIZE in plan else max(plan)
            reps = QUICK_BREAKDOWN_REPS if args.quick else BREAKDOWN_REPS
            console.print(f"[dim]breakdown at {fmt_size(size)}: {reps} runs…[/dim]")
            breakdown = measure_breakdown(size, reps, allocators[0], per_blob_overhead(results))
            console.print(breakdown_table(breakdown))
            for name, ns in breakdown.categories.items():
                console.print(
                    f"  {100 * ns / breakdown.lib_total_ns:5.1f}%  {fmt_time(ns):>10}  {name}"
                )
            diffs = breakdown.paired_difference_ns
            q1, q3 = quartiles(diffs)
            console.print(
                f"  Python overhead of the library, included above: "
                f"{fmt_time(breakdown.python_overhead_ns)} a blob (library minus raw, median "
                f"of paired runs at {fmt_size(min(plan))}); at {fmt_size(size)} library minus "
                f"raw is {fmt_time(statistics.median(diffs))} "
                f"(IQR {fmt_time(q1)} to {fmt_time(q3)})"
            )
            console.print(summary_line(breakdown))
    finally:
        for blobs in allocators:
            blobs.close()
    seconds = time.perf_counter() - started
    console.print(f"[dim]{seconds:.0f} s[/dim]")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results, breakdown, seconds), out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
