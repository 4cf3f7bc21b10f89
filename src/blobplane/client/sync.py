"""The blocking broker client: `connect_broker()` returns a `BrokerClient`."""

from __future__ import annotations

import os
import time
import uuid
import weakref
from types import TracebackType
from typing import Any, Self, TypeVar

from blobplane.blobs import ProducerBlob
from blobplane.broker.address import ENV_TOKEN, resolve_socket
from blobplane.broker.protocol import BlobEntry, Delete, Request, StatsEntry, Welcome
from blobplane.channel import DEFAULT
from blobplane.channel import sync as sync_channel
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
from blobplane.client.handles import BrokerBlob, BrokerRead
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    BlobError,
    ConnectionClosed,
    ConnectionRefused,
    Timeout,
)
from blobplane.objects.allowlist import AllowList
from blobplane.objects.codec import DEFAULT_THRESHOLD, Packed, pack, unpack
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import BlobId

__all__ = ["BrokerClient", "connect_broker"]

T = TypeVar("T")


class BrokerClient(AutoPoolOption):
    """A blocking connection to the broker; made by `connect_broker()`."""

    def __init__(self, channel: sync_channel.Channel, *, timeout: float | None) -> None:
        self._channel = channel
        self._core = ClientCore(self._post)
        self.timeout = timeout
        self._deferred: list[Request] = []
        self._closed = False
        # Also run when the client is dropped unclosed, or at exit (before the channel's
        # own finalizer, made earlier): the kept slots go before the connection does.
        self._let_go = weakref.finalize(self, let_go, self._core.slot_owner, channel)

    @property
    def welcome(self) -> Welcome:
        """What the broker granted this connection (rights, quota, client number)."""
        assert self._core.welcome is not None
        return self._core.welcome

    @property
    def closed(self) -> bool:
        return self._closed

    def put_bytes(
        self,
        data: object,
        *,
        key: str | None = None,
        lease_ms: int | None = None,
        sealed: bool = False,
    ) -> BlobEntry:
        """Copy *data* (any buffer) into shared memory and publish it.

        Up to 60 KiB (`MAX_INLINE_PUT`) the bytes ride inside the request and
        the broker makes the sealed memfd. From 64 KiB up they go in a slot of
        `auto_pool` (memory this client reuses once the broker frees the blob,
        unless the broker gave it to a token holder); with *sealed*, with
        `auto_pool` None, or when the pool has no room, in a fresh memfd
        sealed against every write. Either way the blob stays published after
        this client goes, until it is deleted or its lease ends, and counts
        against its account.
        """
        return self._run(self._core.put_bytes(data, key, lease_ms, sealed))

    def put(
        self, blob: ProducerBlob, *, key: str | None = None, lease_ms: int | None = None
    ) -> BlobEntry:
        """Publish a memfd blob you sealed yourself; the broker keeps its own fd of it."""
        return self._run(self._core.put(blob, key, lease_ms))

    def put_pooled(
        self, loan: PoolLoan, *, key: str | None = None, lease_ms: int | None = None
    ) -> BlobEntry:
        """Publish a slot of your pool; it comes back to the pool once withdrawn and released."""
        return self._run(self._core.put_pooled(loan, key, lease_ms))

    def create(
        self, size: int, *, key: str | None = None, lease_ms: int | None = None
    ) -> BrokerBlob:
        """A blob of *size* bytes that the broker allocates and you fill, then `seal()`."""
        entry, mapped = self._run(self._core.create(size, key, lease_ms))
        return BrokerBlob(entry, mapped, seal=self._seal, discard=self._discard)

    def get(self, target: Target, *, timeout: float | None = None) -> BrokerRead:
        """The blob (by id or key), mapped read-only; `close()` it to release the reference.

        *timeout* None: an unsealed blob is waited for until it is sealed (or
        gone), and a key nobody has used is `BlobNotFound` at once. A number
        of seconds: wait up to that long for both, then `Timeout`.
        """
        return self._run(self._core.get(target, timeout, self.timeout))

    def release(self, blob: BlobId | uuid.UUID) -> None:
        """Give back one reference that a get counted (`BrokerRead.close()` does it for you)."""
        self._run(self._core.release(blob))

    def delete(self, target: Target) -> None:
        """Withdraw a blob: no new gets; it is freed when its readers let go."""
        self._run(self._core.delete(target))

    def renew(self, target: Target, lease_ms: int | None) -> BlobEntry:
        """Restart the blob's lease: it now ends *lease_ms* from now (None: never)."""
        return self._run(self._core.renew(target, lease_ms))

    def stats(self) -> StatsEntry:
        return self._run(self._core.stats())

    def put_object(
        self,
        obj: object,
        *,
        key: str | None = None,
        pool: BlobPool | None = None,
        lease_ms: int | None = None,
        threshold: int = DEFAULT_THRESHOLD,
        sealed: bool = False,
    ) -> BlobEntry:
        """Publish any picklable object, its buffers of *threshold* bytes and more out of band.

        Packed (`blobplane.objects.pack`) where `put_bytes` puts bytes
        (*sealed* included), or into a slot of *pool*, published like
        `put_pooled`.
        """
        if pool is not None:
            with self.loan(pool) as loan:
                pack(obj, loan, threshold=threshold)
                return self.put_pooled(loan, key=key, lease_ms=lease_ms)
        packed = Packed(obj, threshold)
        return self._run(self._core.put_filled(packed.size, packed.write, key, lease_ms, sealed))

    def get_object(
        self,
        target: Target,
        *,
        timeout: float | None = None,
        restricted: bool | AllowList = False,
    ) -> Any:
        """The object put under *target* (a key or an id), rebuilt in place.

        Its arrays are read-only views of the blob; the reference goes back
        when the last of them is collected. *restricted* (True, or an
        `AllowList`) refuses any class outside the allow-list: use it for
        objects from peers you do not trust.
        """
        return unpack(self.get(target, timeout=timeout), restricted=restricted)

    def mint_read_token(self, target: Target, *, ttl: float | None = None) -> str:
        """A token that lets its bearer get this one blob and do nothing else.

        *ttl* (seconds, > 0; rounded to whole milliseconds, at least 1) is how
        long it is valid; None: no expiry of its own. Either way, a connection
        that presented a token gets one that expires no later than its own.
        """
        return self._run(self._core.mint_read_token(target, ttl))

    def pump(self, timeout: float = 0.0) -> int:
        """Take in what the broker sent unasked (slot notifications); return how many."""
        handled = 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                message, fds = self._channel.recv(timeout=max(0.0, deadline - time.monotonic()))
            except Timeout:
                return handled
            self._core.unsolicited(self._core.decode(message, fds), fds)
            handled += 1

    def loan(self, pool: BlobPool, *, timeout: float | None = None) -> PoolLoan:
        """A free slot of *pool*, taking in the broker's notifications while none is free."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            loan = pool.try_loan()
            if loan is not None:
                return loan
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message, fds = self._channel.recv(timeout=remaining)
            except Timeout:
                raise Timeout(
                    f"no slot of the pool came back within {timeout} s: the broker still "
                    "publishes them, or readers hold them (delete published slots to free them)"
                ) from None
            self._core.unsolicited(self._core.decode(message, fds), fds)

    def close(self) -> None:
        """Disconnect; the broker releases every reference this connection held."""
        if self._closed:
            return
        self._closed = True
        self._core.close()
        self._let_go()  # the slots the broker keeps, before it hears of the disconnection

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BrokerClient {self._channel!r}>"

    def hello(self, token: str | None = None, name: str = "") -> Welcome:
        """Present *token* and *name* to the broker; `connect_broker` does it, once."""
        return self._run(self._core.hello(token, name))

    def _seal(self, blob: BlobId) -> None:
        self._run(self._core.seal(blob))

    def _discard(self, blob: BlobId) -> None:
        self._post(Delete(rid=self._core.rid(), id=blob.uuid, ack=False))

    def _run(self, op: Op[T]) -> T:
        """Drive *op*: answer each of its calls, and throw what fails into it."""
        try:
            call = next(op)
            while True:
                try:
                    answer = self._exchange(call)
                except BaseException as exc:
                    call = op.throw(exc)  # the operation undoes its part, then re-raises
                else:
                    call = op.send(answer)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            op.close()

    def _exchange(self, call: Call) -> Answer:
        if self._closed:
            raise BlobClosed("this broker client is closed")
        if call.send:
            self._send_deferred()
            try:
                # Bytes: checked by `checked`, so the channel need not decode them again.
                self._channel.send(checked(call.request), call.fds, timeout=self.timeout)
            except ConnectionClosed:
                self._raise_farewell()
                raise
        limit = self.timeout if call.wait is DEFAULT else call.wait
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message, fds = self._channel.recv(timeout=remaining)
            except Timeout:
                raise self._core.abandon(call) from None
            reply = self._core.decode(message, fds)
            if getattr(reply, "rid", 0) == call.request.rid:
                return reply, fds
            self._core.unsolicited(reply, fds)

    def _raise_farewell(self) -> None:
        """Raise what the broker said before it hung up (a refusal of this connection), if any."""
        while True:
            try:
                message, fds = self._channel.recv(timeout=0)
            except BlobError:
                return
            self._core.unsolicited(self._core.decode(message, fds), fds)

    def _post(self, request: Request) -> None:
        """Send a request that gets no reply, now if possible (from `MappedRead.close()`)."""
        if self._closed:
            return
        try:
            self._channel.send(checked(request), timeout=self.timeout)
        except BlobBusy:
            self._deferred.append(request)  # another thread is sending: goes with the next call
        except BlobError:
            pass  # the connection is gone, and with it every reference it held

    def _send_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for request in deferred:
            self._post(request)

    # Last in the class: from here on `list` names this method in the class body.
    def list(self, *, include_deleted: bool = False) -> list[BlobEntry]:
        """Every live blob (and withdrawn ones still referenced, with *include_deleted*)."""
        return self._run(self._core.listing(include_deleted))


def connect_broker(
    path: str | os.PathLike[str] | None = None,
    token: str | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    name: str = "",
    wait: float = 0.0,
) -> BrokerClient:
    """Connect to the broker at *path* (default: $BLOBPLANE_BROKER or the default socket).

    *token* (default: $BLOBPLANE_TOKEN) is presented to the broker, which then
    grants exactly its rights; *name* shows in the broker's log. *wait*: seconds
    to wait for a broker that is not listening yet (default: `ConnectionRefused`
    at once).
    """
    socket_path = resolve_socket(path)
    token = token if token is not None else os.environ.get(ENV_TOKEN)
    try:
        channel = sync_channel.connect(socket_path, timeout=timeout, wait=wait)
    except ConnectionRefused as exc:
        raise no_broker(socket_path, exc) from exc
    client = BrokerClient(channel, timeout=timeout)
    try:
        client.hello(token, name)
    except BaseException:
        client.close()
        raise
    return client
