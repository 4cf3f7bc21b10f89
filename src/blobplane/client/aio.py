"""The asyncio broker client: ``await connect_broker_async()`` returns an `AsyncBrokerClient`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
import weakref
from collections import deque
from types import TracebackType
from typing import Any, Self, TypeAlias, TypeVar

from blobplane.blobs import ProducerBlob
from blobplane.broker.address import ENV_TOKEN, resolve_socket
from blobplane.broker.protocol import BlobEntry, Delete, Request, SlotFree, StatsEntry, Welcome
from blobplane.channel import DEFAULT, aio
from blobplane.channel.outbox import Outbox
from blobplane.client.core import (
    DEFAULT_TIMEOUT,
    Answer,
    AutoPoolOption,
    Call,
    ClientCore,
    Op,
    Target,
    checked,
    let_go,
    no_broker,
)
from blobplane.client.handles import AsyncBrokerBlob, BrokerRead
from blobplane.errors import (
    BlobClosed,
    BlobError,
    BrokenResource,
    ConnectionClosed,
    ConnectionRefused,
    Timeout,
)
from blobplane.objects.allowlist import AllowList
from blobplane.objects.codec import DEFAULT_THRESHOLD, Packed, pack, unpack
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import BlobId
from blobplane.wire import Message

__all__ = ["AsyncBrokerClient", "connect_broker_async"]

T = TypeVar("T")

_Delivery: TypeAlias = Answer | BlobError


class _Expired(Exception):
    """A request's wait for its reply reached the deadline (turned into `Timeout`)."""


