"""`blobplane top`: one frame for scripts, and the live view in a terminal of a fixed size."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator

import pytest
from rich.cells import cell_len

from blobplane.broker.tokens import TokenAuthority, load_key
from blobplane.client import BrokerClient, connect_broker
from brokers import DEADLINE_S, Broker, running_broker

pytestmark = pytest.mark.timeout(60)

KIB = 1024
HOSTILE_KEY = "\x1b[31m[bold]red[/bold]\x07\nnext line\u202e"


def top(*args: str, columns: int, lines: int, socket_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blobplane", "top", "--socket", socket_path, *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
        env={**os.environ, "COLUMNS": str(columns), "LINES": str(lines)},
    )


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker("--memory-limit", "64MiB") as running:
        yield running


@pytest.fixture(scope="module")
def busy(broker: Broker) -> Iterator[BrokerClient]:
    """Thirty blobs (the largest under a hostile key), a few of them being read, two clients."""
    with (
        connect_broker(broker.socket_path, name="producer") as producer,
        connect_broker(broker.socket_path, name="reader") as reader,
    ):
        # Sealed: a pooled blob's state ("sealed (pool)") would take the key's width.
        producer.put_bytes(bytes(900 * KIB), key=HOSTILE_KEY, sealed=True)
        producer.put_bytes(bytes(800 * KIB), key="a-very-long-key-" + "x" * 200, sealed=True)
        producer.put_bytes(bytes(700 * KIB), sealed=True)  # no key
        for index in range(27):
            producer.put_bytes(bytes((index + 1) * KIB), key=f"frame-{index:02}")
        reader.put_bytes(bytes(3 * KIB), key="the-reader's-own")
        reads = [reader.get(f"frame-{index:02}") for index in range(12)]
        reads.append(reader.get("frame-00"))
        try:
            yield producer
        finally:
            for read in reads:
                read.close()


def test_one_frame_at_80_columns(broker: Broker, busy: BrokerClient, no_leaks: None) -> None:
    result = top("--once", columns=80, lines=24, socket_path=broker.socket_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert max(cell_len(line) for line in lines) <= 80, out
    # Fits the screen: 24 lines, less the one the prompt comes back on. The tables
    # lost rows for it ("N more").
    assert len(lines) <= 23, out
    assert "more" in out
    assert "memory" in out
    assert "of 64.0 MiB" in out
    assert "largest blobs" in out
    assert "most referenced" in out
    assert "frame-00" in out  # read twice: the most referenced
    assert "client:" in out  # the accounts of clients without a token
    # A key is text: no escape sequence, bell or line break reaches the terminal,
    # and its brackets are not markup.
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\\x1b[31m[bold]red[/bold]\\x07\\n" in out  # the largest blob's key, cut


def test_a_wide_tall_terminal_shows_more_rows(broker: Broker, busy: BrokerClient) -> None:
    result = top("--once", columns=200, lines=100, socket_path=broker.socket_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(cell_len(line) for line in lines) <= 200
    assert "a-very-long-key-" + "x" * 100 in result.stdout
    assert "(no key)" in result.stdout
    assert "\\x1b[31m[bold]red[/bold]\\x07\\nnext line\\u202e" in result.stdout
    assert "\u202e" not in result.stdout
    assert sum("frame-" in line for line in lines) >= 10
    # Each client (without a token: an account of its own) with its bytes.
    assert any(line.startswith("client:") and "3.0 KiB" in line for line in lines)


def test_the_live_view_redraws_until_ctrl_c(broker: Broker, busy: BrokerClient) -> None:
    output, status = live_top(
        broker.socket_path, stop=lambda child: child.send_signal(signal.SIGINT)
    )
    assert status == 0, output
    assert output.count("largest blobs") >= 2, output  # more than one frame
    assert "Traceback" not in output


def test_the_live_view_ends_with_one_line_when_the_broker_goes(no_leaks: None) -> None:
    with running_broker() as leaving:
        output, status = live_top(leaving.socket_path, stop=lambda _child: leaving.stop())
    assert status == 1, output
    assert "error: " in output
    assert "Traceback" not in output


def test_errors_are_one_line(broker: Broker, tmp_path: os.PathLike[str]) -> None:
    missing = top("--once", columns=80, lines=24, socket_path=os.path.join(tmp_path, "none.sock"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ")
    assert missing.stderr.count("\n") == 1
    # A token without the stats and list rights.
    token = TokenAuthority(load_key(broker.key_path)).mint("get", ttl=60)
    refused = subprocess.run(
        [sys.executable, "-m", "blobplane", "top", "--once", "--socket", broker.socket_path],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
        env={**os.environ, "BLOBPLANE_TOKEN": token},
    )
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("error: ")
    assert "'stats'" in refused.stderr


def live_top(
    socket_path: str, stop: Callable[[subprocess.Popen[bytes]], object]
) -> tuple[str, int]:
    """Run `top --interval 0.1` in a pseudo-terminal of 80x24 for a while, then *stop* it.

    Returns what it drew and its exit status.
    """
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "COLUMNS": "80", "LINES": "24", "TERM": "xterm"}
    try:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "blobplane",
                "top",
                "--socket",
                socket_path,
                "--interval",
                "0.1",
            ],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env=env,
        )
        os.close(terminal)
        terminal = -1
        drawn = bytearray()
        deadline = time.monotonic() + DEADLINE_S
        stopped = False
        while time.monotonic() < deadline:
            if not stopped and drawn.count(b"largest blobs") >= 2:
                stop(child)
                stopped = True
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
            elif child.poll() is not None and stopped:
                break
        status = child.wait(DEADLINE_S)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    return drawn.decode(errors="replace"), status
