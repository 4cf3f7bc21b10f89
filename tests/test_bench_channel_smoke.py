"""`bench/channel.py --quick` runs, prints its tables and verdicts and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "channel.py"
TIMEOUT_S = 20  # the quick run takes two to three seconds

VARIANTS = (
    "raw memfd + send_fds (reference)",
    "blobplane channel",
    "multiprocessing.Pipe",
    "multiprocessing.shared_memory",
)
ZMQ = "pyzmq ipc, copy=False"


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_quick_run_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "channel.json"
    result = run([sys.executable, str(BENCH), "--quick", "--json", str(out)])
    assert "handoff latency, 4 KiB, each handoff cold" in result.stdout
    assert "handoff latency, 4 KiB, back to back" in result.stdout
    assert "throughput, a fresh blob per handoff" in result.stdout
    for variant in VARIANTS:
        assert variant in result.stdout
    assert "4 KiB handoff latency (p50), each handoff cold: paired median" in result.stdout
    assert "4 KiB handoff latency (p50), back to back: paired median" in result.stdout

    data = json.loads(out.read_text())
    rows = data["results"]
    names = {row["variant"] for row in rows}
    assert names >= set(VARIANTS)
    assert ZMQ in names or any("pyzmq" in note for note in data["notes"])
    assert {row["size"] for row in rows if row["phase"] == "throughput"} == {4096, 1 << 20}
    assert {row["size"] for row in rows if row["phase"] == "latency"} == {4096}
    back_to_back = [row for row in rows if row["phase"] == "latency, back to back"]
    assert {row["size"] for row in back_to_back} == {4096}
    assert all(row["runs"] == 19 for row in back_to_back)  # one burst of 20, the first not counted
    for row in rows:
        assert row["runs"] >= 1
        assert row["median_ns"] > 0
        assert row["p99_ns"] >= row["median_ns"] or row["runs"] < 2
        if row["variant"] == VARIANTS[0]:
            assert row["ratio_to_raw"] == pytest.approx(1.0)
    assert [v["target"] for v in data["verdicts"]] == [1.3, 1.3, None, None]


def test_without_pyzmq_the_row_is_skipped_with_a_note() -> None:
    hide_zmq = (
        "import runpy, sys; sys.modules['zmq'] = None; "
        f"sys.path.insert(0, {str(BENCH.parent)!r}); "
        f"sys.argv = [{str(BENCH)!r}, '--quick', '--sizes', '4K', '--latency-reps', '3']; "
        f"runpy.run_path({str(BENCH)!r}, run_name='__main__')"
    )
    result = run([sys.executable, "-c", hide_zmq])
    assert "skipped, pyzmq is not installed" in result.stdout
    assert ZMQ not in result.stdout.replace(f"{ZMQ}: skipped", "")
