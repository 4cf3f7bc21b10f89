"""Where the broker listens, and where its secret key lives: beside the socket.

The socket lives in a private folder (0700, created by the listener), by
default ``$XDG_RUNTIME_DIR/blobplane/broker.sock`` or, without a runtime
folder, ``<tmp>/blobplane-broker-<uid>/broker.sock``. ``$BLOBPLANE_BROKER``
names another socket for every client and command. The key file is the
socket path plus ``.key`` (0600): whoever can read it can mint tokens, which
is exactly the user who runs the broker, and `blobplane token create` finds it
from the socket path alone.
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["ENV_SOCKET", "ENV_TOKEN", "default_socket_path", "key_path_for", "resolve_socket"]

ENV_SOCKET = "BLOBPLANE_BROKER"
ENV_TOKEN = "BLOBPLANE_TOKEN"


def default_socket_path() -> str:
    """$BLOBPLANE_BROKER, else the socket in this user's private runtime folder."""
    explicit = os.environ.get(ENV_SOCKET)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "blobplane", "broker.sock")
    return os.path.join(tempfile.gettempdir(), f"blobplane-broker-{os.getuid()}", "broker.sock")


def resolve_socket(path: str | os.PathLike[str] | None) -> str:
    return default_socket_path() if path is None else os.fspath(path)


def key_path_for(socket_path: str | os.PathLike[str]) -> str:
    """The broker's secret key file for the socket at *socket_path*."""
    return os.fspath(socket_path) + ".key"
