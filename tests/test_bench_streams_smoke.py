"""`bench/streams.py --quick` runs, prints its tables and writes its JSON (a smoke test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "streams.py"
TIMEOUT_S = 20  # the quick run takes about five seconds

VARIANTS = (
    "in-process copy + read (reference)",
    "blobplane streams",
    "blobplane streams, spin 50 µs",
    "blobplane channel, fresh blob",
    "multiprocessing.Pipe",
)


def test_quick_run_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "blobplane streams: frames to other processes" in result.stdout
    for header in ("frames/s", "GB/s", "latency p50", "round trip p99"):
        assert header in result.stdout
    for variant in VARIANTS:
        assert variant in result.stdout
    assert "round trip with frames back to back" in result.stdout
    assert "wake-up experiment" in result.stdout
    assert "index ring in a memfd + eventfd" in result.stdout

    data = json.loads(out.read_text())
    rows = data["results"]
    assert {row["size"] for row in rows} == {4096, 1024 * 1024}
    assert {row["variant"] for row in rows} >= set(VARIANTS)
    for row in rows:
        assert row["rounds"] >= 1
        assert row["frames_per_s"] > 0
        if row["variant"] != VARIANTS[0]:
            assert row["round_trip_ns_p50"] > 0
            if row["size"] == 4096:
                assert row["back_to_back_round_trip_ns_p50"] > 0
    assert data["verdicts"]
    assert {row["variant"] for row in data["ring"]} == {
        "one message per frame, SOCK_SEQPACKET",
        "index ring in a memfd + eventfd",
    }
