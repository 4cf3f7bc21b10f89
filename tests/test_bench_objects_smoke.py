"""bench/objects.py runs end to end (small payloads) and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "objects.py")


def test_objects_benchmark_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, BENCH, "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "blobplane objects, default (auto pool)" in result.stdout
    assert "blobplane objects, sealed=True (fresh blob)" in result.stdout
    assert "multiprocessing.Queue" in result.stdout
    assert "pickling overhead over raw bytes" in result.stdout
