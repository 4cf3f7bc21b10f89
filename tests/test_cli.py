from __future__ import annotations

import subprocess
import sys

import pytest

from blobplane.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4096", 4096), ("4KiB", 4096), ("64 MiB", 64 << 20), ("1.5GB", 1_500_000_000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1", "12x", "1e3"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(256 << 20) == "256.0 MiB"


@pytest.mark.parametrize("backend", ["memfd", "posix_shm", "temp_file"])
def test_demo_verifies_a_blob_in_a_second_process(backend: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blobplane.cli", "demo", "--size", "3MiB", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    assert backend in result.stdout
