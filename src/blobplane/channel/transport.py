"""Unix sockets for channels: which type, the listening socket, and who is on the other end.

The listening socket may live in any folder this user can write to; a
folder that does not exist yet is made private (0700). The socket itself is
0600 from its first moment (it is bound in a private staging folder and
linked into place), so only this user can connect at all; `SO_PEERCRED`
then names the peer's uid, pid and gid, and by default only this uid is
accepted, on both ends.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import sys
import tempfile
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
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            ensure_private_dir(folder)
        _clear_stale(self.path)
        sock = new_socket(transport)
        try:
            with os_errors(f"listening at {self.path}"):
                _bind_0600(sock, self.path, folder)
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


def _bind_0600(sock: socket.socket, path: str, folder: str) -> None:
    """Bind *sock* at *path* as a socket file of mode 0600 from its first moment.

    A socket file takes the umask's mode at bind; bound in a private staging
    folder of the same filesystem, set to 0600 there and hard-linked into
    place, nobody else can ever connect to it. The link fails if *path* was
    taken meanwhile, instead of replacing it.
    """
    staging = tempfile.mkdtemp(prefix=".blobplane-", dir=folder)
    staged = os.path.join(staging, "s")
    try:
        if len(os.fsencode(staged)) > _MAX_PATH:
            # Too long to stage beside it: bind in place with a umask that leaves
            # no permission to anyone else (process-wide, for the length of a bind).
            old = os.umask(0o177)
            try:
                _bind(sock, path)
            finally:
                os.umask(old)
            return
        _bind(sock, staged)
        os.chmod(staged, 0o600)
        try:
            os.link(staged, path)
        except FileExistsError:
            raise AddressInUse(f"{path} was taken by another listener meanwhile") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        os.rmdir(staging)


def _bind(sock: socket.socket, path: str) -> None:
    try:
        sock.bind(path)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{path} was taken by another listener meanwhile") from exc
        raise


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
