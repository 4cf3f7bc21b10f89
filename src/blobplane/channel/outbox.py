"""Payloads sent in order over one asyncio channel, from code that cannot wait.

A broker session posts replies from the registry's actions and timers; a
broker client posts releases from `close()`, which may run anywhere. Each
posted payload goes out at once if nothing is queued before it and the
socket takes it (`try_send_payload`, no task, no loop turn); otherwise it is
queued and sent in order by whoever flushes: the owner, after the work it
is doing (`hold`), or else a drain task. An awaited send (`send`) goes in
turn after what is queued.

Fds posted with a payload belong to the outbox from then on: closed once
sent, dropped, or when the outbox closes. What may wait is bounded
(`max_payloads`, `max_fds`): past a bound the payload is dropped and
`on_overflow` called, for a peer that does not read to be cut off rather
than pin memory and fds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from blobplane.channel.aio import AsyncChannel
from blobplane.channel.base import TimeoutArg
from blobplane.errors import BlobBusy, BlobError
from blobplane.fds import close_fds

__all__ = ["Outbox"]


class Outbox:
    """Encoded payloads for *channel*, sent in the order they were posted."""

    def __init__(
        self,
        channel: AsyncChannel,
        *,
        max_payloads: int | None = None,
        max_fds: int | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.channel = channel
        self.max_payloads = max_payloads
        self.max_fds = max_fds
        self.on_overflow = on_overflow
        # While set, the owner flushes when its work is done: no drain task is started.
        self.hold = False
        self._queue: deque[tuple[bytes, tuple[int, ...]]] = deque()
        self._queued_fds = 0
        self._lock = asyncio.Lock()
        self._drain: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Payloads waiting to be sent."""
        return len(self._queue)

    @property
    def queued_fds(self) -> int:
        """Fds held by the payloads that wait."""
        return self._queued_fds

    def post(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send *data* with *fds* (now the outbox's) now, or queue it; never waits.

        A channel that is closed or broken drops it (the reader finds out and
        ends what uses the channel).
        """
        if self._closed:
            close_fds(fds)
            return
        if not self._queue and not self._lock.locked():
            try:
                sent = self.channel.try_send_payload(data, fds)
            except BlobBusy:
                sent = False
            except BlobError:
                sent = True  # gone or broken: nothing will ever take it
            if sent:
                close_fds(fds)
                return
        if (self.max_payloads is not None and len(self._queue) >= self.max_payloads) or (
            self.max_fds is not None and self._queued_fds + len(fds) > self.max_fds
        ):
            close_fds(fds)
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self._queue.append((data, fds))
        self._queued_fds += len(fds)
        if not self.hold and not self._lock.locked() and self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_now())

    async def flush(self, *, timeout: TimeoutArg = None) -> None:
        """Send everything queued, in order, waiting for room as long as it takes."""
        if not self._queue:
            return  # a drain that took the last payload still sends it before anything newer
        async with self._lock:
            await self._send_queued(timeout)

    async def send(
        self, data: bytes, fds: Sequence[int] = (), *, timeout: TimeoutArg = None
    ) -> None:
        """Send *data* with *fds* (borrowed) after what is queued, waiting for room."""
        if not self._queue and not self._lock.locked() and self.channel.try_send_payload(data, fds):
            return
        async with self._lock:
            await self._send_queued(timeout)
            await self.channel.send_payload(data, fds, timeout=timeout)

    def close(self) -> None:
        """Drop what waits, closing its fds; closing twice is fine. The channel stays open."""
        self._closed = True
        while self._queue:
            close_fds(self._queue.popleft()[1])
        self._queued_fds = 0
        drain, self._drain = self._drain, None
        if drain is not None and drain is not asyncio.current_task():
            drain.cancel()

    async def _send_queued(self, timeout: TimeoutArg) -> None:
        while self._queue:
            data, fds = self._queue.popleft()
            self._queued_fds -= len(fds)
            try:
                await self.channel.send_payload(data, fds, timeout=timeout)
            finally:
                close_fds(fds)

    async def _drain_now(self) -> None:
        try:
            await self.flush()
        except BlobError:
            pass  # gone or broken: the reader finds out and ends what uses the channel
        finally:
            self._drain = None
