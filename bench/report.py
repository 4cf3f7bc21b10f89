"""The performance tables of the documentation, built from the benchmarks' JSON.

`make bench` runs every benchmark with ``--json bench/results/DATE/NAME.json``
and then this script, which renders the tables as Markdown into the marked
sections of the docs::

    .venv/bin/python bench/report.py bench/results/DATE --write docs/performance.md README.md

A marked section starts with ``<!-- bench/report.py: full FOLDER -->`` (every
table), ``<!-- bench/report.py: headline FOLDER -->`` (a few figures) or
``<!-- bench/report.py: spill FOLDER -->`` (the spilling table alone) and
ends with ``<!-- end bench/report.py -->``; everything between is replaced
by the report of the JSON in FOLDER. Given a folder, the script renders that
one and names it in the markers; without, each section is rendered again from
the folder it names. ``--check`` changes nothing and exits 1 when a file is
not what its JSON gives (the docs test runs it). Without ``--write`` the full
report of the folder goes to stdout.

Each table states where its figures come from: the date, the machine, the
kernel and Python of the run, as the benchmark recorded them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from _common import fmt_size, fmt_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ("core", "hugepages", "channel", "streams", "ring", "objects", "broker", "spill")
BEGIN = re.compile(r"<!-- bench/report\.py: (\w+) (\S+) -->\n")
END = "<!-- end bench/report.py -->"

Row = Sequence[str]
Data = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def table(
    headers: Sequence[str], rows: Iterable[Row], left: int = 1, align: str | None = None
) -> str:
    """A Markdown table; the first *left* columns are aligned left, the rest right.

    *align* ("l" or "r" per column) overrides *left*.
    """
    align = align or "".join("l" if i < left else "r" for i in range(len(headers)))
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("| " + " | ".join(":--" if a == "l" else "--:" for a in align) + " |")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ns(value: float | None) -> str:
    return "-" if value is None else fmt_time(value)


def ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def iqr(pair: Sequence[float] | None) -> str:
    return "-" if not pair else f"{fmt_time(pair[0])}-{fmt_time(pair[1])}"


def grouped(rows: list[list[str]], key_columns: int = 1) -> list[list[str]]:
    """Blank the leading cells that repeat the row above (the size of a group of rows)."""
    out: list[list[str]] = []
    previous: list[str] | None = None
    for row in rows:
        shown = list(row)
        if previous is not None and row[:key_columns] == previous[:key_columns]:
            shown[:key_columns] = [""] * key_columns
        out.append(shown)
        previous = row
    return out


def source(data: Data) -> str:
    """Where the figures come from: date, machine, kernel, Python, conditions."""
    env: dict[str, Any] = data.get("environment", {})
    when = str(env.get("time", "an unrecorded date"))
    date = when[:10]
    clock = f" {when[11:16]} UTC" if len(when) >= 16 and when.endswith("+0000") else ""
    parts = [f"Measured on {date}{clock} on {machine(env)}"]
    if env.get("cpu"):
        parts.append(f"({env['cpu']})")
    details = [f"Linux {env['kernel']}" if env.get("kernel") else "", ""]
    details[1] = f"Python {env['python']}" if env.get("python") else ""
    if env.get("numpy"):
        details.append(f"numpy {env['numpy']}")
    if env.get("ray"):
        details.append(f"Ray {env['ray']}")
    text = " ".join(parts) + ", " + ", ".join(d for d in details if d) + "."
    if data.get("wall_seconds", 0) >= 1:
        text += f" The run took {data['wall_seconds']:.0f} s."
    if env.get("conditions"):
        text += f" Conditions: {env['conditions']}."
    if env.get("source"):
        text += f" Figures {env['source']}."
    return f"*{text}*"


def median(value: float | list[float]) -> float:
    """A figure the benchmark gives once, or per round (then their median)."""
    return statistics.median(value) if isinstance(value, list) else value


def target(value: object) -> str:
    """A target as the benchmark wrote it: a ratio not to exceed, or its own words."""
    if value is None:
        return "-"
    return f"<= {value}x" if isinstance(value, int | float) else str(value)


def machine(env: dict[str, Any]) -> str:
    """The machine as the run recorded it: "a 2-CPU virtual machine"."""
    if env.get("machine"):
        return str(env["machine"])
    kind = "virtual machine" if env.get("virtual_machine") else "machine"
    return f"a {env.get('cpus', '?')}-CPU {kind}"


def verdict_mark(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "(no target)"}[met]


def find(rows: list[Data], **match: Any) -> Data | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


# --------------------------------------------------------------------------- per benchmark


def core(data: Data) -> str:
    rows = [
        [
            fmt_size(r["size"]),
            r["variant"],
            str(r["runs"]),
            fmt_time(r["median_ns"]),
            iqr(r.get("iqr_ns")),
            f"{r['gb_per_s']:.2f}",
            f"{r['ratio_to_raw']:.3f}",
            f"{r['median_minor_faults']:.0f}",
        ]
        for r in data["results"]
    ]
    out = [
        "### The core: one blob's life in one process",
        "",
        "`bench/core.py`: create + fill + seal + `map_read` + read every byte + cleanup, "
        "per backend, against the same steps done with raw syscalls.",
        "",
        source(data),
        "",
        table(
            ["size", "variant", "runs", "median", "IQR", "GB/s", "x raw", "faults"],
            grouped(rows),
            left=2,
        ),
        "",
        "x raw: median over the raw reference's median (below 1 is faster); faults: minor "
        "page faults per run; IQR: 25th to 75th percentile.",
    ]
    paired = data.get("memfd_vs_raw_paired") or {}
    if paired:
        cells = ", ".join(f"{fmt_size(int(s))} {v:.3f}x" for s, v in paired.items())
        out += ["", f"blobplane memfd over raw, median of paired runs: {cells}."]
    breakdown = data.get("breakdown")
    if breakdown:
        out += [
            "",
            f"Where the time goes, blobplane memfd at {fmt_size(breakdown['size'])}:",
            "",
            table(
                ["step", "share", "time"],
                [
                    [k, f"{100 * breakdown['categories_share'][k]:.1f}%", fmt_time(v)]
                    for k, v in breakdown["categories_ns"].items()
                ],
            ),
        ]
        overhead = breakdown.get("python_overhead_per_blob_ns")
        if overhead is not None:
            out += [
                "",
                f"The library's own Python code costs {fmt_time(overhead)} a blob "
                "(library minus raw, median of paired runs at the smallest size).",
            ]
    return "\n".join(out)


def hugepages(data: Data) -> str:
    rows = [
        [
            fmt_size(r["size"]),
            r["setting"],
            str(r["runs"]),
            f"{r['gb_per_s']:.2f}",
            ratio(r.get("ratio_to_machine_setting")),
        ]
        for r in data["results"]
    ]
    advise = find(data["results"], size=64 * 1024 * 1024, setting="advise")
    met = None
    if advise is not None and advise.get("ratio_to_machine_setting") is not None:
        met = advise["ratio_to_machine_setting"] >= data["target_ratio_at_64MiB"]
    return "\n".join(
        [
            "### Huge pages: a fresh sealed blob",
            "",
            "`bench/hugepages.py`: create + fill + seal + `map_read` + read every byte + "
            "cleanup of a memfd blob, under the machine's shmem_enabled setting "
            f"(`{data['machine_setting']}`) and, run as root, under `advise`, where "
            "blobplane asks for 2 MiB pages (the setting is restored afterwards), and "
            "from huge pages reserved for the run (`SharedMemoryBlobs(reserved_huge_pages="
            "True)`, under the machine's setting).",
            "",
            source(data),
            "",
            table(["size", "pages", "runs", "GB/s", "x machine's"], grouped(rows), left=2),
            "",
            f"Target: `advise` at least {data['target_ratio_at_64MiB']}x the 4 KiB-page "
            f"path at 64 MiB: {verdict_mark(met)}.",
        ]
    )


def _latency_rows(results: list[Data], phase: str, reference: str | None) -> list[list[str]]:
    ref = find(results, phase=phase, variant=reference) if reference else None
    rows = []
    for r in results:
        if r["phase"] != phase:
            continue
        cells = [
            r["variant"],
            str(r["runs"]),
            fmt_time(r["median_ns"]),
            ns(r.get("p99_ns")),
            iqr(r.get("iqr_ns")),
        ]
        if ref is not None:
            cells.append(ratio(r["median_ns"] / ref["median_ns"]))
            p99, ref_p99 = r.get("p99_ns"), ref.get("p99_ns")
            cells.append(ratio(p99 / ref_p99) if p99 and ref_p99 else "-")
        rows.append(cells)
    return rows


def channel(data: Data) -> str:
    results: list[Data] = data["results"]
    reference = "raw memfd + send_fds (reference)"
    out = [
        "### The channel: a blob to another process",
        "",
        "`bench/channel.py`: this process produces, and every variant has a consumer "
        "process of its own. Latency: a prepared 4 KiB payload, from the send until the "
        "consumer says it holds it. Throughput: one whole handoff per run, fresh memory "
        "each time, until the producer hears that the consumer read every byte.",
        "",
        source(data),
    ]
    titles = {"latency": "each handoff cold", "latency, back to back": "back to back"}
    for phase, title in titles.items():
        rows = _latency_rows(results, phase, reference)
        if rows:
            out += [
                "",
                f"Handoff latency, 4 KiB, {title}:",
                "",
                table(["variant", "runs", "p50", "p99", "IQR", "x raw p50", "x raw p99"], rows),
            ]
    rows = [
        [
            fmt_size(r["size"]),
            r["variant"],
            str(r["runs"]),
            fmt_time(r["median_ns"]),
            iqr(r.get("iqr_ns")),
            f"{r['gb_per_s']:.2f}",
            f"{r['ratio_to_raw']:.3f}",
        ]
        for r in results
        if r["phase"] == "throughput"
    ]
    out += [
        "",
        "Throughput, a fresh blob per handoff, the consumer reads every byte:",
        "",
        table(["size", "variant", "runs", "median", "IQR", "GB/s", "x raw"], grouped(rows), 2),
    ]
    out += verdict_table(
        data,
        ["what", "paired median", "IQR", "target"],
        lambda v: [
            v["what"],
            f"{v['paired_median_ratio']:.3f}x",
            f"{v['paired_iqr'][0]:.3f}-{v['paired_iqr'][1]:.3f}",
            target(v["target"]),
        ],
        "blobplane over raw, median of paired runs:",
    )
    out += notes(data)
    return "\n".join(out)


def verdict_table(
    data: Data, columns: list[str], cells: Callable[[Data], list[str]], heading: str = ""
) -> list[str]:
    """The benchmark's verdicts, one row each: *cells* of a verdict, then whether it was met."""
    verdicts = data.get("verdicts") or []
    if not verdicts:
        return []
    rows = [[*cells(v), verdict_mark(v["met"])] for v in verdicts]
    return ["", *([heading, ""] if heading else []), table([*columns, "verdict"], rows)]


