"""One client connection of the broker: its outgoing replies, their fds, and its waiting gets.

Replies are posted from synchronous code (the registry's actions, a get woken
by another client's seal, a lease timer). One with nothing queued before it
goes out at once if the socket takes it; the rest are sent in order by whoever
flushes: the connection's task after the request that queued them (its reader
paused until then), or a drain task for what is posted while the reader idles.
Every fd posted with a reply belongs to the session from then on and is closed
once sent, or when the session closes.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from dataclasses import dataclass, field

from blobplane.broker.protocol import Create, Get, Reply, encode
from blobplane.broker.registry import ClientId
from blobplane.channel.aio import AsyncChannel, ChannelReader
from blobplane.errors import BlobBusy, BlobError
from blobplane.types import BlobId
from blobplane.wire import UserPayload

__all__ = ["Session", "Waiter"]


@dataclass(eq=False)
class Waiter:
    """A get parked until its blob is sealed (or a blob with its key appears), or it times out."""

    session: Session
    request: Get
    timer: asyncio.TimerHandle | None = None
    on: BlobId | str | None = None  # what it is parked on right now


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass(eq=False)
class Session:
    client: ClientId
    channel: AsyncChannel
    name: str = ""
    bound_to: BlobId | None = None  # a per-blob token's one blob
    # Set while the reader handles a request: it flushes what is queued afterwards.
    busy: bool = False
    waiters: dict[Waiter, None] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    # The channel's callback reader handles each request synchronously; what has
    # to await (a create, a flush while the client does not read) pauses it and
    # wakes the session's task through `wake`, which also carries the reader's end.
    reader: ChannelReader | None = None
    wake: asyncio.Future[Create | None] | None = None
    # The reader's end while the task was awake (`wake` already used).
    late_end: Exception | None = None
    # The producers whose pool slots this client was handed: told `ProducerGone`
    # when one of them disconnects, as the client keeps those slots mapped.
    pooled_from: set[ClientId] = field(default_factory=set)
    _outbox: deque[tuple[bytes, tuple[int, ...]]] = field(default_factory=deque)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _drain: asyncio.Task[None] | None = None
    _closed: bool = False

    def post(self, reply: Reply, fds: tuple[int, ...] = ()) -> None:
        """Send *reply* with *fds* (now the session's) at once, or queue it.

        A reply with nothing queued before it goes out at once if the socket
        takes it. What has to wait is sent by the reader's flush after the
        request it is handling, or else by a drain task, in order.
        """
        if self._closed:
            _close_all(fds)
            return
        try:
            data = encode(reply)
        except BaseException:
            _close_all(fds)
            raise
        if not self._outbox and not self._lock.locked():
            try:
                sent = self.channel._try_send_built(UserPayload(data=data), fds)
            except BlobBusy:
                sent = None
            except BlobError:
                sent = -1  # the peer is gone or broke: the reader finds out and ends the session
            if sent is not None:
                _close_all(fds)
                return
        self._outbox.append((data, fds))
        if not self.busy and not self._lock.locked() and self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_now())

    async def flush(self) -> None:
        """Send everything queued, in order; waits while the client does not read."""
        if not self._outbox:
            return  # a drain that took the last reply still sends it before anything newer
        async with self._lock:
            while self._outbox:
                data, fds = self._outbox.popleft()
                try:
                    # Encoded from a reply the broker built: no need to check it once more.
                    await self.channel._send_built(UserPayload(data=data), fds, timeout=None)
                finally:
                    _close_all(fds)

    async def _drain_now(self) -> None:
        try:
            await self.flush()
        except BlobError:
            pass  # the peer is gone or broke: the reader finds out and ends the session
        finally:
            self._drain = None

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def close(self) -> None:
        """Close the connection and every fd still queued; closing twice is fine."""
        self._closed = True
        self.channel.close()
        while self._outbox:
            _close_all(self._outbox.popleft()[1])
        drain, self._drain = self._drain, None
        if drain is not None and drain is not asyncio.current_task():
            drain.cancel()
