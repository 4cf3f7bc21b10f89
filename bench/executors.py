"""Large arrays through process pools: pickled, through blobplane.multiprocessing, joblib, torch.

Each run maps a function over a list of tasks on a pool of 2 worker
processes (started with ``spawn`` and warmed up beforehand) and takes the
wall time of the whole map. Workloads:

- ``sum``: each task is a distinct float64 array of SIZE bytes; the worker
  sums it (reading every byte) and returns the float.
- ``return``: each task is an int; the worker fills a SIZE-byte array with it
  and returns it, and the parent sums every result (reading every byte) once
  the map is done.

Variants, interleaved in a new random order each round:

- Pool / ProcessPoolExecutor, pickled: multiprocessing's default, every byte
  through the pipe
- Pool / ProcessPoolExecutor, blobplane: ``blobplane.multiprocessing.install()``
  in the parent before the pool starts (its workers install it too)
- joblib memmapping: ``joblib.Parallel(n_jobs=2, max_nbytes="1M")`` (loky),
  which dumps each large argument to a file in /dev/shm and memory-maps it in
  the worker; results come back pickled (if joblib is installed)
- torch.multiprocessing Pool with tensors (if torch is installed)

``--crossover`` instead times one array through a Pipe to a child that sums
it and answers, pickled and shared, over a range of sizes, and prints from
which size sharing is faster: what ``DEFAULT_THRESHOLD`` is set from.

Run: .venv/bin/python bench/executors.py [--quick] [--crossover] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import blobplane.multiprocessing as bmp
from _common import KIB, MIB, Result, environment, fmt_size, fmt_time

WORKERS = 2
PICKLED, SHARED = "pickled", "blobplane"
JOBLIB, TORCH = "joblib memmapping", "torch.multiprocessing"
NEVER = 1 << 62  # a threshold no array reaches


# -- what the workers run (module level, so spawned workers import them by name) -----------


def total(array: Any) -> float:
    return float(array.sum())


_KEPT: dict[int, Any] = {}


def make_array(seed: int, size: int = 0) -> Any:
    """The worker's result: one array it keeps, refilled in place for each task.

    Not a new array each time: new memory costs a page fault per 4 KiB, which
    on a virtual machine varies from 15 to 400 ms per 64 MiB and would drown
    the transfer being measured. The result is pickled before the next task
    starts, in every variant here, so the refill cannot reach a result in flight.
    """
    kept = _KEPT.get(size)
    if kept is None:
        kept = _KEPT[size] = np.empty(size // 8)
    kept.fill(float(seed))
    return kept


def read_only(array: Any) -> bool:
    return not array.flags.writeable


def torch_total(tensor: Any) -> float:
    return float(tensor.sum().item())


def torch_make(seed: int, size: int) -> Any:
    import torch

    return torch.from_numpy(make_array(seed, size))


# -- variants --------------------------------------------------------------------------------


class Variant:
    """One way to run a map: `run(workload, tasks, size)` returns what the parent got."""

    label: str
    shared: bool = False

    def run(self, fn: Callable[..., Any], tasks: list[Any]) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PoolVariant(Variant):
    def __init__(self, shared: bool) -> None:
        self.shared = shared
        self.label = f"Pool, {SHARED if shared else PICKLED}"
        self.pool = mp.get_context("spawn").Pool(WORKERS)
        self.pool.map(read_only, [np.zeros(4)] * WORKERS)  # the workers are up

    def run(self, fn: Callable[..., Any], tasks: list[Any]) -> list[Any]:
        return self.pool.map(fn, tasks, chunksize=1)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class ExecutorVariant(Variant):
    def __init__(self, shared: bool) -> None:
        self.shared = shared
        self.label = f"ProcessPoolExecutor, {SHARED if shared else PICKLED}"
        self.executor = ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("spawn"))
        list(self.executor.map(read_only, [np.zeros(4)] * WORKERS))

    def run(self, fn: Callable[..., Any], tasks: list[Any]) -> list[Any]:
        return list(self.executor.map(fn, tasks))

    def close(self) -> None:
        self.executor.shutdown()


class JoblibVariant(Variant):
    label = JOBLIB

    def __init__(self) -> None:
        import joblib

        self.joblib = joblib
        self.parallel = joblib.Parallel(n_jobs=WORKERS, max_nbytes="1M", mmap_mode="r")
        self.parallel(joblib.delayed(total)(np.zeros(4)) for _ in range(WORKERS))

    def run(self, fn: Callable[..., Any], tasks: list[Any]) -> list[Any]:
        delayed = self.joblib.delayed
        return list(self.parallel(delayed(fn)(task) for task in tasks))


class TorchVariant(Variant):
    label = TORCH

    def __init__(self) -> None:
        import torch
        import torch.multiprocessing as tmp

        self.torch = torch
        self.pool = tmp.get_context("spawn").Pool(WORKERS)
        self.pool.map(torch_total, [torch.zeros(4)] * WORKERS)

    def run(self, fn: Callable[..., Any], tasks: list[Any]) -> list[Any]:
        if fn is total:
            return list(self.pool.map(torch_total, [self.torch.from_numpy(t) for t in tasks], 1))
        return list(self.pool.starmap(torch_make, [(t, SIZE_OF_RETURN[0]) for t in tasks], 1))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


SIZE_OF_RETURN = [64 * MIB]  # the size the `return` workload makes (torch needs it as an arg)


def start_variants(with_joblib: bool, with_torch: bool) -> list[Variant]:
    """Pickled pools first (started uninstalled), then blobplane's (their workers install it)."""
    variants: list[Variant] = [PoolVariant(False), ExecutorVariant(False)]
    with bmp.installed():
        variants += [PoolVariant(True), ExecutorVariant(True)]
    if with_joblib:
        try:
            variants.append(JoblibVariant())
        except ImportError:
            print("joblib is not installed: its rows are skipped", file=sys.stderr)
    if with_torch:
        try:
            variants.append(TorchVariant())
        except ImportError:
            print("torch is not installed: its rows are skipped", file=sys.stderr)
    return variants