def notes(data: Data) -> list[str]:
    found = data.get("notes") or []
    return ["", *(f"Note: {note}" for note in found)] if found else []


def streams(data: Data) -> str:
    results: list[Data] = data["results"]
    rows = [
        [
            fmt_size(r["size"]),
            str(r["subscribers"]),
            r["variant"],
            f"{r['frames_per_s']:,.0f}" if r["frames_per_s"] >= 100 else f"{r['frames_per_s']:.1f}",
            f"{r['gb_per_s']:.2f}",
            f"{r['ratio_to_reference']:.2f}",
            ns(r.get("latency_ns_p50")),
            ns(r.get("latency_ns_p99")),
            ns(r.get("round_trip_ns_p50")),
            ns(r.get("round_trip_ns_p99")),
        ]
        for r in results
    ]
    out = [
        "### Streams: frames to subscriber processes",
        "",
        "`bench/streams.py`: frames published to one and to four subscribers, each a "
        "process that reads every byte of every frame in place. frames/s and GB/s: "
        "pipelined rounds, 4 frames in flight. Latency: one frame in flight, publish to "
        "receive. Round trip: publish, receive, read, release seen by the publisher, with "
        "the subscriber asleep before each frame. x ref: time per frame over the "
        "in-process reference's (one copy and one read per subscriber).",
        "",
        source(data),
        "",
        table(
            [
                "size",
                "subs",
                "variant",
                "frames/s",
                "GB/s",
                "x ref",
                "latency p50",
                "latency p99",
                "round trip p50",
                "round trip p99",
            ],
            grouped(rows, 2),
            left=3,
        ),
    ]
    burst = [
        [
            fmt_size(r["size"]),
            str(r["subscribers"]),
            r["variant"],
            ns(r["back_to_back_round_trip_ns_p50"]),
            ns(r["back_to_back_round_trip_ns_p99"]),
        ]
        for r in results
        if r.get("back_to_back_round_trip_ns_p50") is not None
    ]
    if burst:
        out += [
            "",
            "Round trip with frames back to back (a busy stream, one frame in flight):",
            "",
            table(["size", "subs", "variant", "round trip p50", "round trip p99"], burst, 3),
        ]
    out += verdict_table(data, ["what", "measured"], lambda v: [v["what"], v["detail"]])
    out += notes(data)
    return "\n".join(out)


