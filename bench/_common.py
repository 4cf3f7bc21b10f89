"""What the benchmarks share: reading every byte, the raw memfd steps, formatting, leak counts,
and the result tables of the handoff benchmarks.

The benchmarks import this as ``_common`` (each runs as a script from this
folder, so the folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.table import Table

import blobplane

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

MADV_POPULATE_WRITE = 23
MFD_NOEXEC_SEAL = 0x0008  # the library passes it too (Linux 6.3+), falling back without it
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
U64_MASK = (1 << 64) - 1


# --------------------------------------------------------------------------- reading


def read_every_byte(view: memoryview) -> int:
    """Touch every byte of *view*: a wrapping uint64 sum, plus the bytes past the last 8."""
    n = view.nbytes
    words = n // 8
    total = 0
    if words:
        total = int(np.frombuffer(view, dtype=np.uint64, count=words).sum())
    if n % 8:
        total += int(np.frombuffer(view, dtype=np.uint8, offset=words * 8).sum())
    return total & U64_MASK


def make_payload(size: int) -> bytes:
    return np.random.default_rng(size).bytes(size)


# --------------------------------------------------------------------------- raw memfd


def _memfd_flags() -> int:
    """The flags the library uses: CLOEXEC | ALLOW_SEALING | NOEXEC_SEAL where it exists."""
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        os.close(os.memfd_create("bench-probe", flags | MFD_NOEXEC_SEAL))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return flags
    return flags | MFD_NOEXEC_SEAL


MFD_FLAGS = _memfd_flags()


# --------------------------------------------------------------------------- formatting


def fmt_size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": KIB, "M": MIB, "G": GIB}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    value = int(number) * scale
    if value <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return value


def fmt_time(ns: float) -> str:
    if ns < 0:
        return "-" + fmt_time(-ns)
    if ns >= 1e9:
        return f"{ns / 1e9:.3f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.1f} µs"


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


# --------------------------------------------------------------------------- accounting


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def blob_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "/memfd:" in line or "blobplane-" in line)


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blobplane": blobplane.__version__,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
            "",
        )
        # The CPU says whether it runs under a hypervisor (a virtual machine).
        flags = next(
            (line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []
        )
        info["virtual_machine"] = "hypervisor" in flags
    except OSError:
        pass
    for key, path in (
        ("thp_shmem", "/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        ("thp_anon", "/sys/kernel/mm/transparent_hugepage/enabled"),
    ):
        try:
            with open(path) as f:
                info[key] = f.read().strip()
        except OSError:
            pass
    return info


# --------------------------------------------------------------------------- result tables


@dataclass
class Result:
    """One variant's times for one phase ("latency" or "throughput") and payload size."""

    phase: str
    size: int
    variant: str
    samples_ns: list[int] = field(default_factory=list)

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples_ns)

    @property
    def p99_ns(self) -> float:
        if len(self.samples_ns) < 2:
            return float(self.samples_ns[0])
        return statistics.quantiles(self.samples_ns, n=100, method="inclusive")[98]

    @property
    def gbps(self) -> float:
        return self.size / self.median_ns  # bytes per ns == GB/s

    @property
    def iqr(self) -> str:
        q1, q3 = quartiles([float(x) for x in self.samples_ns])
        return f"{fmt_time(q1)}-{fmt_time(q3)}"

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """This result for a benchmark's JSON, with *extra* fields before the samples."""
        return {
            "phase": self.phase,
            "size": self.size,
            "variant": self.variant,
            "runs": len(self.samples_ns),
            "median_ns": self.median_ns,
            "p99_ns": self.p99_ns,
            "iqr_ns": list(quartiles([float(x) for x in self.samples_ns])),
            "gb_per_s": self.gbps,
            **extra,
            "samples_ns": self.samples_ns,
        }


def _table(title: str, caption: str, columns: list[str]) -> Table:
    table = Table(title=title, caption=caption)
    for name in columns:
        table.add_column(name, justify="left" if name == "variant" else "right")
    return table


def latency_table(
    results: list[Result],
    *,
    title: str,
    caption: str,
    ratios: tuple[str, str],
    ratio_cells: Callable[[Result], tuple[str, str]],
    bold: Callable[[Result], bool] = lambda r: False,
) -> Table:
    """A row per result (the caller picks the phase): runs, p50, p99, IQR, two ratio columns."""
    table = _table(title, caption, ["variant", "runs", "p50", "p99", "IQR", *ratios])
    for r in results:
        table.add_row(
            r.variant,
            str(len(r.samples_ns)),
            fmt_time(r.median_ns),
            fmt_time(r.p99_ns),
            r.iqr,
            *ratio_cells(r),
            style="bold" if bold(r) else "",
        )
    return table


def throughput_table(
    results: list[Result],
    *,
    title: str,
    caption: str,
    ratio: str,
    ratio_cell: Callable[[Result], str],
    bold: Callable[[Result], bool] = lambda r: False,
) -> Table:
    """The throughput rows grouped by size: runs, median, IQR, GB/s and a ratio column."""
    table = _table(title, caption, ["size", "variant", "runs", "median", "IQR", "GB/s", ratio])
    by_size: dict[int, list[Result]] = {}
    for r in results:
        if r.phase == "throughput":
            by_size.setdefault(r.size, []).append(r)
    for size, group in by_size.items():
        for i, r in enumerate(group):
            table.add_row(
                fmt_size(size) if i == 0 else "",
                r.variant,
                str(len(r.samples_ns)),
                fmt_time(r.median_ns),
                r.iqr,
                f"{r.gbps:.2f}",
                ratio_cell(r),
                style="bold" if bold(r) else "",
                end_section=i == len(group) - 1,
            )
    return table
