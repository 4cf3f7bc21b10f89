"""What the sync and asyncio channels have in common besides the operations: state and options."""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Callable, Container, Sequence
from typing import TypeAlias, TypeVar

from blobplane.auto_pool import PoolSetting
from blobplane.channel import ops
from blobplane.channel.core import DEFAULT_TIMEOUT, ChannelCore
from blobplane.channel.transport import (
    ListenerSocket,
    PeerCredentials,
    Transport,
    default_transport,
    socket_pair,
)
from blobplane.errors import InvalidSize
from blobplane.types import is_number
from blobplane.wire import MAX_FDS_PER_MESSAGE, MAX_FRAME_SIZE, Message, UserPayload

__all__ = [
    "DEFAULT",
    "ChannelBase",
    "ListenerBase",
    "TimeoutArg",
    "as_message",
    "channel_pair",
]


class _Default(enum.Enum):
    DEFAULT = "the channel's timeout"


# Passed for a call's `timeout`: use the channel's own `timeout` attribute.
DEFAULT = _Default.DEFAULT
TimeoutArg: TypeAlias = float | _Default | None


def as_message(message: Message | bytes | bytearray | memoryview) -> tuple[Message, bool]:
    """Bytes travel as a `UserPayload`, messages as they are; and whether to validate it.

    A payload made here from bytes is valid by construction; a message built
    by the caller is checked once more as the peer would (`Connection.frame`).
    """
    if type(message) is bytes:
        return UserPayload(data=message), False
    if isinstance(message, _BYTES):
        return UserPayload(data=bytes(message)), False
    return message, True


_BYTES = (bytes, bytearray, memoryview)


# Longer than any process lives: a timeout beyond it waits forever, as None does, since
# the kernel's and poll()'s timeouts overflow well before math.inf.
FOREVER_S = 10**9


C = TypeVar("C")


def channel_pair(wrap: Callable[[socket.socket], C], transport: Transport | None) -> tuple[C, C]:
    """Two connected sockets, each wrapped by *wrap* (a sync or an asyncio channel)."""
    left, right = socket_pair(transport or default_transport())
    try:
        first = wrap(left)
    except BaseException:
        right.close()
        raise
    return first, wrap(right)


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and (not is_number(timeout) or not timeout >= 0):  # NaN too
        raise InvalidSize(f"a timeout is a number of seconds >= 0 or None, got {timeout!r}")
    return None if timeout is not None and timeout >= FOREVER_S else timeout


def connect_limit(timeout: float | None, wait: float) -> float | None:
    """How long a connect may take: *timeout*, but at least the *wait* for a listener."""
    limit = check_timeout(timeout)
    if wait > 0 and limit is not None:
        limit = max(limit, wait)
    return limit


class ChannelBase:
    """One end of a control channel over a connected AF_UNIX socket (which it now owns)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        allowed_uids: Container[int] | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_fds: int = MAX_FDS_PER_MESSAGE,
    ) -> None:
        self._core = ChannelCore(
            sock, allowed_uids=allowed_uids, max_frame_size=max_frame_size, max_fds=max_fds
        )
        try:
            self.timeout = check_timeout(timeout)
        except BaseException:
            self._core.close()  # the socket is ours from the first line on
            raise

    @property
    def peer_credentials(self) -> PeerCredentials:
        """The peer's pid, uid and gid (SO_PEERCRED, as of when the connection was made)."""
        return self._core.peer

    @property
    def transport(self) -> Transport:
        return "seqpacket" if self._core.framing == "datagram" else "stream"

    @property
    def payload_limit(self) -> int:
        """The most bytes `send_bytes` carries inside a message; more go in a memfd."""
        return self._core.wire.payload_limit

    @property
    def allow_sparse(self) -> bool:
        """Whether received blobs may have pages not allocated yet (default: False, refused).

        Reading such a page allocates it in this process, charged to its
        memory limit; refused blobs raise `SparseBlob` and the sender is told.
        """
        return self._core.allow_sparse

    @allow_sparse.setter
    def allow_sparse(self, allow: bool) -> None:
        self._core.allow_sparse = bool(allow)

    auto_pool = PoolSetting(
        """Where `send_bytes` and `send_obj` copy a payload too large for a message.

        By default the process's pool (`default_auto_pool()`), shared by its
        channels; another `AutoPool` for other bounds; None for a fresh sealed
        memfd every time.
        """
    )

    @property
    def closed(self) -> bool:
        return self._core.closed

    def fileno(self) -> int:
        """The socket's fd (-1 once closed or broken); for selectors, never for I/O."""
        return self._core.fileno()

    def close(self) -> None:
        """Close the socket and every fd received but not handed out; closing twice is fine."""
        self._core.close()

    def try_send_payload(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send *data* as a `UserPayload` with *fds* (borrowed), if that needs no wait.

        For code that must not wait, such as an event loop's callback. True:
        it went, whole, with its fds. False: nothing was sent, as it would
        have to wait: the socket is full, another task's send waits for room,
        or replies owed from earlier do; and always on a stream socket, which
        may take a frame in part. Then `send_payload` sends it, waiting. Raises
        what `send` raises for a closed or broken channel.
        """
        payload = UserPayload(data=data)
        return ops.try_send(self._core, payload, fds, validate=False) is not None

    def _timeout(self, timeout: TimeoutArg) -> float | None:
        return self.timeout if timeout is DEFAULT else check_timeout(timeout)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("broken" if self._core.failure else "open")
        peer = self._core.peer
        return (
            f"<{type(self).__name__} {self.transport} peer pid={peer.pid} uid={peer.uid} {state}>"
        )


class ListenerBase:
    """A listening socket at `path` (mode 0600 in a private 0700 folder).

    Channels it accepts get its `timeout` and `allowed_uids`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        transport: Transport | None = None,
        backlog: int = socket.SOMAXCONN,
        timeout: float | None = DEFAULT_TIMEOUT,
        allowed_uids: Container[int] | None = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.allowed_uids = allowed_uids
        self._socket = ListenerSocket(path, transport or default_transport(), backlog)

    @property
    def path(self) -> str:
        return self._socket.path

    @property
    def transport(self) -> Transport:
        return self._socket.transport

    @property
    def closed(self) -> bool:
        return self._socket.sock is None

    def fileno(self) -> int:
        return self._socket.fileno()

    def _timeout(self, timeout: TimeoutArg) -> float | None:
        return self.timeout if timeout is DEFAULT else check_timeout(timeout)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.transport} {self.path} {state}>"