# -- the runs ----------------------------------------------------------------------------------


def one_run(variant: Variant, workload: str, size: int, tasks: list[Any]) -> float:
    """Seconds for one map, checked; blobplane installed in the parent for its variants only."""
    if variant.shared:
        bmp.install()
    try:
        started = time.perf_counter()
        if workload == "sum":
            got = variant.run(total, tasks)
            expected = [float(size // 8)] * len(tasks)
        else:
            SIZE_OF_RETURN[0] = size
            results = variant.run(MAKERS[size], tasks)
            got = [total(r) for r in results]
            del results
            expected = [float(size // 8 * t) for t in tasks]
        elapsed = time.perf_counter() - started
    finally:
        if variant.shared:
            bmp.uninstall()
    if got != expected:
        raise SystemExit(f"{variant.label} {workload}: got {got}, expected {expected}")
    return elapsed


def make_64m(seed: int) -> Any:
    return make_array(seed, 64 * MIB)


def make_8m(seed: int) -> Any:
    return make_array(seed, 8 * MIB)


# The `return` workload's functions by size (module level: the workers import them).
MAKERS: dict[int, Callable[[int], Any]] = {64 * MIB: make_64m, 8 * MIB: make_8m}


def run(plan: list[tuple[str, int, int]], rounds: int, variants: list[Variant]) -> list[Result]:
    results: list[Result] = []
    for workload, size, count in plan:
        if workload == "sum":
            tasks: list[Any] = [np.full(size // 8, 1.0) for _ in range(count)]
        else:
            tasks = list(range(1, count + 1))
        rows = {v.label: Result(workload, size * count, v.label) for v in variants}
        for round_number in range(rounds + 1):  # round 0 warms up
            order = list(variants)
            random.shuffle(order)
            for variant in order:
                elapsed = one_run(variant, workload, size, tasks)
                if round_number:
                    rows[variant.label].samples_ns.append(round(elapsed * 1e9))
        results += rows.values()
        del tasks
    return results


def ratio(results: list[Result], r: Result, baseline: str) -> float | None:
    base = next(
        (x for x in results if x.phase == r.phase and x.size == r.size and x.variant == baseline),
        None,
    )
    return None if base is None else base.median_ns / r.median_ns


def baseline_of(r: Result) -> str:
    """Each blobplane row is compared with the same pool kind, pickled; the others with Pool."""
    kind = r.variant.split(",")[0]
    return f"{kind}, {PICKLED}" if kind in ("Pool", "ProcessPoolExecutor") else f"Pool, {PICKLED}"


def report(results: list[Result], plan: list[tuple[str, int, int]], console: Console) -> None:
    table = Table(title=f"map over {WORKERS} spawned workers: wall time of one map (median)")
    for column in ("workload", "variant", "runs", "median", "GB/s", "x pickled", "x joblib"):
        table.add_column(column, justify="left" if column in ("workload", "variant") else "right")
    for workload, size, count in plan:
        group = [r for r in results if r.phase == workload and r.size == size * count]
        for i, r in enumerate(group):
            vs_pickled = ratio(results, r, baseline_of(r))
            vs_joblib = ratio(results, r, JOBLIB)
            what = "sum" if workload == "sum" else "return"
            table.add_row(
                f"{what} {count} x {fmt_size(size)}" if i == 0 else "",
                r.variant,
                str(len(r.samples_ns)),
                fmt_time(r.median_ns),
                f"{r.gbps:.2f}",
                "-" if vs_pickled is None else f"{vs_pickled:.2f}",
                "-" if vs_joblib is None else f"{vs_joblib:.2f}",
                end_section=i == len(group) - 1,
            )
    console.print(table)


# -- the crossover ------------------------------------------------------------------------------


def _echo_sum(conn: Any) -> None:
    while True:
        array = conn.recv()
        if array is None:
            return
        conn.send(total(array))
        del array


def crossover(sizes: list[int], rounds: int) -> list[Result]:
    """One array through a Pipe to a child that sums it and answers: pickled, then shared."""
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_echo_sum, args=(theirs,))
    child.start()
    results: list[Result] = []
    try:
        for size in sizes:
            array = np.ones(size // 8)
            rows = {label: Result("pipe", size, label) for label in (PICKLED, SHARED)}
            for round_number in range(rounds + 5):
                order = [PICKLED, SHARED]
                random.shuffle(order)
                for label in order:
                    # Installed throughout, so that no round pays for starting the fd server:
                    # a threshold no array reaches pickles as multiprocessing does.
                    bmp.install(threshold=0 if label == SHARED else NEVER)
                    started = time.perf_counter_ns()
                    ours.send(array)
                    ours.recv()
                    elapsed = time.perf_counter_ns() - started
                    if round_number >= 5:
                        rows[label].samples_ns.append(elapsed)
            results += rows.values()
    finally:
        bmp.uninstall()
        ours.send(None)
        child.join(30)
    return results


def crossover_report(results: list[Result], console: Console) -> int | None:
    table = Table(title="one array through a Pipe, summed by the child (median round trip)")
    for column in ("size", "pickled", "blobplane", "x pickled"):
        table.add_column(column, justify="right")
    by_size: dict[int, dict[str, Result]] = {}
    for r in results:
        by_size.setdefault(r.size, {})[r.variant] = r
    wins_from: int | None = None
    for size, pair in sorted(by_size.items()):
        speedup = pair[PICKLED].median_ns / pair[SHARED].median_ns
        if speedup >= 1 and wins_from is None:
            wins_from = size
        elif speedup < 1:
            wins_from = None  # a win must hold for every larger size too
        table.add_row(
            fmt_size(size),
            fmt_time(pair[PICKLED].median_ns),
            fmt_time(pair[SHARED].median_ns),
            f"{speedup:.2f}",
        )
    console.print(table)
    if wins_from is None:
        console.print("sharing never wins over the sizes measured")
    else:
        console.print(f"sharing wins from {fmt_size(wins_from)} up")
    return wins_from


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small arrays, 1 round")
    parser.add_argument("--crossover", action="store_true", help="only the Pipe crossover")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-joblib", action="store_true", help="skip joblib even if installed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args()
    console = Console(width=120)
    started = time.monotonic()
    out: dict[str, Any] = {"environment": environment(), "workers": WORKERS}
    if args.crossover:
        sizes = [s * KIB for s in (64, 128, 256, 512, 768, 1024, 2048, 4096)]
        if not args.quick:
            sizes = [16 * KIB, *sizes, 16 * MIB, 64 * MIB]
        rounds = args.rounds or (5 if args.quick else 40)
        results = crossover(sizes, rounds)
        out["crossover_bytes"] = crossover_report(results, console)
    else:
        if args.quick:
            plan = [("sum", 8 * MIB, 4), ("return", 8 * MIB, 4)]
        else:
            plan = [("sum", 64 * MIB, 8), ("sum", 512 * MIB, 2), ("return", 64 * MIB, 8)]
        rounds = args.rounds or (1 if args.quick else 5)
        variants = start_variants(not args.no_joblib, not args.quick)
        try:
            results = run(plan, rounds, variants)
        finally:
            for variant in variants:
                variant.close()
        report(results, plan, console)
    out["wall_seconds"] = round(time.monotonic() - started, 1)
    out["results"] = [
        r.to_json(
            ratio_to_pickled=ratio(results, r, baseline_of(r) if r.phase != "pipe" else PICKLED),
            ratio_to_joblib=ratio(results, r, JOBLIB),
        )
        for r in results
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