def ring(data: Data) -> str:
    rows = [
        [
            r["placement"],
            r["variant"],
            ns(r["one_way_ns_p50"]),
            ns(r["one_way_ns_p99"]),
            ns(r["round_trip_ns_p50"]),
            ns(r["round_trip_ns_p99"]),
        ]
        for r in data["ring"]
    ]
    return "\n".join(
        [
            "### The wake-up experiment",
            "",
            "`bench/streams.py --experiment ring`, raw code with no library around it: 4 KiB "
            "frames in a shared memfd, one frame in flight, a message per frame against an "
            "index ring in shared memory with an eventfd wake-up.",
            "",
            source(data),
            "",
            table(
                [
                    "placement",
                    "variant",
                    "one-way p50",
                    "one-way p99",
                    "round trip p50",
                    "round trip p99",
                ],
                grouped(rows),
                left=2,
            ),
        ]
    )


QUEUE = "multiprocessing.Queue"
RAY_OBJECTS = "Ray put/get"
RAW_OBJECTS = "raw bytes, blobplane channel"
SEALED_OBJECTS = "blobplane objects, sealed=True (fresh blob)"


def objects(data: Data) -> str:
    results: list[Data] = data["results"]
    rows = []
    for r in results:
        queue = find(results, payload=r["payload"], variant=QUEUE)
        ray = find(results, payload=r["payload"], variant=RAY_OBJECTS)
        rows.append(
            [
                r["payload"],
                r["variant"],
                str(r["runs"]),
                f"{r['median_ns'] / 1e6:.1f} ms",
                f"{r['size'] / r['median_ns']:.2f}",
                ratio(queue["median_ns"] / r["median_ns"]) if queue else "-",
                ratio(ray["median_ns"] / r["median_ns"]) if ray else "-",
            ]
        )
    out = [
        "### Objects: Python objects to another process",
        "",
        "`bench/objects.py`: one object sent to a receiver process that rebuilds it, sums "
        "every number in it and replies with the sum; the time runs from the send to that "
        "reply. x Queue and x Ray: their time over this variant's (above 1 is faster).",
        "",
        source(data),
        "",
        table(
            ["payload", "variant", "runs", "median", "GB/s", "x Queue", "x Ray"],
            grouped(rows),
            left=2,
        ),
    ]
    overheads = []
    for payload in dict.fromkeys(r["payload"] for r in results):
        raw = find(results, payload=payload, variant=RAW_OBJECTS)
        fresh = find(results, payload=payload, variant=SEALED_OBJECTS)
        if raw and fresh:
            overheads.append(f"{payload} {100 * (fresh['median_ns'] / raw['median_ns'] - 1):+.1f}%")
    if overheads:
        out += ["", f"Pickling overhead over sending the raw bytes: {', '.join(overheads)}."]
    out += notes(data)
    return "\n".join(out)


