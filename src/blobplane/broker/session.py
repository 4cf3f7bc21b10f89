"""One client connection of the broker: its outgoing replies, their fds, and its waiting gets.

Replies are posted from synchronous code (the registry's actions, a get woken
by another client's seal, a lease timer). One with nothing queued before it
goes out at once if the socket takes it; the rest are sent in order by whoever
flushes: the connection's task after the request that queued them (its reader
paused until then), or a drain task for what is posted while the reader idles.
Every fd posted with a reply belongs to the session from then on and is closed
once sent, or when the session closes.

What waits is bounded (`max_queued_replies`, `max_queued_fds`): a client that
lets more pile up (gets parked and answered while it does not read, say) is
disconnected, its queued fds closed, rather than pinning the broker's fds.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field

from blobplane.broker.protocol import Create, Get, Reply, encode
from blobplane.broker.registry import ClientId
from blobplane.broker.rights import Grant
from blobplane.channel.aio import AsyncChannel, ChannelReader
from blobplane.channel.outbox import Outbox
from blobplane.errors import BlobError
from blobplane.fds import close_fds
from blobplane.types import BlobId

__all__ = ["MAX_QUEUED_FDS", "MAX_QUEUED_REPLIES", "Session", "Waiter"]

# Per connection. A reply carries at most one fd, and a client that reads its
# socket never has more than a few queued: these bound only a client that does not.
MAX_QUEUED_REPLIES = 4096
MAX_QUEUED_FDS = 64


@dataclass(eq=False)
class Waiter:
    """A get parked until its blob is sealed (or a blob with its key appears), or it times out."""

    session: Session
    request: Get
    timer: asyncio.TimerHandle | None = None
    on: BlobId | str | None = None  # what it is parked on right now


@dataclass(eq=False)
class Session:
    client: ClientId
    channel: AsyncChannel
    name: str = ""
    account: str = ""  # whose quota (and waiting gets) this connection counts against
    max_queued_replies: int = MAX_QUEUED_REPLIES
    max_queued_fds: int = MAX_QUEUED_FDS
    # Set once the client let too much pile up: the connection is being dropped.
    overflowed: bool = False
    welcomed: bool = False  # said a hello the broker accepted
    token_grant: Grant | None = None  # what a token granted: checked again at each request
    displaced: str = ""  # why the broker ended it to make room for a newer connection
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
    outbox: Outbox = field(init=False)

    def __post_init__(self) -> None:
        self.outbox = Outbox(
            self.channel,
            max_payloads=self.max_queued_replies,
            max_fds=self.max_queued_fds,
            on_overflow=self._overflow,
        )

    def post(self, reply: Reply, fds: tuple[int, ...] = ()) -> None:
        """Send *reply* with *fds* (now the session's) at once, or queue it (see `Outbox`).

        While the reader handles a request (`busy`), what has to wait is
        flushed by the session's task after the request.
        """
        if self.overflowed:
            close_fds(fds)
            return
        try:
            data = encode(reply)
        except BaseException:
            close_fds(fds)
            raise
        self.outbox.hold = self.busy
        self.outbox.post(data, fds)

    async def flush(self) -> None:
        """Send everything queued, in order; waits while the client does not read."""
        await self.outbox.flush()

    @property
    def pending(self) -> int:
        return self.outbox.pending

    @property
    def queued_fds(self) -> int:
        return self.outbox.queued_fds

    def _overflow(self) -> None:
        """Drop a client that does not read its replies: shut its socket down.

        Its pending send (if the task waits in one) fails and its reader sees
        the end, so the session ends by the usual path, which closes the rest.
        """
        if self.overflowed:
            return
        self.overflowed = True
        self.outbox.close()
        try:
            with socket.socket(fileno=os.dup(self.channel.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, BlobError):
            pass  # already closed or broken: its end is on the way

    def close(self) -> None:
        """Close the connection and every fd still queued; closing twice is fine."""
        self.outbox.close()
        self.channel.close()
