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


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blobplane.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_streams_blobs_to_a_second_process_that_verifies_each() -> None:
    result = run_demo("--total", "64MiB", "--blob-size", "4MiB")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())  # rich may wrap long lines
    assert "64.0 MiB in 16 blobs of 4.0 MiB" in out
    assert (
        "verified: the consumer process checked the CRC-32 of all 16 blobs "
        "(67,108,864 bytes) in place, no copy: all match"
    ) in out
    assert "GB/s" in out
    assert "handoff latency p50" in out
    assert "handoff latency p99" in out


def test_demo_sends_a_smaller_last_blob() -> None:
    result = run_demo("--total", "10MiB", "--blob-size", "4MiB")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "all 3 blobs (10,485,760 bytes)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--total", "0"], "must be positive"),
        (["--blob-size", "lots"], "is not a size"),
        (["--backend", "posix_shm"], "Invalid value for '--backend'"),
    ],
)
def test_demo_refuses_bad_options(args: list[str], message: str) -> None:
    result = run_demo(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_stream_demo_checks_every_frame_in_subscriber_processes() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blobplane.cli",
            "demo",
            "--stream",
            "--seconds",
            "1",
            "--subscribers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())  # rich may wrap long lines
    assert "frames checked in place by 2 processes, 0 bad" in out
