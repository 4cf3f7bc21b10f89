"""A real broker process for tests, and ways to look at it from outside.

`running_broker()` starts `blobplane serve` on a socket in a fresh private
folder, waits for its ready line, and at the end stops it with SIGTERM and
checks that it exited cleanly and removed its socket file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blobplane.broker.process import BrokerProcess, start_broker

DEADLINE_S = 20.0


@dataclass
class Broker:
    """A running broker: its process, socket, key file and log."""

    handle: BrokerProcess
    folder: str

    @property
    def pid(self) -> int:
        return self.handle.process.pid

    @property
    def socket_path(self) -> str:
        return self.handle.socket_path

    @property
    def key_path(self) -> str:
        return self.socket_path + ".key"

    def fds(self) -> set[int]:
        return {int(name) for name in os.listdir(f"/proc/{self.pid}/fd")}

    def memfds(self) -> int:
        """How many memfds the broker holds open."""
        count = 0
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{name}").startswith("/memfd:"):
                    count += 1
            except FileNotFoundError:
                continue
        return count

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def log(self) -> str:
        with open(self.handle.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def alive(self) -> bool:
        return self.handle.process.poll() is None

    def stop(self) -> int:
        return self.handle.stop()


@contextmanager
def broker_folder() -> Iterator[str]:
    """A short private folder (socket paths are limited to 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="bp-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def start(folder: str, *args: str, name: str = "b.sock") -> Broker:
    path = os.path.join(folder, name)
    return Broker(start_broker(path, "--log-level", "debug", *args, timeout=DEADLINE_S), folder)


@contextmanager
def running_broker(*args: str) -> Iterator[Broker]:
    """A broker started with *args*; stopped (and checked) when the block ends."""
    with broker_folder() as folder:
        broker = start(folder, *args)
        try:
            yield broker
        finally:
            status = broker.stop()
            log = broker.log()
        assert status == 0, f"the broker exited with status {status}\n{log}"
        assert not os.path.exists(broker.socket_path), "the broker left its socket file"
        assert "Traceback" not in log, log


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll *condition* (something no event announces) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """`blobplane ARGS` in a child process, with *env* over ours, bounded by DEADLINE_S."""
    return subprocess.run(
        [sys.executable, "-m", "blobplane.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=DEADLINE_S,
        check=False,
        env={**os.environ, **(env or {})},
    )


def cli_ok(result: subprocess.CompletedProcess[bytes]) -> str:
    """A command that succeeded: its output."""
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def cli_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """A failure for people: exit status 1, one line on stderr, no traceback; that line."""
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return err


def raw_socket(path: str) -> socket.socket:
    """A bare SEQPACKET connection to the broker, for sending what no client would."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(DEADLINE_S)
    sock.connect(path)
    return sock


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """A child interpreter running *code*; it talks on stdout, one line at a time."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(child: subprocess.Popen[str]) -> str:
    """The child's next line on stdout (it must come within the deadline)."""
    import select

    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], DEADLINE_S)
    line = child.stdout.readline() if ready else ""
    if not line:
        child.kill()
        _, err = child.communicate(timeout=DEADLINE_S)
        raise AssertionError(f"the child said nothing (exit {child.returncode}):\n{err}")
    return line.strip()