RAY_BROKER = "Ray (ray.put -> ray.get in an actor)"


def broker(data: Data) -> str:
    results: list[Data] = data["results"]
    ray = find(results, phase="latency", variant=RAY_BROKER)
    latency = []
    for r in results:
        if r["phase"] != "latency":
            continue
        latency.append(
            [
                r["variant"],
                str(r["runs"]),
                fmt_time(r["median_ns"]),
                ns(r.get("p99_ns")),
                iqr(r.get("iqr_ns")),
                ratio(ray["median_ns"] / r["median_ns"], 1) if ray else "-",
                ratio(ray["p99_ns"] / r["p99_ns"], 1) if ray and r.get("p99_ns") else "-",
            ]
        )
    throughput = []
    for r in results:
        if r["phase"] != "throughput":
            continue
        ray_t = find(results, phase="throughput", size=r["size"], variant=RAY_BROKER)
        throughput.append(
            [
                fmt_size(r["size"]),
                r["variant"],
                str(r["runs"]),
                fmt_time(r["median_ns"]),
                iqr(r.get("iqr_ns")),
                f"{r['gb_per_s']:.2f}",
                ratio(r["gb_per_s"] / ray_t["gb_per_s"]) if ray_t else "-",
            ]
        )
    out = [
        "### The broker",
        "",
        "`bench/broker.py` starts its own broker. Latency: 4 KiB, from the first call of "
        "the publish until the consumer, another process whose get is already waiting, has "
        "mapped and released it. Throughput: one handoff at a time, the consumer reads every "
        "byte; the payload is copied into the blob or slot inside the timed region, except in "
        "the \"(info)\" row. x Ray: Ray's time over this variant's (above 1 is faster).",
        "",
        source(data),
        "",
        table(["variant", "runs", "p50", "p99", "IQR", "x Ray p50", "x Ray p99"], latency),
        "",
        table(
            ["size", "variant", "runs", "median", "IQR", "GB/s", "x Ray"],
            grouped(throughput),
            left=2,
        ),
    ]
    operations = data.get("operations") or []
    if operations:
        rows = []
        for op in operations:
            rates = op.get("pairs_per_s")
            low, high = (min(rates), max(rates)) if rates else op["pairs_per_s_range"]
            rows.append(
                [
                    str(op["clients"]),
                    str(op["processes"]),
                    f"{op['median_pairs_per_s']:,.0f}",
                    f"{low:,.0f}-{high:,.0f}",
                    f"{median(op['broker_cpu_us_per_request']):.1f} µs",
                    f"{median(op['client_cpu_us_per_pair']):.1f} µs",
                ]
            )
        out += [
            "",
            "Get + release pairs per second, 4 KiB blobs published beforehand, each client "
            "an asyncio client with its own connection:",
            "",
            table(
                [
                    "clients",
                    "processes",
                    "pairs/s",
                    "range",
                    "broker CPU / request",
                    "client CPU / pair",
                ],
                rows,
                left=0,
            ),
        ]
    out += verdict_table(
        data,
        ["what", "measured", "target"],
        lambda v: [v["what"], _value(v["value"]), target(v["target"])],
    )
    out += notes(data)
    return "\n".join(out)


