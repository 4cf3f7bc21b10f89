"""The broker's commands, run as a person would: `blobplane put/get/ls/rm/stats/token/serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokers import (
    DEADLINE_S,
    Broker,
    broker_folder,
    cli_error,
    cli_ok,
    read_line,
    run_cli,
    running_broker,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker() as running:
        yield running


@pytest.fixture
def at(broker: Broker) -> dict[str, str]:
    return {"BLOBPLANE_BROKER": broker.socket_path}


def test_put_get_ls_rm_round_trip(at: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "frame.bin"
    source.write_bytes(os.urandom(20 << 20))  # large enough for a progress bar on a terminal
    blob_id = cli_ok(run_cli("put", str(source), "--key", "cli-frame", env=at)).strip()
    copy = tmp_path / "copy.bin"
    cli_ok(run_cli("get", "cli-frame", "-o", str(copy), env=at))
    assert copy.read_bytes() == source.read_bytes()
    by_id = tmp_path / "by-id.bin"
    cli_ok(run_cli("get", blob_id, "-o", str(by_id), env=at))  # an id works where a key does
    assert by_id.read_bytes() == source.read_bytes()

    listed = json.loads(cli_ok(run_cli("ls", "--json", env=at)))
    (entry,) = [e for e in listed if e["key"] == "cli-frame"]
    assert (entry["id"], entry["size"], entry["state"]) == (blob_id, 20 << 20, "sealed")
    table = cli_ok(run_cli("ls", env=at))
    assert "cli-frame" in table
    assert "20.0 MiB" in table

    cli_ok(run_cli("rm", "cli-frame", env=at))
    assert all(e["key"] != "cli-frame" for e in json.loads(cli_ok(run_cli("ls", "--json", env=at))))


def test_put_from_stdin_and_get_to_stdout(at: dict[str, str]) -> None:
    cli_ok(run_cli("put", "-", "--key", "cli-stdin", "--lease", "10m", env=at, stdin=b"piped"))
    result = run_cli("get", "cli-stdin", env=at)
    assert cli_ok(result) == "piped"
    (entry,) = [
        e for e in json.loads(cli_ok(run_cli("ls", "--json", env=at))) if e["key"] == "cli-stdin"
    ]
    assert entry["lease_ms"] == 600_000
    cli_ok(run_cli("rm", "cli-stdin", env=at))


def test_stats_for_people_and_scripts(at: dict[str, str], broker: Broker) -> None:
    stats = json.loads(cli_ok(run_cli("stats", "--json", env=at)))
    assert stats["pid"] == broker.pid
    assert stats["references"] == 0
    assert "references held" in cli_ok(run_cli("stats", env=at))


def test_errors_are_one_line(at: dict[str, str], tmp_path: Path) -> None:
    err = cli_error(run_cli("get", "no-such-key", "-o", str(tmp_path / "x"), env=at))
    assert "no live blob has the key 'no-such-key'" in err
    cli_error(run_cli("rm", "no-such-key", env=at))
    cli_error(run_cli("get", "never", "--timeout", "0.1", env=at))
    with broker_folder() as folder:
        nobody = {"BLOBPLANE_BROKER": os.path.join(folder, "nobody.sock")}
        assert "blobplane serve" in cli_error(run_cli("stats", env=nobody))
        bad = run_cli("serve", "--socket", os.path.join(folder, "x"), "--memory-limit", "lots")
        assert bad.returncode == 2
        assert b"is not a size" in bad.stderr


def test_serve_on_the_default_socket(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("BLOBPLANE_BROKER", None)
    socket_path = runtime / "blobplane" / "broker.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "blobplane.cli", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert read_line(server) == f"ready socket={socket_path} pid={server.pid}"
        assert (socket_path.parent.stat().st_mode & 0o777) == 0o700
        assert (runtime / "blobplane" / "broker.sock.key").stat().st_mode & 0o777 == 0o600
        assert json.loads(cli_ok(run_cli("stats", "--json", env=env)))["pid"] == server.pid
        second = run_cli("serve", env=env)  # the socket is taken
        assert "another process is listening" in cli_error(second)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=DEADLINE_S)
    assert server.returncode == 0, err
    assert not socket_path.exists()


def test_tokens_from_the_command_line() -> None:
    with running_broker("--require-token") as broker:
        at = {"BLOBPLANE_BROKER": broker.socket_path}
        assert "requires a token" in cli_error(run_cli("ls", env=at))
        minted = run_cli(
            "token",
            "create",
            "--rights",
            "get,put,delete",
            "--max-bytes",
            "1GiB",
            "--ttl",
            "1h",
            env=at,
        )
        token = cli_ok(minted).strip()
        assert token.startswith("bp1.")
        assert b"valid for 1h" in minted.stderr
        with_token = {**at, "BLOBPLANE_TOKEN": token}
        cli_ok(run_cli("put", "-", "--key", "tok", env=with_token, stdin=b"t"))
        assert cli_ok(run_cli("get", "tok", env=with_token)) == "t"
        cli_ok(run_cli("put", __file__, "--key", "a file", env=with_token))
        cli_ok(run_cli("rm", "a file", env=with_token))
        assert "'list'" in cli_error(run_cli("ls", env=with_token))
        cli_ok(run_cli("rm", "tok", env=with_token))
        assert "signature does not match" in cli_error(
            run_cli("ls", "--token", token[:-3] + "AAA", env=at)
        )
        never = cli_ok(run_cli("token", "create", "--rights", "all", "--ttl", "never", env=at))
        cli_ok(run_cli("ls", "--token", never.strip(), env=at))
        bad = run_cli("token", "create", "--rights", "fly", env=at)
        assert "'fly' is not a right" in cli_error(bad)


def test_the_broker_demo() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blobplane.cli", "demo-broker"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    assert "consumer B" in result.stdout
    assert "broker stopped" in result.stdout
    assert "socket file removed" in result.stdout


# -- what trips people up ------------------------------------------------------------------------


def test_files_that_cannot_be_read_or_written_are_one_line_errors(
    at: dict[str, str], tmp_path: Path
) -> None:
    missing = cli_error(run_cli("put", str(tmp_path / "missing.bin"), env=at))
    assert "No such file or directory" in missing
    assert "missing.bin" in missing
    cli_ok(run_cli("put", "-", "--key", "for-nowhere", env=at, stdin=b"bytes"))
    nowhere = cli_error(run_cli("get", "for-nowhere", "-o", str(tmp_path / "no-dir" / "x"), env=at))
    assert "No such file or directory" in nowhere
    cli_ok(run_cli("rm", "for-nowhere", env=at))
    usage = run_cli("get", env=at)
    assert usage.returncode == 2  # a usage error: click's status


def test_inputs_without_a_size_are_read_to_the_end(at: dict[str, str], tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    payload = os.urandom(300_000)
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    writer = subprocess.Popen(["sh", "-c", 'cat "$0" > "$1"', str(source), str(fifo)])
    cli_ok(run_cli("put", str(fifo), "--key", "from-a-fifo", env=at))
    assert writer.wait(DEADLINE_S) == 0
    cli_ok(run_cli("put", "/proc/self/status", "--key", "from-proc", env=at))
    assert run_cli("get", "from-a-fifo", "-o", "-", env=at).stdout == payload
    assert b"Name:" in run_cli("get", "from-proc", env=at).stdout
    for key in ("from-a-fifo", "from-proc"):
        cli_ok(run_cli("rm", key, env=at))


def test_get_writes_a_file_whole_or_not_at_all(at: dict[str, str], tmp_path: Path) -> None:
    payload = os.urandom(1 << 20)
    cli_ok(run_cli("put", "-", "--key", "whole", env=at, stdin=payload))
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents")
    cli_ok(run_cli("get", "whole", "-o", str(target), env=at))
    assert target.read_bytes() == payload
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]  # no temporary file left
    failed = run_cli("get", "nothing-here", "-o", str(tmp_path / "other.bin"), env=at)
    assert failed.returncode == 1
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    cli_ok(run_cli("rm", "whole", env=at))


@pytest.mark.parametrize("columns", ["80", "200"])
def test_ls_never_cuts_an_id(at: dict[str, str], columns: str) -> None:
    key = f"a-rather-long-key-for-{columns}-columns-" * 2
    blob_id = cli_ok(run_cli("put", "-", "--key", key, env=at, stdin=b"x")).strip()
    listing = cli_ok(run_cli("ls", env={**at, "COLUMNS": columns}))
    assert blob_id in listing
    wide = cli_ok(run_cli("ls", "--wide", env={**at, "COLUMNS": columns}))
    assert blob_id in wide
    assert key in wide
    entries = json.loads(cli_ok(run_cli("ls", "--json", env=at)))
    mine = [entry for entry in entries if entry["id"] == blob_id]
    assert len(mine) == 1
    assert {"id", "key", "size", "state", "pooled", "references", "lease_ms"} <= set(mine[0])
    cli_ok(run_cli("rm", key, env=at))


def test_a_put_that_evicts_says_so(tmp_path: Path) -> None:
    with running_broker("--memory-limit", "64KiB", "--evict") as evicting:
        at = {"BLOBPLANE_BROKER": evicting.socket_path}
        cli_ok(run_cli("put", "-", "--key", "first", env=at, stdin=b"x" * 40_000))
        second = run_cli("put", "-", "--key", "second", env=at, stdin=b"y" * 40_000)
        cli_ok(second)
        assert "evicted 1 idle blobs to make room" in second.stderr.decode()


def test_python_dash_m_blobplane_is_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blobplane", "--help"],
        capture_output=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert result.returncode == 0
    assert b"Usage: blobplane" in result.stdout
