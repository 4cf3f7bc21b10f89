"""The `blobplane` command: the broker's commands, the demos, and the tables they print."""

from blobplane.cli.main import main

__all__ = ["main"]