# Each of the broker's rates and the disk's rate it is held against (bench/spill.py).
SPILL_PAIRS = {
    "spill (write + CRC-32)": "disk write, no fsync",
    "restore, file in the page cache": "disk read, in the page cache",
    "restore, file dropped from the cache": "disk read, dropped from the cache",
}


def spill(data: Data) -> str:
    results: list[Data] = data["results"]
    plan = data["plan"]
    rows = []
    for r in results:
        disk = find(results, what=SPILL_PAIRS.get(r["what"]))
        rates = r["gb_per_s_per_round"]
        rows.append(
            [
                r["what"],
                f"{r['gb_per_s']:.2f}",
                f"{min(rates):.2f}-{max(rates):.2f}" if rates else "-",
                "-" if r.get("median_item_ms") is None else f"{r['median_item_ms']:.1f} ms",
                f"{disk['gb_per_s']:.2f}" if disk else "-",
                f"{r['gb_per_s'] / disk['gb_per_s']:.0%}" if disk and disk["gb_per_s"] else "-",
            ]
        )
    out = [
        "### Spilling to disk",
        "",
        f"`bench/spill.py`: {plan['blobs']} blobs of {fmt_size(plan['size'])} put into a "
        f"broker whose memory limit holds {fmt_size(plan['memory_limit'])}, so that each put "
        "past it spills the least recently used blob; then every spilled blob got back. "
        "The broker's rates are over its own time for the files (its log's `seconds`); the "
        "disk's are files of the same sizes written (no fsync, as the broker's) and read on "
        "the same folder in the same round. Warm: the file in the page cache; cold: dropped "
        "from it first (fdatasync, then POSIX_FADV_DONTNEED). GB/s: the median over rounds.",
        "",
        source(data),
        "",
        table(
            ["what", "GB/s", "range", "per blob or file", "the disk's GB/s", "of the disk's"],
            rows,
        ),
    ]
    out += verdict_table(
        data,
        ["what", "measured", "rounds", "target"],
        lambda v: [
            v["what"],
            f"{v['value']:.0%}",
            f"{min(v['ratios']):.0%}-{max(v['ratios']):.0%}",
            v["target"],
        ],
        "Each round's rate over the disk's rate of the same round, the median over rounds:",
    )
    out += notes(data)
    return "\n".join(out)