def _expire(future: asyncio.Future[_Delivery]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def _delivered(delivery: _Delivery) -> Answer:
    if isinstance(delivery, BlobError):
        raise type(delivery)(*delivery.args) from delivery
    return delivery


class AsyncBrokerClient(AutoPoolOption):
    """An asyncio connection to the broker; made by ``await connect_broker_async()``.

    A reader (a callback of the event loop) takes in every reply and
    notification, so many tasks may call the broker at once over one connection.
    """

    def __init__(self, channel: aio.AsyncChannel, *, timeout: float | None) -> None:
        self._channel = channel
        self._core = ClientCore(self._post)
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        # One future per request waiting for its reply (None between the parts of a
        # listing); replies that come while nobody awaits them wait in `_early`.
        self._pending: dict[int, asyncio.Future[_Delivery] | None] = {}
        self._early: dict[int, deque[_Delivery]] = {}
        self._outbox = Outbox(channel)
        self._posted: list[bytes] = []  # requests without a reply, sent on the next turn
        self._slot_freed = asyncio.Event()
        self._failure: BlobError | None = None
        self._closed = False
        # Also run when the client is dropped unclosed, or at exit (`BrokerClient`'s).
        self._let_go = weakref.finalize(self, let_go, self._core.slot_owner, channel)
        # A callback of the loop takes in every reply as it arrives: no task
        # step and no loop turn of its own between the reply and its caller.
        self._reader = channel.read_forever(self._on_message, self._on_reader_error)

    @property
    def welcome(self) -> Welcome:
        assert self._core.welcome is not None
        return self._core.welcome

    @property
    def closed(self) -> bool:
        return self._closed

    async def put_bytes(
        self,
        data: object,
        *,
        key: str | None = None,
        lease_ms: int | None = None,
        sealed: bool = False,
    ) -> BlobEntry:
        """See `BrokerClient.put_bytes`."""
        return await self._run(self._core.put_bytes(data, key, lease_ms, sealed))

    async def put(
        self, blob: ProducerBlob, *, key: str | None = None, lease_ms: int | None = None
    ) -> BlobEntry:
        return await self._run(self._core.put(blob, key, lease_ms))

    async def put_pooled(
        self, loan: PoolLoan, *, key: str | None = None, lease_ms: int | None = None
    ) -> BlobEntry:
        return await self._run(self._core.put_pooled(loan, key, lease_ms))

    async def create(
        self, size: int, *, key: str | None = None, lease_ms: int | None = None
    ) -> AsyncBrokerBlob:
        entry, mapped = await self._run(self._core.create(size, key, lease_ms))
        return AsyncBrokerBlob(entry, mapped, seal=self._seal, discard=self._discard)

    async def get(self, target: Target, *, timeout: float | None = None) -> BrokerRead:
        """See `BrokerClient.get`."""
        return await self._run(self._core.get(target, timeout, self.timeout))

    async def release(self, blob: BlobId | uuid.UUID) -> None:
        await self._run(self._core.release(blob))

    async def delete(self, target: Target) -> None:
        await self._run(self._core.delete(target))

    async def renew(self, target: Target, lease_ms: int | None) -> BlobEntry:
        return await self._run(self._core.renew(target, lease_ms))

    async def stats(self) -> StatsEntry:
        return await self._run(self._core.stats())

    async def put_object(
        self,
        obj: object,
        *,
        key: str | None = None,
        pool: BlobPool | None = None,
        lease_ms: int | None = None,
        threshold: int = DEFAULT_THRESHOLD,
        sealed: bool = False,
    ) -> BlobEntry:
        """See `BrokerClient.put_object` (the pickling itself runs in the event loop)."""
        if pool is not None:
            with await self.loan(pool) as loan:
                pack(obj, loan, threshold=threshold)
                return await self.put_pooled(loan, key=key, lease_ms=lease_ms)
        packed = Packed(obj, threshold)
        return await self._run(
            self._core.put_filled(packed.size, packed.write, key, lease_ms, sealed)
        )

    async def get_object(
        self,
        target: Target,
        *,
        timeout: float | None = None,
        restricted: bool | AllowList = False,
    ) -> Any:
        """See `BrokerClient.get_object`."""
        return unpack(await self.get(target, timeout=timeout), restricted=restricted)

    async def mint_read_token(self, target: Target, *, ttl: float | None = None) -> str:
        return await self._run(self._core.mint_read_token(target, ttl))

    async def loan(self, pool: BlobPool, *, timeout: float | None = None) -> PoolLoan:
        """A free slot of *pool*, waiting for the broker to give published slots back."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    loan = pool.try_loan()
                    if loan is not None:
                        return loan
                    self._check_usable()
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
        except TimeoutError:
            raise Timeout(f"no slot of the pool came back within {timeout} s") from None

    def close(self) -> None:
        """Disconnect; the broker releases every reference this connection held."""
        if self._closed:
            return
        self._closed = True
        self._reader.stop()
        self._outbox.close()
        self._core.close()
        self._let_go()  # the slots the broker keeps, before it hears of the disconnection
        self._fail(BlobClosed("this broker client is closed"))

    async def aclose(self) -> None:
        self.close()
        await asyncio.sleep(0)  # the outbox's drain, cancelled, ends

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncBrokerClient {self._channel!r}>"

    async def hello(self, token: str | None = None, name: str = "") -> Welcome:
        """Present *token* and *name* to the broker; `connect_broker_async` does it, once."""
        return await self._run(self._core.hello(token, name))

    async def _seal(self, blob: BlobId) -> None:
        await self._run(self._core.seal(blob))

    def _discard(self, blob: BlobId) -> None:
        self._post(Delete(rid=self._core.rid(), id=blob.uuid, ack=False))

    def _check_usable(self) -> None:
        if self._closed:
            raise BlobClosed("this broker client is closed")
        if self._failure is not None:
            raise type(self._failure)(*self._failure.args) from self._failure

    async def _run(self, op: Op[T]) -> T:
        rids: set[int] = set()
        try:
            call = next(op)
            while True:
                rids.add(call.request.rid)
                try:
                    answer = await self._exchange(call)
                except BaseException as exc:
                    call = op.throw(exc)
                else:
                    call = op.send(answer)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            op.close()
            for rid in rids:
                self._forget(rid)

    async def _exchange(self, call: Call) -> Answer:
        rid = call.request.rid
        early = self._early.get(rid)
        if early:
            return _delivered(early.popleft())
        future: asyncio.Future[_Delivery] = self._loop.create_future()
        self._pending[rid] = future
        self._check_usable()  # after the future exists: a failure from now on reaches it
        if call.send:
            try:
                await self._send(checked(call.request), call.fds)
            except ConnectionClosed:
                # The broker may have said why before it hung up: the reader takes it in.
                await asyncio.sleep(0)
                self._check_usable()
                raise
        limit = self.timeout if call.wait is DEFAULT else call.wait
        # A timer only, not `asyncio.timeout()`: the reply usually beats it by far.
        timer = None if limit is None else self._loop.call_later(limit, _expire, future)
        try:
            delivery = await future
        except _Expired:
            raise self._core.abandon(call) from None
        except BaseException:
            # Cancelled: a reply that comes after all must still be undone, and so
            # must one the reader delivered before the task could run again.
            self._core.abandon(call)
            if future.done() and not future.cancelled() and future.exception() is None:
                delivered = future.result()
                if not isinstance(delivered, BlobError):
                    self._core.unsolicited(*delivered)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return _delivered(delivery)

    async def _send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send a request: at once if the socket takes it, else in turn with other senders."""
        if self._posted:
            self._send_posted()  # releases and deletes go in the order they were made
        await self._outbox.send(data, fds, timeout=self.timeout)

    def _forget(self, rid: int) -> None:
        """Stop listening for *rid*; replies already here for it are undone."""
        self._pending.pop(rid, None)
        for delivery in self._early.pop(rid, ()):
            if not isinstance(delivery, BlobError):
                self._core.unsolicited(*delivery)

    def _on_message(self, message: Message, fds: tuple[int, ...]) -> None:
        """The reader's callback: hand a reply to its caller, or take in a notification.

        It never raises: the fds are closed or handed on whatever happens.
        """
        try:
            reply = self._core.decode(message, fds)  # closes the fds if it raises
            rid = getattr(reply, "rid", 0)
            if rid in self._pending:
                future = self._pending[rid]
                if future is not None and not future.done():
                    # The caller's task runs on the loop's next turn; what else came
                    # is read first, a recvmsg that usually finds nothing.
                    future.set_result((reply, fds))
                    self._pending[rid] = None
                else:
                    self._early.setdefault(rid, deque()).append((reply, fds))
                return
            self._core.unsolicited(reply, fds)  # closes the fds first
            if isinstance(reply, SlotFree):
                self._slot_freed.set()
        except BlobError as exc:
            self._reader.stop()
            self._fail(exc)
        except Exception as exc:
            # A bug of ours: raising would let the reader close fds handed on already.
            self._reader.stop()
            failure = BrokenResource(f"the broker client's reader failed: {exc!r}")
            failure.__cause__ = exc
            self._fail(failure)

    def _on_reader_error(self, error: Exception) -> None:
        if isinstance(error, BlobError):
            self._fail(error)
        else:  # `_on_message` does not raise: only a bug gets here
            self._fail(BrokenResource(f"the broker client's reader failed: {error!r}"))

    def _fail(self, error: BlobError) -> None:
        if self._failure is None:
            self._failure = error
        for future in self._pending.values():
            if future is not None and not future.done():
                future.set_result(error)
        self._slot_freed.set()

    def _post(self, request: Request) -> None:
        """Send a request that gets no reply, soon (`MappedRead.close()` may run anywhere)."""
        if self._closed or self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._post, request)
            return
        # Not sent from inside close(): the caller goes on at once, and the loop
        # sends every release posted meanwhile on its next turn, without a task.
        self._posted.append(checked(request))
        if len(self._posted) == 1:
            self._loop.call_soon(self._send_posted)

    def _send_posted(self) -> None:
        posted, self._posted = self._posted, []
        for data in posted:
            self._outbox.post(data)

    # Last in the class: from here on `list` names this method in the class body.
    async def list(self, *, include_deleted: bool = False) -> list[BlobEntry]:
        return await self._run(self._core.listing(include_deleted))


async def connect_broker_async(
    path: str | os.PathLike[str] | None = None,
    token: str | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    name: str = "",
    wait: float = 0.0,
) -> AsyncBrokerClient:
    """`connect_broker` for asyncio."""
    socket_path = resolve_socket(path)
    token = token if token is not None else os.environ.get(ENV_TOKEN)
    try:
        channel = await aio.connect(socket_path, timeout=timeout, wait=wait)
    except ConnectionRefused as exc:
        raise no_broker(socket_path, exc) from exc
    client = AsyncBrokerClient(channel, timeout=timeout)
    try:
        await client.hello(token, name)
    except BaseException:
        await client.aclose()
        raise
    return client
