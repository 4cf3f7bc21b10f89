"""Unix sockets for channels: which type, the listening socket, and who is on the other end.

The listening socket lives in a private folder (0700, created if missing)
and is itself 0600, so only this user can connect at all; `SO_PEERCRED`
then names the peer's uid, pid and gid, and by default only this uid is
accepted, on both ends.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
from collections.abc import Container
from dataclasses import dataclass
from typing import Literal, TypeAlias

from blobplane.backends.private_dir import ensure_private_dir
from blobplane.errors import (
    AddressInUse,
    ForbiddenPeer,
    InvalidAddress,
    os_errors,
)
from blobplane.wire import Framing

__all__ = [
    "ALL_UIDS",
    "ListenerSocket",
    "PeerCredentials",
    "Transport",
    "adopt_fd",
    "check_peer",
    "default_transport",
    "framing_of",
    "new_socket",
    "peer_credentials",
    "socket_pair",
]

Transport: TypeAlias = Literal["seqpacket", "stream"]

# Pass as allowed_uids to accept peers of any user (the folder and file modes still apply).
ALL_UIDS = range(2**32)

# sun_path holds 108 bytes on Linux, the terminating NUL included.
_MAX_PATH = 107
_UCRED = struct.Struct("3i")
_SOCKET_TYPES: dict[Transport, int] = {"stream": socket.SOCK_STREAM}
if hasattr(socket, "SOCK_SEQPACKET"):
    _SOCKET_TYPES["seqpacket"] = socket.SOCK_SEQPACKET


def default_transport() -> Transport:
    """SOCK_SEQPACKET where it exists on Linux (a message and its fds arrive together)."""
    if sys.platform.startswith("linux") and "seqpacket" in _SOCKET_TYPES:
        return "seqpacket"
    return "stream"


def _socket_type(transport: Transport) -> int:
    try:
        return _SOCKET_TYPES[transport]
    except KeyError:
        raise InvalidAddress(
            f"transport must be one of {sorted(_SOCKET_TYPES)}, not {transport!r}"
        ) from None


def new_socket(transport: Transport) -> socket.socket:
    kind = _socket_type(transport)
    with os_errors(f"creating a {transport} socket"):
        return socket.socket(socket.AF_UNIX, kind)


def socket_pair(transport: Transport) -> tuple[socket.socket, socket.socket]:
    kind = _socket_type(transport)
    with os_errors(f"creating a {transport} socket pair"):
        return socket.socketpair(socket.AF_UNIX, kind)


def adopt_fd(fd: int) -> socket.socket:
    """A socket object for an inherited fd, which it then owns (the caller's if this fails)."""
    with os_errors(f"adopting fd {fd} as a socket"):
        return socket.socket(fileno=fd)


def framing_of(sock: socket.socket) -> Framing:
    if sock.family != socket.AF_UNIX:
        raise InvalidAddress(f"channels run over AF_UNIX sockets, not {sock.family!r}")
    if sock.type == _SOCKET_TYPES.get("seqpacket"):
        return "datagram"
    if sock.type == socket.SOCK_STREAM:
        return "stream"
    raise InvalidAddress(f"channels run over SOCK_SEQPACKET or SOCK_STREAM, not {sock.type!r}")


def check_path(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not text or len(os.fsencode(text)) > _MAX_PATH:
        raise InvalidAddress(
            f"a Unix socket path must be 1 to {_MAX_PATH} bytes long, got {text!r}; "
            "use a shorter folder"
        )
    return text


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end: as the kernel saw it at connect() (or listen()) time."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    with os_errors("reading the peer's credentials (SO_PEERCRED)"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def check_peer(credentials: PeerCredentials, allowed_uids: Container[int] | None) -> None:
    allowed = {os.getuid()} if allowed_uids is None else allowed_uids
    if credentials.uid not in allowed:
        raise ForbiddenPeer(
            f"the peer (pid {credentials.pid}) runs as uid {credentials.uid}; this channel "
            f"accepts uid {os.getuid()} only (pass allowed_uids= to accept others)"
        )


class ListenerSocket:
    """A bound, listening, non-blocking socket at *path*; `close()` removes the file."""

    def __init__(self, path: str | os.PathLike[str], transport: Transport, backlog: int) -> None:
        self.path = check_path(path)
        self.transport = transport
        ensure_private_dir(os.path.dirname(os.path.abspath(self.path)))
        _clear_stale(self.path)
        sock = new_socket(transport)
        try:
            with os_errors(f"listening at {self.path}"):
                try:
                    sock.bind(self.path)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise AddressInUse(
                            f"{self.path} was taken by another listener meanwhile"
                        ) from exc
                    raise
                # The folder is private, so nobody can connect during the
                # moment the socket has the umask's mode.
                os.chmod(self.path, 0o600)
                self._inode = os.stat(self.path).st_ino
                sock.listen(backlog)
                sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            # Only our own file: a later listener may have replaced a stale one.
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            sock.close()


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AddressInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its listener is gone
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EPROTOTYPE, errno.EAGAIN):
            raise AddressInUse(f"{path} exists and cannot be probed: {exc}") from exc
    finally:
        probe.close()
    raise AddressInUse(f"another process is listening at {path}")
