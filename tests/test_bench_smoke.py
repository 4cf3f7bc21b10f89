"""`bench/core.py --quick` runs, prints its tables and writes its JSON (a smoke test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "core.py"
TIMEOUT_S = 60  # the quick run takes a second or two

VARIANTS = (
    "raw memfd (reference)",
    "blobplane memfd",
    "blobplane posix_shm",
    "blobplane temp_file",
    "numpy copy+read, in-process (info)",
)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_quick_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench("--json", str(out))
    assert "blobplane core: create + fill + seal + map_read + read every byte" in result.stdout
    for variant in VARIANTS:
        assert variant in result.stdout
    assert "where the time goes" in result.stdout
    assert "page faults" in result.stdout

    data = json.loads(out.read_text())
    rows = data["results"]
    assert {row["size"] for row in rows} == {4096, 1024 * 1024}
    assert {row["variant"] for row in rows} >= set(VARIANTS)
    for row in rows:
        assert row["runs"] >= 1
        assert row["median_ns"] > 0
        if row["variant"] == "raw memfd (reference)":
            assert row["ratio_to_raw"] == pytest.approx(1.0)
    shares = data["breakdown"]["categories_share"]
    assert all(share >= 0 for share in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.1)


def test_sizes_that_are_not_a_multiple_of_eight_are_read_in_full() -> None:
    # Every variant's checksum is compared with the payload's: a wrong tail exits non-zero.
    result = run_bench("--sizes", "4099,5", "--no-breakdown")
    assert "4099 B" in result.stdout
    assert "5 B" in result.stdout
