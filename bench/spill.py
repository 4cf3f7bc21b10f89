"""Benchmark of spilling: how fast the broker moves idle blobs to disk and back, against the disk.

Run it with `make bench` or `.venv/bin/python bench/spill.py [--quick] [--json PATH]
[--dir DIR]`. It starts its own broker, ``blobplane serve --memory-limit LIMIT
--spill-dir DIR/.../spill``, and measures the disk on the same folder DIR
(default: the system's temporary folder). Each round:

- spill: N blobs of SIZE put into the broker, whose limit holds LIMIT bytes:
  from the LIMIT / SIZE + 1st put on, each put spills the least recently used
  blob, and the next put waits until it has, so that nothing else runs
  meanwhile. The rate is the bytes over the broker's own time for the files
  (the ``seconds`` of its ``blob.spilled`` log lines: the thread's time to
  create the file, write it, take its CRC-32 and close it), not the puts'.
- disk write: before each of those puts, a file of SIZE bytes written into
  DIR in writes of the broker's chunk size (`blobplane.broker.spill.CHUNK`)
  from memory that holds all the data (not one chunk again and again, which
  the CPU cache would hold), closed without fsync: the broker does not fsync
  its spill files either, so both rates are those of the page cache taking
  the data until the kernel writes it back.
- restore: the blobs still in memory are deleted, then each spilled blob is
  got (one at a time, so that no restore has to spill another), compared
  with what was put, released and deleted. The rate is the bytes over the
  broker's ``seconds`` of its ``blob.restored`` lines: a new memfd filled
  from the file by sendfile, the CRC-32 of each chunk, the seals. The get as
  the client sees it (the request, the restore, the reply, the mapping) is
  timed too.
- disk read: beside each restore, one of the baseline files read into memory
  that holds them all (faulted in beforehand), in reads of the chunk size.
  Half the pairs warm: both files as they are, in the page cache (without
  root the cache cannot be dropped for the whole host, and the bench does not
  try). Half cold: both files written back and dropped from the cache first
  (fdatasync, then POSIX_FADV_DONTNEED, which needs no root): from the disk.

Each spill or restore takes turns with its baseline file, so that both run
under the same conditions (dirty pages waiting for writeback, the load of
other processes). GB/s is bytes / seconds summed over a round; the table
shows the median over rounds, the verdicts the median of the per-round
ratios. Targets: spill and restore at least 70% of the disk's own write and
read rates; the restore of a file still in the page cache is compared with a
read from the page cache too, for information (that is memory's rate, not
the disk's). Compare within one run, never across runs.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from _common import GIB, MIB, environment, fmt_size
from blobplane.backends.kernel import filesystem_magic
from blobplane.broker.process import BrokerProcess, start_broker
from blobplane.broker.spill import CHUNK, LOCK_NAME, spill_name
from blobplane.client import BrokerClient, connect_broker
from blobplane.types import BlobId

TARGET = 0.7
DEFAULT = {"size": 64 * MIB, "blobs": 16, "memory_limit": 256 * MIB, "rounds": 3}
QUICK = {"size": 8 * MIB, "blobs": 6, "memory_limit": 16 * MIB, "rounds": 1}
REPLY_TIMEOUT_S = 120.0
_EVENT = re.compile(r"event=blob\.(spilled|restored) blob=(\S+) size=(\d+) seconds=([0-9.]+)")
_FILESYSTEMS = {
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x794C7630: "overlayfs",
    0x6969: "nfs",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
}

SPILL = "spill (write + CRC-32)"
DISK_WRITE = "disk write, no fsync"
RESTORE_WARM = "restore, file in the page cache"
RESTORE_COLD = "restore, file dropped from the cache"
READ_WARM = "disk read, in the page cache"
READ_COLD = "disk read, dropped from the cache"
GET_WARM = "get of a spilled blob (client), warm"
GET_COLD = "get of a spilled blob (client), cold"
PAIRS = ((SPILL, DISK_WRITE), (RESTORE_WARM, READ_WARM), (RESTORE_COLD, READ_COLD))
# The targets are against the disk's own rates: a read from the page cache is
# memory's rate, not the disk's, so that pair is shown without a verdict.
JUDGED = frozenset({SPILL, RESTORE_COLD})


@dataclass
class Rates:
    """One measurement's bytes and seconds per round."""

    what: str
    rounds: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds)
    per_item_s: list[float] = field(default_factory=list)

    def add(self, size: int, seconds: float) -> None:
        if not self.rounds:
            self.rounds.append((0, 0.0))
        total, spent = self.rounds[-1]
        self.rounds[-1] = (total + size, spent + seconds)
        self.per_item_s.append(seconds)

    def next_round(self) -> None:
        self.rounds.append((0, 0.0))

    @property
    def per_round_gbps(self) -> list[float]:
        return [b / s / 1e9 for b, s in self.rounds if s > 0]

    @property
    def gbps(self) -> float:
        rates = self.per_round_gbps
        return statistics.median(rates) if rates else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "rounds": len(self.per_round_gbps),
            "bytes_per_round": [b for b, _ in self.rounds],
            "seconds_per_round": [s for _, s in self.rounds],
            "gb_per_s_per_round": self.per_round_gbps,
            "gb_per_s": self.gbps,
            "median_item_ms": statistics.median(self.per_item_s) * 1e3 if self.per_item_s else None,
        }


