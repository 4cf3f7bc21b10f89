"""Structured log lines for the broker: ``ts=... level=info event=blob.sealed id=... size=...``.

One event per line, ``key=value`` pairs that a person can read and `grep`,
`awk` or a log shipper can split. Values with spaces, quotes or ``=`` are
quoted as JSON strings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

__all__ = ["LOGGER", "KeyValueFormatter", "configure", "event"]

LOGGER = logging.getLogger("blobplane.broker")


def _value(value: object) -> str:
    text = str(value)
    if not text or any(ch in text for ch in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def event(name: str, level: int = logging.INFO, /, **fields: object) -> None:
    """Log one event with its fields (fields that are None are left out)."""
    if not LOGGER.isEnabledFor(level):
        return  # the broker logs per request at DEBUG: skip the formatting when off
    parts = [f"event={name}"]
    parts += [f"{key}={_value(value)}" for key, value in fields.items() if value is not None]
    LOGGER.log(level, " ".join(parts))


class KeyValueFormatter(logging.Formatter):
    """``ts=<UTC ISO 8601, ms> level=<name> <message>``, and the traceback if any, indented."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"{record.getMessage()}"
        )
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join(f"    {row}" for row in trace.splitlines())
        return line


def configure(level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the broker's events to *stream* (stderr), one line each."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False
