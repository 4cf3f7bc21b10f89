"""bench/executors.py runs end to end (small arrays) and prints its tables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "executors.py")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", [[], ["--crossover"]], ids=["pools", "crossover"])
def test_executors_benchmark_quick_run(mode: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, BENCH, "--quick", *mode],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if mode:
        assert "sharing" in result.stdout
    else:
        assert "Pool, blobplane" in result.stdout
        assert "ProcessPoolExecutor, pickled" in result.stdout
