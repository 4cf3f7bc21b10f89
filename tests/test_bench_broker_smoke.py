"""`bench/broker.py --quick` runs (no Ray), prints its tables and verdicts, writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "broker.py"
TIMEOUT_S = 60  # the quick run takes five to ten seconds

VARIANTS = (
    "broker, put_bytes(sealed=True)",
    "broker, put_bytes",
    "broker, pool slot",
    "broker, pool slot written before the clock (info)",
    "channel, fresh blob",
    "channel, pool slot",
)


def test_quick_run_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "broker.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "put-then-get latency, 4 KiB" in result.stdout
    assert "throughput, one handoff at a time" in result.stdout
    assert "get + release pairs per second" in result.stdout
    for variant in VARIANTS:
        assert variant in result.stdout
    assert "Ray (ray.put -> ray.get in an actor): left out" in result.stdout
    assert "64 clients, get + release pairs per second" in result.stdout

    data = json.loads(out.read_text())
    rows = data["results"]
    assert {row["variant"] for row in rows} == set(VARIANTS)
    assert {row["size"] for row in rows if row["phase"] == "latency"} == {4096}
    assert {row["size"] for row in rows if row["phase"] == "throughput"} == {1 << 20}
    for row in rows:
        assert row["runs"] >= 1
        assert 0 < row["median_ns"] <= row["p99_ns"]
    operations = data["operations"]
    assert [entry["clients"] for entry in operations] == [1, 8, 64]
    for entry in operations:
        assert entry["median_pairs_per_s"] > 0
        assert all(us > 0 for us in entry["broker_cpu_us_per_request"])
    # Without Ray only the operations target can be judged.
    judged = {v["what"]: v["met"] for v in data["verdicts"]}
    assert judged["64 clients, get + release pairs per second"] in (True, False)
    assert [met for what, met in judged.items() if "Ray" in what] == [None, None, None]
