"""`bench/hugepages.py --quick` runs, restores the kernel's setting and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobplane.backends.hugepages import SHMEM_ENABLED, read_shmem_thp_mode

BENCH = Path(__file__).resolve().parent.parent / "bench" / "hugepages.py"


NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def setting() -> str | None:
    return read_shmem_thp_mode() or None


def reserved() -> str:
    with open(NR_HUGEPAGES) as file:
        return file.read()


@pytest.mark.timeout(120)
def test_quick_run_measures_each_setting_and_puts_the_machines_back(tmp_path: Path) -> None:
    before = setting()
    reserved_before = reserved()
    out = tmp_path / "hugepages.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert setting() == before
    assert reserved() == reserved_before  # the huge pages it reserved, given back
    data = json.loads(out.read_text())
    assert data["machine_setting"] == before
    measured = {row["setting"] for row in data["results"]}
    if before:
        assert before in measured
    if before not in (None, "advise") and os.access(SHMEM_ENABLED, os.W_OK):
        assert "advise" in measured
    if os.access(NR_HUGEPAGES, os.W_OK):
        assert "reserved huge pages" in measured
    for row in data["results"]:
        assert row["runs"] == 6
        assert row["gb_per_s"] > 0