def _value(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


RENDER: dict[str, Callable[[Data], str]] = {
    "core": core,
    "hugepages": hugepages,
    "channel": channel,
    "streams": streams,
    "ring": ring,
    "objects": objects,
    "broker": broker,
    "spill": spill,
}


# --------------------------------------------------------------------------- the two reports


def full(runs: dict[str, Data]) -> str:
    return "\n\n".join(RENDER[name](runs[name]) for name in BENCHMARKS if name in runs)


def headline(runs: dict[str, Data]) -> str:
    """A few figures: each with what it is compared with, and the run it comes from."""
    rows: list[list[str]] = []
    origins: dict[str, None] = {}

    def add(bench: str, what: str, ours: str, theirs: str) -> None:
        rows.append([what, ours, theirs])
        env = runs[bench].get("environment", {})
        origins[f"{str(env.get('time', '?'))[:10]} on {machine(env)}"] = None

    if "channel" in runs:
        r = runs["channel"]["results"]
        ours = find(r, phase="throughput", size=64 << 20, variant="blobplane channel")
        raw = find(r, phase="throughput", size=64 << 20, variant="raw memfd + send_fds (reference)")
        pipe = find(r, phase="throughput", size=64 << 20, variant="multiprocessing.Pipe")
        if ours and raw and pipe:
            add(
                "channel",
                "64 MiB to another process, fresh memory (channel)",
                fmt_time(ours["median_ns"]),
                f"raw syscalls {fmt_time(raw['median_ns'])}, "
                f"multiprocessing.Pipe {fmt_time(pipe['median_ns'])}",
            )
    if "streams" in runs:
        r = runs["streams"]["results"]
        ours = find(r, size=64 << 20, subscribers=1, variant="blobplane streams")
        ice = find(r, size=64 << 20, subscribers=1, variant="iceoryx2")
        if ours:
            add(
                "streams",
                "64 MiB frames to a subscriber (streams)",
                f"{ours['gb_per_s']:.1f} GB/s",
                f"iceoryx2 {ice['gb_per_s']:.1f} GB/s" if ice else "-",
            )
        ours = find(r, size=1 << 20, subscribers=1, variant="blobplane streams")
        ice = find(r, size=1 << 20, subscribers=1, variant="iceoryx2")
        if ours:
            add(
                "streams",
                "1 MiB frames to a subscriber (streams)",
                f"{ours['frames_per_s']:,.0f} frames/s",
                f"iceoryx2 {ice['frames_per_s']:,.0f} frames/s" if ice else "-",
            )
    if "objects" in runs:
        r = runs["objects"]["results"]
        ours = find(r, payload="64 MiB", variant="blobplane objects, default (auto pool)")
        queue = find(r, payload="64 MiB", variant=QUEUE)
        ray = find(r, payload="64 MiB", variant=RAY_OBJECTS)
        if ours:
            others = [f"multiprocessing.Queue {fmt_time(queue['median_ns'])}"] if queue else []
            others += [f"Ray {fmt_time(ray['median_ns'])}"] if ray else []
            add(
                "objects",
                "a 64 MiB numpy array, sent and summed (`send_obj`, default arguments)",
                fmt_time(ours["median_ns"]),
                ", ".join(others) or "-",
            )
    if "broker" in runs:
        r = runs["broker"]["results"]
        ours = find(r, phase="latency", variant="broker, pool slot")
        ray = find(r, phase="latency", variant=RAY_BROKER)
        if ours:
            add(
                "broker",
                "4 KiB put-then-get through the broker, p50",
                fmt_time(ours["median_ns"]),
                f"Ray {fmt_time(ray['median_ns'])}" if ray else "-",
            )
        busiest = max(runs["broker"].get("operations") or [{}], key=lambda o: o.get("clients", 0))
        if busiest:
            add(
                "broker",
                f"get + release pairs per second, {busiest['clients']} clients",
                f"{busiest['median_pairs_per_s']:,.0f}",
                "-",
            )
    return "\n".join(
        [
            table(["", "blobplane", "compared with"], rows, align="lrl"),
            "",
            f"*Medians, measured on {' and '.join(origins)}.*",
        ]
    )


def spill_only(runs: dict[str, Data]) -> str:
    """The spilling table alone, for the guide that explains spilling."""
    if "spill" not in runs:
        raise SystemExit("a spill section names a folder without spill.json")
    return spill(runs["spill"])


SECTIONS: dict[str, Callable[[dict[str, Data]], str]] = {
    "full": full,
    "headline": headline,
    "spill": spill_only,
}


# --------------------------------------------------------------------------- files


def load(folder: str) -> dict[str, Data]:
    """The JSON of one run; a relative *folder* is taken from the repository's root."""
    folder = os.path.join(ROOT, folder)
    runs: dict[str, Data] = {}
    for name in BENCHMARKS:
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                runs[name] = json.load(f)
    # `bench/streams.py` writes the ring experiment into its own JSON.
    if "ring" not in runs and runs.get("streams", {}).get("ring"):
        runs["ring"] = {
            "environment": runs["streams"]["environment"],
            "ring": runs["streams"]["ring"],
        }
    if not runs:
        raise SystemExit(f"no benchmark JSON in {folder} (expected {', '.join(BENCHMARKS)})")
    return runs


def fill(text: str, folder: str | None) -> str:
    """*text* with every marked section replaced by the report of its folder (or *folder*)."""
    out: list[str] = []
    position = 0
    for match in BEGIN.finditer(text):
        end = text.find(END, match.end())
        if end < 0:
            raise SystemExit(f"a section {match.group(0).strip()} has no {END}")
        name = match.group(1)
        source_folder = os.path.relpath(os.path.abspath(folder), ROOT) if folder else match.group(2)
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}: one of {', '.join(SECTIONS)}")
        out += [
            text[position : match.start()],
            f"<!-- bench/report.py: {name} {source_folder} -->\n",
            SECTIONS[name](load(source_folder)),
            "\n\n",
        ]
        position = end
    out.append(text[position:])
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "folder", nargs="?", help="a folder of JSON files (core.json, channel.json...)"
    )
    parser.add_argument("--write", nargs="+", metavar="FILE", help="fill the marked sections")
    parser.add_argument(
        "--check", action="store_true", help="with --write: change nothing, exit 1 if stale"
    )
    args = parser.parse_args(argv)
    if not args.write:
        if not args.folder:
            parser.error("give a folder, or --write FILE...")
        print(full(load(args.folder)))
        return 0
    stale = []
    for path in args.write:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not BEGIN.search(text):
            raise SystemExit(f"{path} has no <!-- bench/report.py: full|headline FOLDER --> line")
        filled = fill(text, args.folder)
        if filled == text:
            continue
        if args.check:
            stale.append(path)
            continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(filled)
        print(f"updated {path}", file=sys.stderr)
    if stale:
        print(
            f"out of date (run bench/report.py --write {' '.join(stale)}): {', '.join(stale)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
