"""`bench/spill.py --quick` runs, prints its table and verdicts, writes JSON that renders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
TIMEOUT_S = 90  # the quick run takes a few seconds

ROWS = (
    "spill (write + CRC-32)",
    "disk write, no fsync",
    "restore, file in the page cache",
    "disk read, in the page cache",
    "restore, file dropped from the cache",
    "disk read, dropped from the cache",
    "get of a spilled blob (client), warm",
    "get of a spilled blob (client), cold",
)


def test_quick_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "spill.json"
    disk = tmp_path / "disk"
    disk.mkdir()
    result = subprocess.run(
        [sys.executable, str(BENCH / "spill.py"), "--quick", "--json", str(out), "--dir", disk],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    for row in ROWS:
        assert row in result.stdout
    assert "target >= 70%" in result.stdout
    assert os.listdir(disk) == []  # the broker's folder and the baseline's files are gone

    data = json.loads(out.read_text())
    assert [row["what"] for row in data["results"]] == list(ROWS)
    for row in data["results"]:
        assert row["rounds"] == 1
        assert row["gb_per_s"] > 0
    assert len(data["verdicts"]) == 3
    judged = {v["what"].split(" / ")[0]: v["met"] for v in data["verdicts"]}
    # Against the disk's own rates, a verdict; against the page cache, information.
    assert judged.pop("restore, file in the page cache") is None
    assert all(met in (True, False) for met in judged.values())

    # bench/report.py renders it, alone (the spilling guide) and with the rest.
    rendered = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "### Spilling to disk" in rendered.stdout
    assert "| spill (write + CRC-32) |" in rendered.stdout