# --------------------------------------------------------------------------- the disk


def make_source(total: int) -> mmap.mmap:
    """*total* bytes of random data in memory faulted in (what the files are written from)."""
    source = mmap.mmap(-1, total)
    rng = np.random.default_rng(1)
    view = np.frombuffer(source, dtype=np.uint8)
    for start in range(0, total, 64 * MIB):
        length = min(64 * MIB, total - start)
        view[start : start + length] = rng.integers(0, 256, length, np.uint8)
    del view
    return source


def write_file(path: str, view: memoryview, offset: int, size: int) -> float:
    """Write *size* bytes of *view* from *offset* to a new file in chunks; return the seconds."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < size:
            with view[offset + done : offset + min(size, done + CHUNK)] as part:
                done += os.write(fd, part)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read_file(path: str, view: memoryview, offset: int, size: int) -> float:
    """Read the file into *view* at *offset* in chunks; return the seconds."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < size:
            with view[offset + done : offset + min(size, done + CHUNK)] as part:
                got = os.readv(fd, [part])
            if got == 0:
                raise SystemExit(f"{path} ended early")
            done += got
    finally:
        os.close(fd)
    return time.perf_counter() - start


def drop_from_cache(path: str) -> None:
    """Write the file back and drop its pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the broker


class Broker:
    """The broker under test, and its log, read as it grows."""

    def __init__(self, folder: str, memory_limit: int) -> None:
        self.spill = os.path.join(folder, "spill")
        self.handle: BrokerProcess = start_broker(
            os.path.join(folder, "b.sock"),
            "--memory-limit",
            str(memory_limit),
            "--spill-dir",
            self.spill,
            "--log-level",
            "debug",
        )
        self._read = 0

    def events(self) -> list[tuple[str, str, int, float]]:
        """The spill and restore lines logged since the last call."""
        with open(self.handle.log_path, encoding="utf-8", errors="replace") as log:
            log.seek(self._read)
            text = log.read()
        complete = text.rfind("\n") + 1
        self._read += len(text[:complete].encode())
        return [
            (m.group(1), m.group(2), int(m.group(3)), float(m.group(4)))
            for m in _EVENT.finditer(text[:complete])
        ]

    def wait_for(self, kind: str, count: int, into: Rates, timeout: float = 120.0) -> None:
        """Collect the next *count* lines of *kind* into *into* as the broker logs them."""
        deadline = time.monotonic() + timeout
        while count > 0:
            for found, _, size, seconds in self.events():
                if found == kind:
                    count -= 1
                    into.add(size, seconds)
            if count > 0 and time.monotonic() > deadline:
                raise SystemExit(f"the broker logged {count} {kind} lines fewer than expected")
            if count > 0:
                time.sleep(0.002)

    def stop(self) -> None:
        status = self.handle.stop()
        if status != 0:
            with open(self.handle.log_path, encoding="utf-8", errors="replace") as log:
                raise SystemExit(f"the broker exited with status {status}\n{log.read()}")


@dataclass
class Run:
    """What every round uses: the broker and its client, the memory, the results."""

    client: BrokerClient
    broker: Broker
    folder: str
    plan: dict[str, int]
    source: mmap.mmap  # the data: every blob and every baseline file
    target: mmap.mmap  # where the baseline reads land
    rates: dict[str, Rates]


def one_round(run: Run, seed: int) -> None:
    """Spills and restores, each beside a baseline file of its size, taking turns.

    Taking turns, one of each at a time, puts both under the same conditions
    (the dirty pages waiting for writeback, the other processes' load).
    """
    client, broker, rates = run.client, run.broker, run.rates
    size, count = run.plan["size"], run.plan["blobs"]
    fits = run.plan["memory_limit"] // size
    for measured in rates.values():
        measured.next_round()
    baseline = os.path.join(run.folder, "baseline")
    os.mkdir(baseline)
    ids: list[BlobId] = []
    paths: list[str] = []
    with memoryview(run.source) as source:
        for index in range(count):
            if index >= fits:
                path = os.path.join(baseline, str(index))
                rates[DISK_WRITE].add(size, write_file(path, source, index * size, size))
                paths.append(path)
            with source[index * size : (index + 1) * size] as part:
                ids.append(client.put_bytes(part).blob_id)
            if index >= fits:
                # One spill at a time, nothing else running: the rate is the spill's own.
                broker.wait_for("spilled", 1, rates[SPILL])
    spilled = [entry.blob_id for entry in client.list() if entry.state == "spilled"]
    for entry in client.list():
        if entry.state != "spilled":
            client.delete(entry.blob_id)
    if len(spilled) != len(paths):
        raise SystemExit(f"{len(spilled)} blobs were spilled, {len(paths)} expected")
    rng = random.Random(seed)
    cold = set(rng.sample(range(len(paths)), len(paths) // 2))
    with memoryview(run.target) as target:
        for pair, (blob_id, path) in enumerate(zip(spilled, paths, strict=True)):
            is_cold = pair in cold
            if is_cold:
                drop_from_cache(path)
                drop_from_cache(os.path.join(broker.spill, spill_name(blob_id)))
            offset = pair * size
            if pair % 2:  # the baseline first in one pair, second in the next
                seconds = read_file(path, target, offset, size)
            restored = restore(run, blob_id, ids.index(blob_id), is_cold)
            if not pair % 2:
                seconds = read_file(path, target, offset, size)
            rates[READ_COLD if is_cold else READ_WARM].add(size, seconds)
            broker.wait_for("restored", 1, rates[RESTORE_COLD if is_cold else RESTORE_WARM])
            rates[GET_COLD if is_cold else GET_WARM].add(size, restored)
    shutil.rmtree(baseline)
    stats = client.stats()
    left = sorted(set(os.listdir(broker.spill)) - {LOCK_NAME})
    if stats.blobs or stats.bytes or left:
        raise SystemExit(f"the broker still holds {stats.blobs} blobs, spill files {left}")


def restore(run: Run, blob_id: BlobId, index: int, cold: bool) -> float:
    """Get the spilled blob, check every byte, release and delete it; return the get's seconds."""
    size = run.plan["size"]
    start = time.perf_counter()
    with run.client.get(blob_id) as mapped:
        seconds = time.perf_counter() - start
        expected = np.frombuffer(run.source, np.uint8, size, index * size)
        if not np.array_equal(np.frombuffer(mapped.as_slice(), np.uint8), expected):
            raise SystemExit(f"blob {blob_id} came back different")
        del expected
    run.client.delete(blob_id)
    return seconds


# --------------------------------------------------------------------------- output


def verdicts(rates: dict[str, Rates]) -> list[dict[str, Any]]:
    out = []
    for ours, disk in PAIRS:
        if not rates[ours].per_round_gbps or not rates[disk].per_round_gbps:
            continue
        # Per round (the same minutes of the same disk), then the median.
        ratios = [
            a / b
            for a, b in zip(rates[ours].per_round_gbps, rates[disk].per_round_gbps, strict=False)
        ]
        value = statistics.median(ratios)
        out.append(
            {
                "what": f"{ours} / {disk}",
                "target": f">= {TARGET:.0%}" if ours in JUDGED else "-",
                "value": value,
                "ratios": ratios,
                "met": value >= TARGET if ours in JUDGED else None,
                "detail": f"{value:.0%} ({rates[ours].gbps:.2f} / {rates[disk].gbps:.2f} GB/s)",
            }
        )
    return out


def table(rates: dict[str, Rates], plan: dict[str, int]) -> Table:
    out = Table(
        title=f"spilling {plan['blobs']} blobs of {fmt_size(plan['size'])} "
        f"past a limit of {fmt_size(plan['memory_limit'])}",
    )
    for name in ("what", "GB/s", "per round", "median per blob or file"):
        out.add_column(name, justify="left" if name == "what" else "right")
    for measured in rates.values():
        rounds = ", ".join(f"{r:.2f}" for r in measured.per_round_gbps)
        item = measured.to_json()["median_item_ms"]
        out.add_row(
            measured.what,
            f"{measured.gbps:.2f}",
            rounds,
            "-" if item is None else f"{item:.1f} ms",
        )
    return out


def filesystem(folder: str) -> str:
    magic = filesystem_magic(folder)
    if magic is None:
        return "unknown"
    return _FILESYSTEMS.get(magic, f"0x{magic:x}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small blobs, one round")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--dir", default=tempfile.gettempdir(), help="the folder (the disk) to measure on"
    )
    args = parser.parse_args(argv)
    args.plan = dict(QUICK if args.quick else DEFAULT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = args.plan
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = time.perf_counter()
    rates = {
        name: Rates(name)
        for name in (
            SPILL,
            DISK_WRITE,
            RESTORE_WARM,
            READ_WARM,
            RESTORE_COLD,
            READ_COLD,
            GET_WARM,
            GET_COLD,
        )
    }
    total = plan["size"] * plan["blobs"]
    if total > 4 * GIB:
        raise SystemExit("keep size * blobs under 4 GiB: the bench holds it all in memory")
    folder = tempfile.mkdtemp(prefix="bp-bench-spill-", dir=args.dir)
    fs = filesystem(folder)
    notes = [
        f"the folder is on {fs}; the read baseline's warm half comes from the page cache, "
        "its cold half from the disk (fdatasync + POSIX_FADV_DONTNEED per file)"
    ]
    try:
        source = make_source(total)
        target = mmap.mmap(-1, total)
        target.madvise(mmap.MADV_WILLNEED)
        np.frombuffer(target, np.uint8)[:] = 1  # faulted in: the reads measure the disk
        broker = Broker(folder, plan["memory_limit"])
        try:
            with connect_broker(
                broker.handle.socket_path, timeout=REPLY_TIMEOUT_S, name="bench-spill"
            ) as client:
                for round_index in range(plan["rounds"]):
                    console.print(
                        f"[dim]round {round_index + 1} of {plan['rounds']}: {plan['blobs']} "
                        f"blobs of {fmt_size(plan['size'])}…[/dim]"
                    )
                    run = Run(client, broker, folder, plan, source, target, rates)
                    one_round(run, round_index)
        finally:
            broker.stop()
        source.close()
        target.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    judged = verdicts(rates)
    console.print(table(rates, plan))
    for note in notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    for verdict in judged:
        mark = {True: "met", False: "NOT met", None: "(information)"}[verdict["met"]]
        console.print(f"{verdict['what']}: {verdict['detail']}  target {verdict['target']} {mark}")
    seconds = time.perf_counter() - started
    console.print(f"[dim]{seconds:.0f} s[/dim]")
    if args.json:
        env = environment()
        env["conditions"] = f"spill folder on {fs}, chunk {fmt_size(CHUNK)}"
        data = {
            "environment": env,
            "wall_seconds": round(seconds, 1),
            "notes": notes,
            "plan": plan,
            "filesystem": fs,
            "results": [measured.to_json() for measured in rates.values()],
            "verdicts": judged,
        }
        with open(args.json, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
