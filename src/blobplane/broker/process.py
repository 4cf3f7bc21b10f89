"""A `blobplane serve` child process: started, waited for until it listens, stopped.

For the demos, the benchmarks and the tests, which all need a real broker
process to talk to.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["BrokerProcess", "start_broker"]

_TIMEOUT_S = 60.0


@dataclass
class BrokerProcess:
    """A `blobplane serve` child, ready (its socket listens) once `start_broker` returns."""

    process: subprocess.Popen[bytes]
    socket_path: str
    log_path: str
    ready_line: str = ""  # what it printed once it listened

    @property
    def flight_url(self) -> str | None:
        """Where its Flight endpoint listens (`serve --flight`), from its ready line."""
        return self._ready_word("flight=")

    @property
    def metrics_url(self) -> str | None:
        """Where its Prometheus endpoint listens (`serve --metrics`), from its ready line."""
        return self._ready_word("metrics=")

    def _ready_word(self, prefix: str) -> str | None:
        for word in self.ready_line.split():
            if word.startswith(prefix):
                return word.removeprefix(prefix)
        return None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; returns its exit status (SIGKILL after *timeout*)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def start_broker(socket_path: str, *args: str, timeout: float = _TIMEOUT_S) -> BrokerProcess:
    """Start `blobplane serve --socket socket_path *args` and wait for its ready line."""
    log_path = socket_path + ".log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "blobplane", "serve", "--socket", socket_path, *args],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    broker = BrokerProcess(process, socket_path, log_path)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else b""
    broker.ready_line = line.decode(errors="replace").strip()
    if not line.startswith(b"ready "):
        broker.stop()
        with open(log_path, "rb") as log:
            raise RuntimeError(
                f"the broker did not start: {line!r}\n{log.read().decode(errors='replace')}"
            )
    return broker
