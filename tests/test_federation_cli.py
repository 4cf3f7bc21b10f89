"""The command line of federation: `get --from`, `ls --peer`, `serve --flight`, the demo."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyarrow.flight")

import numpy as np

from blobplane.client import connect_broker
from flight_brokers import at, cluster


def blobplane(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blobplane", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.mark.timeout(60)
def test_get_from_and_ls_peer_need_no_local_broker(tmp_path: Path) -> None:
    with cluster(at(0)) as running:
        home = running.brokers[0]
        url = running.url(0)
        data = np.random.default_rng(7).bytes(5 << 20)
        with connect_broker(home.socket_path) as producer:
            entry = producer.put_bytes(data, key="frame")
        token = running.token("get,list")
        out = tmp_path / "copy.bin"
        # No broker at the default socket: --socket points nowhere.
        nowhere = ("--socket", str(tmp_path / "none.sock"))
        got = blobplane("get", "frame", "--from", url, "--token", token, "-o", str(out), *nowhere)
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        second = tmp_path / "by-id.bin"
        by_id = blobplane(
            "get", str(entry.id), "--id", "--from", url, "--token", token, "-o", str(second)
        )
        assert by_id.returncode == 0, by_id.stderr
        assert second.read_bytes() == data
        listed = blobplane("ls", "--peer", url, "--token", token, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert rows == [{"key": "frame", "id": str(entry.id), "size": len(data)}]
        table = blobplane("ls", "--peer", url, "--token", token)
        assert "frame" in table.stdout
        assert "5.0 MiB" in table.stdout
        # Refusals are one line each.
        for args, says in (
            (
                ("get", "frame", "--from", url, "-o", "-"),
                "serves only bearers of a blobplane token",
            ),
            (("get", "nothing", "--from", url, "--token", token, "-o", "-"), "no live blob"),
            (("ls", "--peer", url, "--token", running.token("get")), "does not grant 'list'"),
            (("get", "frame", "--from", "http://x", "--token", token, "-o", "-"), "not a Flight"),
        ):
            failed = blobplane(*args)
            assert failed.returncode == 1, failed
            assert failed.stderr.startswith("error: "), failed.stderr
            assert says in failed.stderr, failed.stderr
            assert "Traceback" not in failed.stderr
        assert not list(tmp_path.glob(".copy.bin.*"))  # no partial file left


@pytest.mark.timeout(90)
def test_demo_federation_moves_blobs_between_two_brokers() -> None:
    result = blobplane("demo-federation", "--size", "4MiB", "--count", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("equal") == 2
    assert "GB/s" in result.stdout
    assert "Traceback" not in result.stderr
