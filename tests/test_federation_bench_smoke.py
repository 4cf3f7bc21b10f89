"""`bench/federation.py --quick` runs, prints its tables and verdicts, and writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyarrow.flight")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "federation.py"


@pytest.mark.timeout(120)
def test_quick_run_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "federation.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-tls", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    for variant in (
        "remote get (B fetches from A)",
        "raw TCP, one stream",
        "bare Flight DoGet",
        "cached get at B",
        "4 parallel remote gets",
    ):
        assert variant in result.stdout
    assert "4 KiB remote get: p50" in result.stdout
    data = json.loads(out.read_text())
    assert data["environment"]["cpus"] >= 1
    assert {row["size"] for row in data["results"]} >= {4096, 16 << 20}
    for row in data["results"]:
        assert 0 < row["median_ns"] <= row["p99_ns"]
    assert {v["what"] for v in data["verdicts"]} >= {"4 KiB remote get"}
