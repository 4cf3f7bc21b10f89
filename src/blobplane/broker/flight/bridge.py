"""The broker's side of its Flight endpoint: each step of a Flight call, run in the broker's loop.

gRPC runs the Flight handlers in threads of its own, while everything the
broker holds (the registry, the fd table, the parked gets) belongs to its
event loop and is never touched from elsewhere. So a handler asks the loop
(`Bridge.call`: `call_soon_threadsafe` and a future it waits on) for each
step that reads or changes that state, and does the slow part, moving bytes,
in its own thread, on a mapping of a duplicated fd. The rules are the
registry's own: each Flight call is a registry client of its own for as long
as it lasts, connected with the grant its token gives, so rights, per-blob
tokens, quotas and the memory limit apply exactly as on the local socket; a
get counts a reference until the stream ends, and a call that ends any other
way than by completing is disconnected, which releases what it held and
frees an upload it never sealed. An upload that sends less than 1 MiB for
the upload timeout is disconnected by the loop itself (`attach` watches it): its
reservation goes at once, and so do the pages it wrote, even while its gRPC
thread still waits for the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from blobplane.backends.kernel import punch_hole
from blobplane.backends.mapping import physical_memory
from blobplane.broker import memory
from blobplane.broker.flight.config import DEFAULT_UPLOAD_TIMEOUT_S
from blobplane.broker.flight.filling import stalled
from blobplane.broker.flight.tickets import PutCommand
from blobplane.broker.logs import event
from blobplane.broker.registry import BlobInfo, BlobState, ClientId, Pending
from blobplane.broker.rights import Grant, Right
from blobplane.errors import (
    BlobDeleted,
    BlobNotFound,
    BrokerShutdown,
    InvalidSize,
    RightMissing,
    Timeout,
    TokenRefused,
    os_errors,
)
from blobplane.sizes import format_size
from blobplane.types import BlobId

if TYPE_CHECKING:
    from blobplane.broker.server import BrokerServer

__all__ = ["Bridge", "Reading", "Writing"]

T = TypeVar("T")

# A step in the loop takes microseconds; this bounds only a loop that has stopped.
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Reading:
    """A get for a Flight stream: its registry client (holding one reference) and an fd to map."""

    client: ClientId
    fd: int
    info: BlobInfo
    lease_left_ms: int | None  # of the blob's lease when it was got (None: no lease)


@dataclass(slots=True)
class Writing:
    """An upload: its registry client (the blob's owner until sealed) and the blob it fills.

    *received* (bytes so far) is counted by the call's thread and watched by
    the loop, which sets *stalled* when it withdraws the upload.
    """

    client: ClientId
    info: BlobInfo
    received: int = 0
    stalled: bool = False


# How often a gRPC thread asks again for a blob being restored from disk: a
# restore reads megabytes, so a few milliseconds of delay are lost in it.
_RESTORE_POLL_S = 0.005


class _Restoring(Exception):
    """A spilled blob is on its way back; the Flight get asks again (`Bridge.read`)."""

    def __init__(self, blob_id: BlobId) -> None:
        super().__init__(f"blob {blob_id} is being restored")
        self.blob_id = blob_id


class Bridge:
    """Runs the steps of Flight calls in the broker's loop; see the module doc."""

    def __init__(
        self,
        server: BrokerServer,
        loop: asyncio.AbstractEventLoop,
        upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT_S,
    ) -> None:
        self.server = server
        self.loop = loop
        self.closed = False
        self.upload_timeout = upload_timeout
        self._watches: dict[ClientId, asyncio.Task[None]] = {}

    # -- from gRPC's threads -------------------------------------------------------------

    def call(
        self,
        function: Callable[..., T],
        *args: Any,
        undo: Callable[[T], None] | None = None,
    ) -> T:
        """Run `function(*args)` in the loop and return what it returns (or raise what it raised).

        *undo* takes back a result nobody will receive (the loop answered after
        the wait gave up), so that no reference or fd is left behind.
        """
        if self.closed:
            raise BrokerShutdown("the broker is shutting down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = function(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: the broker has stopped
            raise BrokerShutdown("the broker has stopped") from None
        try:
            return future.result(CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            if not future.cancel() and undo is not None:
                future.add_done_callback(lambda done: _undo(done, undo))
            raise Timeout("the broker did not answer its Flight endpoint in time") from None

    def post(self, function: Callable[..., None], *args: Any) -> None:
        """Run `function(*args)` in the loop soon; nothing if the loop is gone (its state too)."""
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:
            pass

    # -- in the loop ---------------------------------------------------------------------

    def grant(self, token: str | None) -> Grant:
        if token is None:
            raise TokenRefused(
                "the broker's Flight endpoint serves only bearers of a token: send "
                "'authorization: Bearer <token>' (mint one with `blobplane token create`)"
            )
        return self.server.authority.grant(token)

    def connect(self, grant: Grant) -> ClientId:
        client = self.server.new_client_id()
        self.server.registry.connect(client, grant)
        return client

    def disconnect(self, client: ClientId) -> None:
        """The call is over: release its references, free what it never sealed."""
        watch = self._watches.pop(client, None)
        if watch is not None:
            watch.cancel()
        if self.server.registry.connected(client):
            self.server.apply(self.server.registry.disconnect(client))

    def stop(self) -> None:
        """No more watching uploads: the broker is stopping (and disconnects everything)."""
        for watch in self._watches.values():
            watch.cancel()
        self._watches.clear()

    def read(self, token: str | None, target: BlobId | str) -> Reading:
        """`open_read` in the loop, from a gRPC thread, waiting while a spilled blob comes back.

        The restore is the loop's own work (a read from disk in a thread);
        this thread asks again every few milliseconds until the blob is back,
        the restore failed (then the registry's answer is the error), or
        `CALL_TIMEOUT_S` passed.
        """
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            try:
                return self.call(self.open_read, token, target, undo=self.undo_read)
            except _Restoring as restoring:
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"blob {restoring.blob_id} did not come back from the spill folder in "
                        f"{CALL_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(_RESTORE_POLL_S)

    def open_read(self, token: str | None, target: BlobId | str) -> Reading:
        client = self.connect(self.grant(token))
        try:
            # Served from this process's mapping: the reader never holds the memory.
            result = self.server.registry.get(client, target, served=True)
            if isinstance(result, Pending):
                if result.restore:
                    self.server.apply(self.server.registry.restore(result.id))
                    raise _Restoring(result.id)
                raise BlobNotFound(
                    f"blob {result.id} is not sealed yet; the Flight endpoint serves sealed blobs"
                )
            fd = self.server.fds.dup(result.info.id)
        except BaseException:
            self.disconnect(client)
            raise
        info = result.info
        return Reading(client, fd, info, self.server.registry.lease_left_ms(info))

    def undo_read(self, reading: Reading) -> None:
        os.close(reading.fd)
        self.disconnect(reading.client)

    def upload_grant(self, token: str | None) -> Grant:
        """The grant of an upload's token; `RightMissing` unless it has the 'put' right."""
        grant = self.grant(token)
        if grant.blob is not None or not grant.allows(Right.PUT):
            held = ", ".join(sorted(right.value for right in grant.rights))
            raise RightMissing(
                f"an upload needs a token with the 'put' right; this one grants {held}"
                + (" of one blob" if grant.blob is not None else "")
            )
        return grant

    def open_write(self, token: str | None, command: PutCommand) -> Writing:
        """Reserve the blob an upload fills: its key, its bytes against the limit and the quota."""
        grant = self.upload_grant(token)
        if refusal := self.server.fd_refusal("a new blob"):
            raise refusal
        if command.size > physical_memory():
            raise InvalidSize(
                f"an upload of {format_size(command.size)} is larger than this host's "
                f"{format_size(physical_memory())} of memory"
            )
        # The broker allocates the blob and the upload fills it, as a client's create
        # does; the token's 'put' right is what allows it.
        client = self.connect(dataclasses.replace(grant, rights=grant.rights | {Right.CREATE}))
        try:
            placed = self.server.registry.create(
                client, command.size, key=command.key, lease_ms=command.lease_ms
            )
        except BaseException:
            self.disconnect(client)
            raise
        self.server.apply(placed.actions)
        self.server.wake(command.key)  # gets waiting for the key now wait for the seal
        return Writing(client, placed.info)

    def attach(self, writing: Writing, fd: int) -> int:
        """The fd table takes the memfd allocated for *writing*; returns a duplicate to fill."""
        blob_id = writing.info.id
        if not self.still_allocated(blob_id):
            os.close(fd)
            raise BlobDeleted(
                f"blob {blob_id} was withdrawn (deleted, or its lease ran out) while it was "
                "being allocated"
            )
        self.server.fds.add(blob_id, fd)
        with os_errors(f"duplicating the fd of blob {blob_id}"):
            filling = os.dup(fd)
        self._watches[writing.client] = self.loop.create_task(self._watch(writing))
        return filling

    async def _watch(self, writing: Writing) -> None:
        """Withdraw an upload that sends too little for the upload timeout (`stalled`), and
        what it wrote."""
        await stalled(lambda: writing.received, self.upload_timeout, writing.info.size)
        client, blob_id = writing.client, writing.info.id
        self._watches.pop(client, None)
        if not self.server.registry.connected(client) or not self.still_allocated(blob_id):
            return
        writing.stalled = True
        # The call's thread holds a duplicate of the fd until its client sends again or
        # goes away: the pages go now, with the blob and its reservation.
        punch_hole(self.server.fds.get(blob_id), 0, writing.info.size)
        self.disconnect(client)
        event(
            "flight.upload_stalled",
            logging.WARNING,
            blob=blob_id,
            key=writing.info.key,
            received=writing.received,
            size=writing.info.size,
            seconds=self.upload_timeout,
        )

    def commit(self, writing: Writing) -> BlobInfo:
        """Seal the filled blob and publish it; the upload's client goes, the blob stays."""
        client, blob_id = writing.client, writing.info.id
        registry = self.server.registry
        registry.check_seal(client, blob_id)
        fd = self.server.fds.get(blob_id)
        memory.seal(fd, blob_id, writing.info.size)
        self.server.fds.replace(blob_id, memory.reopen_readonly(fd))
        self.server.apply(registry.seal(client, blob_id))
        info = registry.info(blob_id)
        self.disconnect(client)
        return info

    def listing(self, token: str | None, prefix: str) -> list[BlobInfo]:
        client = self.connect(self.grant(token))
        try:
            return [
                info
                for info in self.server.registry.list(client)
                if info.state is BlobState.SEALED
                and (not prefix or (info.key is not None and info.key.startswith(prefix)))
            ]
        finally:
            self.disconnect(client)

    def describe(self, token: str | None, target: BlobId | str) -> BlobInfo:
        client = self.connect(self.grant(token))
        try:
            info = self.server.registry.check_get(client, target)
        finally:
            self.disconnect(client)
        if info.state is not BlobState.SEALED:
            raise BlobNotFound(f"blob {info.id} is not sealed yet")
        return info

    def still_allocated(self, blob_id: BlobId) -> bool:
        try:
            return self.server.registry.info(blob_id).state is BlobState.ALLOCATED
        except BlobNotFound:
            return False


def _undo(future: concurrent.futures.Future[T], undo: Callable[[T], None]) -> None:
    if not future.cancelled() and future.exception() is None:
        undo(future.result())
