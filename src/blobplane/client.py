"""Clients of the broker: `connect_broker()` blocks, `connect_broker_async()` is for asyncio.

::

    with blobplane.connect_broker() as broker:          # $BLOBPLANE_BROKER or the default
        broker.put_bytes(b"hello", key="greeting")
        with broker.create(64 << 20, key="frame-1") as blob:   # the broker allocates it
            camera.read_into(blob.buffer)
            blob.seal()                                 # the broker seals it: immutable now
        with broker.get("frame-1", timeout=5) as mapped:   # waits up to 5 s for the seal
            use(mapped.as_slice())                      # read-only, zero copy
        # leaving the block released the reference

Who owns what
-------------

- `get()` returns a `BrokerRead` (a `MappedRead`) and counts one reference at
  the broker; `close()` releases it. Views taken from it stay valid after
  that, as with any `MappedRead`: the mapping keeps the memory alive even once
  the broker has freed the blob.
- `create()` returns a `BrokerBlob`: a writable mapping of a memfd the broker
  allocated. `seal()` drops the mapping (release your views of `buffer`
  first: `BlobBusy` otherwise) and asks the broker to seal it. Leaving the
  `with` block of a blob that was never sealed deletes it; a sealed blob stays
  published.
- `put(blob)` publishes a `ProducerBlob` you sealed yourself (memfd): the
  broker keeps its own fd, so you may clean yours up at once.
- `put_pooled(loan)` publishes a slot of your `BlobPool`. The slot stays out
  of the pool, whatever you do with the loan, until the broker says the
  blob was withdrawn (deleted, or its lease ran out) and every reader released
  it. The client hears that whenever it reads from the broker; a producer
  that only writes should take its slots with `broker.loan(pool)`, which
  listens while it waits. A slot still published when the client closes
  never goes back to its pool: a reader may still be reading it.
- When the connection ends (close, or the process dies), the broker releases
  every reference it held and frees the blobs it created but never sealed.

A client is used by one thread (or one event loop) at a time. Errors the
broker reports are raised as the same `BlobError` subclass it raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import mmap
import os
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self, TypeAlias, TypeVar

from blobplane import errors
from blobplane.backends.checks import check_received_fd, check_regular_and_size
from blobplane.backends.mapping import (
    byte_view,
    map_readonly,
    map_writable,
    physical_memory,
    unmap_when_unused,
    write_into,
)
from blobplane.blobs import MappedRead, ProducerBlob, SharedMemoryBlobs
from blobplane.broker.address import ENV_TOKEN, resolve_socket
from blobplane.broker.protocol import (
    MAX_TOKEN_CHARS,
    BlobEntry,
    BlobReply,
    Create,
    Delete,
    Get,
    Hello,
    List,
    ListReply,
    MintToken,
    Ok,
    ProducerGone,
    Put,
    Refused,
    Release,
    Renew,
    Reply,
    Request,
    Seal,
    SlotFree,
    Stats,
    StatsEntry,
    StatsReply,
    TokenReply,
    Welcome,
    decode_reply,
    decode_request,
    encode,
)
from blobplane.broker.registry import MAX_KEY_BYTES
from blobplane.channel import DEFAULT, aio
from blobplane.channel import sync as sync_channel
from blobplane.channel.base import TimeoutArg
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    BlobError,
    BlobSealed,
    BrokenResource,
    ConnectionRefused,
    InvalidKey,
    InvalidSize,
    LocalProtocolError,
    NotSendable,
    PeerRefused,
    RemoteProtocolError,
    Timeout,
    TokenRefused,
)
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import BlobBackend, BlobId, BlobToken, UnixFd
from blobplane.wire import ErrorReply, Message, UserPayload

if TYPE_CHECKING:
    from blobplane.objects.allowlist import AllowList

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncBrokerBlob",
    "AsyncBrokerClient",
    "BlobEntry",
    "BrokerBlob",
    "BrokerClient",
    "BrokerRead",
    "StatsEntry",
    "connect_broker",
    "connect_broker_async",
]

DEFAULT_TIMEOUT = 30.0
MAX_CACHED_SLOTS = 64  # pool slots a client keeps mapped (see `_SlotMappings`)
# Producers a client remembers it was told have gone (`_SlotMappings.forget`):
# only the last few matter, those whose slots a get may still be mapping.
MAX_GONE_REMEMBERED = 1024

Target: TypeAlias = BlobId | uuid.UUID | str
R = TypeVar("R", bound=Reply)
T = TypeVar("T")

# Every error class the library defines, by name: what a Refused names is raised as itself.
_ERRORS: dict[str, type[BlobError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, BlobError)
}


# -- what the user holds ------------------------------------------------------------------


class _NamedByEntry:
    """`id`, `key` and `token` of a blob the broker described in `entry`."""

    __slots__ = ()
    entry: BlobEntry

    @property
    def id(self) -> BlobId:
        return self.entry.blob_id

    @property
    def key(self) -> str | None:
        return self.entry.key

    @property
    def token(self) -> BlobToken:
        return self.entry.token


class BrokerRead(_NamedByEntry, MappedRead):
    """A blob got from the broker, mapped read-only; `close()` releases the reference.

    `entry` is the blob as the broker described it (id, key, size, lease...).
    """

    __slots__ = ("entry",)

    def __init__(
        self,
        mapped: mmap.mmap | None,
        entry: BlobEntry,
        on_close: Callable[[], None],
        *,
        owned: bool = True,
    ) -> None:
        super().__init__(mapped, entry.size, on_close, owned=owned)
        self.entry = entry

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<BrokerRead {self.id} key={self.key!r} {len(self)} bytes, {state}>"


class _Writable(_NamedByEntry):
    """The writable mapping of a blob the broker allocated, until it is sealed or closed."""

    __slots__ = ("_closed", "_mapped", "_sealed", "entry")

    def __init__(self, entry: BlobEntry, mapped: mmap.mmap | None) -> None:
        self.entry = entry
        self._mapped = mapped
        self._sealed = False
        self._closed = False

    @property
    def size(self) -> int:
        return self.entry.size

    @property
    def sealed(self) -> bool:
        return self._sealed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffer(self) -> memoryview:
        """A writable memoryview of the whole blob, zero copy. Release it before `seal()`."""
        self._check_writable()
        if self._mapped is None:
            return memoryview(bytearray())
        return memoryview(self._mapped)

    def write_all(self, data: object, offset: int = 0) -> None:
        """Copy *data* (any buffer) into the blob at *offset*, bounds-checked."""
        self._check_writable()
        write_into(self._mapped, self.size, data, offset, "blob")

    def _drop_mapping(self) -> None:
        """Unmap before sealing: the kernel refuses F_SEAL_WRITE while a writable mapping exists."""
        if self._mapped is None:
            return
        try:
            self._mapped.close()
        except BufferError:
            raise BlobBusy(
                "cannot seal while views of blob.buffer (or arrays made from it) are alive; "
                "release them first (view.release(), del array)"
            ) from None
        self._mapped = None

    def _mark_closed(self) -> bool:
        """Close locally; True if the blob was never sealed (the broker should drop it)."""
        if self._closed:
            return False
        self._closed = True
        mapped, self._mapped = self._mapped, None
        unmap_when_unused(mapped)
        return not self._sealed

    def _check_writable(self) -> None:
        if self._closed:
            raise BlobClosed(f"blob {self.id} was closed")
        if self._sealed:
            raise BlobSealed(f"blob {self.id} is sealed; its contents can no longer change")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("sealed" if self._sealed else "writable")
        return f"<{type(self).__name__} {self.id} key={self.key!r} {self.size} bytes {state}>"


class BrokerBlob(_Writable):
    """A blob the broker allocated for this client to fill: write, then `seal()`.

    Leaving the `with` block (or `close()`) of a blob that was never sealed
    deletes it at the broker; a sealed one stays published.
    """

    __slots__ = ("_client",)

    def __init__(self, client: BrokerClient, entry: BlobEntry, mapped: mmap.mmap | None) -> None:
        super().__init__(entry, mapped)
        self._client = client

    def seal(self) -> None:
        """Drop the writable mapping and have the broker seal the blob; sealing twice is fine."""
        if self._sealed:
            return
        self._check_writable()
        self._drop_mapping()
        self._client._seal(self.id)
        self._sealed = True

    def close(self) -> None:
        if self._mark_closed():
            self._client._post(Delete(rid=self._client._core.rid(), id=self.id.uuid, ack=False))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncBrokerBlob(_Writable):
    """`BrokerBlob` for asyncio: ``await blob.seal()``."""

    __slots__ = ("_client",)

    def __init__(
        self, client: AsyncBrokerClient, entry: BlobEntry, mapped: mmap.mmap | None
    ) -> None:
        super().__init__(entry, mapped)
        self._client = client

    async def seal(self) -> None:
        if self._sealed:
            return
        self._check_writable()
        self._drop_mapping()
        await self._client._seal(self.id)
        self._sealed = True

    def close(self) -> None:
        if self._mark_closed():
            self._client._post(Delete(rid=self._client._core.rid(), id=self.id.uuid, ack=False))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- the shared, I/O-free half ------------------------------------------------------------------


def _check_key(key: object) -> None:
    """Refuse here a key the broker would refuse (the same rule as the registry's)."""
    try:
        valid = isinstance(key, str) and 0 < len(key.encode()) <= MAX_KEY_BYTES and "\0" not in key
    except UnicodeEncodeError:
        valid = False
    if not valid:
        raise InvalidKey(
            f"a blob key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8 without NUL, got {key!r:.80}"
        )


_NO_ID = BlobId(uuid.UUID(int=0))


def _check_placing(size: int, key: str | None, lease_ms: int | None) -> None:
    BlobToken(_NO_ID, size, lease_ms)  # the size and lease checks of tokens
    if key is not None:
        _check_key(key)


def _target(target: Target) -> tuple[uuid.UUID | None, str | None]:
    """(id, None) or (None, key): how a request names the blob."""
    if isinstance(target, BlobId):
        return target.uuid, None
    if isinstance(target, uuid.UUID):
        return target, None
    if isinstance(target, str):
        _check_key(target)
        return None, target
    raise BlobError(f"name a blob by BlobId, UUID or key (str), not {type(target).__name__}")


def _blob_id(target: BlobId | uuid.UUID) -> uuid.UUID:
    if isinstance(target, BlobId):
        return target.uuid
    if isinstance(target, uuid.UUID):
        return target
    raise BlobError(f"name the blob by its BlobId or UUID, not {type(target).__name__}")


def _millis(seconds: float | None, what: str) -> int | None:
    if seconds is None:
        return None
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise InvalidSize(f"{what} is a number of seconds >= 0 or None, got {seconds!r}")
    return round(seconds * 1000)


# The longest ttl the broker's MintToken takes (protocol `Millis`): about 285,000 years.
_MAX_TTL_MS = 2**53


def _ttl_millis(seconds: float | None) -> int | None:
    """A token's ttl for the wire: whole milliseconds, at least 1 (None: no ttl of its own)."""
    if seconds is None:
        return None
    if (
        not isinstance(seconds, int | float)
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise InvalidSize(
            f"a token's ttl is a positive number of seconds (or None), got {seconds!r}"
        )
    millis = max(1, round(seconds * 1000))  # however short, never 0
    if millis > _MAX_TTL_MS:
        raise InvalidSize(
            f"a token's ttl of {seconds!r} s is longer than the broker takes; "
            "pass None for a token that does not expire"
        )
    return millis


def _close(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


def raise_refusal(refused: Refused) -> NoReturn:
    """Raise what the broker raised; an error this library does not know as `PeerRefused`."""
    kind = _ERRORS.get(refused.error)
    if kind is None or kind is PeerRefused:
        raise PeerRefused(
            f"the broker refused: {refused.message} ({refused.error})",
            code=refused.error,
            reply_to=refused.rid,
        )
    raise kind(refused.message)


class _SlotMappings:
    """The pool slots this client got, each mapped once and reused by later gets of it.

    A pooled blob is a slot of its producer's pool, published again and again:
    mapping it anew on every get costs an mmap and a page fault per page read.
    The first time a slot's memfd arrives it passes the checks of `recv_blob`
    and is mapped whole; later gets reuse that mapping once one fstat proves
    the fd is the same memfd (the same inode: the mapping keeps it alive, so
    no other file can take its number) and large enough, and its seals can
    only have grown since. Bounded in slots and in bytes: the least recently
    used slot is dropped first, a producer's slots when the broker says it
    has gone (`ProducerGone`), and all of them when the client closes.
    Dropping never unmaps under a reader: a read made from the mapping keeps
    it until it goes.
    """

    def __init__(self, max_slots: int = MAX_CACHED_SLOTS, max_bytes: int | None = None) -> None:
        self.max_slots = max_slots
        self.max_bytes = physical_memory() // 4 if max_bytes is None else max_bytes
        self.bytes = 0
        # The asyncio client's reader may take in a producer's `ProducerGone`
        # before the task of a get it already answered maps that producer's
        # slot: such a slot is used once and not kept. Client ids are never reused.
        self._gone: OrderedDict[int, None] = OrderedDict()
        # (st_dev, st_ino) -> (mapping, its length, the producer: `BlobEntry.owner`)
        self._maps: OrderedDict[tuple[int, int], tuple[mmap.mmap | None, int, int | None]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._maps)

    def mapping(self, fd: int, size: int, owner: int | None = None) -> mmap.mmap | None:
        """A read-only mapping of the slot behind *fd* (borrowed), at least *size* bytes long.

        *owner* is the producer that published it, for `forget`.
        """
        with errors.os_errors("inspecting a pool slot"):
            info = os.fstat(fd)
        identity = (info.st_dev, info.st_ino)
        known = self._maps.get(identity)
        if known is not None and known[1] >= size:
            self._maps.move_to_end(identity)
            if known[2] != owner:  # the same memfd, published by another connection now
                self._maps[identity] = (known[0], known[1], owner)
            return known[0]
        check_received_fd(fd, size)
        if known is not None:
            self._drop(identity)
        length = info.st_size
        mapped = map_readonly(fd, length)
        if length > self.max_bytes or owner in self._gone:
            return mapped  # larger than the whole cache, or its producer gone: used once
        self._maps[identity] = (mapped, length, owner)
        self.bytes += length
        while len(self._maps) > self.max_slots or self.bytes > self.max_bytes:
            self._drop(next(iter(self._maps)))
        return mapped

    def forget(self, owner: int) -> None:
        """Drop the slots *owner* published: it has gone, and its pools with it."""
        self._gone[owner] = None
        if len(self._gone) > MAX_GONE_REMEMBERED:
            self._gone.popitem(last=False)
        for identity in [key for key, kept in self._maps.items() if kept[2] == owner]:
            self._drop(identity)

    def close(self) -> None:
        while self._maps:
            self._drop(next(iter(self._maps)))

    def _drop(self, identity: tuple[int, int]) -> None:
        # No close(): reads that borrowed the mapping keep it until they go, and
        # CPython unmaps it the moment the last reference does.
        _, length, _ = self._maps.pop(identity)
        self.bytes -= length


class _ReleaseOnce:
    """Post a reference's release the first time it is called: at close, or at collection."""

    __slots__ = ("_post", "_request")

    def __init__(self, post: Callable[[Request], None], request: Release) -> None:
        self._post: Callable[[Request], None] | None = post
        self._request = request

    def __call__(self) -> None:
        post, self._post = self._post, None
        if post is not None:
            post(self._request)


@dataclass(frozen=True, slots=True)
class _Call:
    """One step of an operation: send *request* (unless *send* is False) and await its reply.

    *wait* is how long the reply may take (DEFAULT: the client's timeout).
    """

    request: Request
    fds: tuple[int, ...] = ()
    wait: TimeoutArg = DEFAULT
    send: bool = True  # False: the next part of a reply that comes in parts


Answer: TypeAlias = tuple[Reply, tuple[int, ...]]
Op: TypeAlias = Generator[_Call, Answer, T]


class _Core:
    """Everything both clients share: each operation, written once as a generator.

    An operation yields the `_Call`s it needs and is sent back each reply
    with its fds; the sync client answers them blocking, the asyncio one
    awaiting, so the two cannot drift apart. No I/O here.
    """

    def __init__(self, post: Callable[[Request], None]) -> None:
        self._rids = itertools.count(1)
        self._post = post
        self.welcome: Welcome | None = None
        # Pooled blobs published and not given back yet: id -> (pool, slot).
        self.pooled: dict[uuid.UUID, tuple[BlobPool, int]] = {}
        # Requests whose caller stopped waiting: their replies must be undone.
        self.abandoned: dict[int, type[Request]] = {}
        self.slots = _SlotMappings()
        self._local: SharedMemoryBlobs | None = None

    def rid(self) -> int:
        return next(self._rids)

    # -- operations ----------------------------------------------------------------------

    def hello(self, token: str | None, name: str) -> Op[Welcome]:
        if token is not None and (not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS):
            raise TokenRefused(
                "this is not a token any broker minted (a string of at most "
                f"{MAX_TOKEN_CHARS} characters); mint one with `blobplane token create`"
            )
        reply, fds = yield _Call(Hello(rid=self.rid(), token=token, name=name))
        self.welcome = _expect(reply, fds, Welcome)
        return self.welcome

    def put_bytes(self, data: object, key: str | None, lease_ms: int | None) -> Op[BlobEntry]:
        view = byte_view(data)
        if self._local is None:
            self._local = SharedMemoryBlobs(BlobBackend.MEMFD)
        with self._local.create(view.nbytes) as blob:
            blob.write_all(view)
            blob.seal()
            return (yield from self.put(blob, key, lease_ms))

    def put(self, blob: ProducerBlob, key: str | None, lease_ms: int | None) -> Op[BlobEntry]:
        if not isinstance(blob.descriptor, UnixFd):
            raise NotSendable(
                f"blob {blob.id} is a {type(blob.descriptor).__name__} blob; the broker takes "
                "memfd blobs only (BlobBackend.MEMFD)"
            )
        if not blob.sealed:
            raise NotSendable(f"blob {blob.id} is not sealed; seal() it before put()")
        _check_placing(blob.size, key, lease_ms)
        request = Put(rid=self.rid(), size=blob.size, key=key, lease_ms=lease_ms)
        reply, fds = yield _Call(request, (blob.fileno(),))
        return _expect(reply, fds, BlobReply).blob

    def put_pooled(self, loan: PoolLoan, key: str | None, lease_ms: int | None) -> Op[BlobEntry]:
        _check_placing(loan.length, key, lease_ms)
        request = Put(rid=self.rid(), size=loan.length, key=key, lease_ms=lease_ms, pooled=True)
        pool, slot = loan.pool, loan.slot
        # Held for the broker from before it can have the slot: a notification
        # that came before the hold would free a slot still in use.
        pool.retain(slot)
        try:
            reply, fds = yield _Call(request, (loan.fileno(),))
            entry = _expect(reply, fds, BlobReply).blob
        except BaseException:
            pool.release(slot)
            raise
        self.pooled[entry.id] = (pool, slot)
        return entry

    def create(
        self, size: int, key: str | None, lease_ms: int | None
    ) -> Op[tuple[BlobEntry, mmap.mmap | None]]:
        _check_placing(size, key, lease_ms)
        reply, fds = yield _Call(Create(rid=self.rid(), size=size, key=key, lease_ms=lease_ms))
        entry = _expect(reply, fds, BlobReply, 1).blob
        try:
            # Unsealed by design (we fill it): only its kind and size are checked.
            check_regular_and_size(fds[0], entry.size, "the memfd the broker allocated")
            mapped = map_writable(fds[0], entry.size, prefault=True)
        except BaseException:
            self._post(Delete(rid=self.rid(), id=entry.id, ack=False))
            raise
        finally:
            os.close(fds[0])
        return entry, mapped

    def seal(self, blob: BlobId) -> Op[None]:
        reply, fds = yield _Call(Seal(rid=self.rid(), id=blob.uuid))
        _expect(reply, fds, Ok)

    def get(self, target: Target, timeout: float | None, grace: float | None) -> Op[BrokerRead]:
        blob, key = _target(target)
        request = Get(
            rid=self.rid(), id=blob, key=key, timeout_ms=_millis(timeout, "a get's timeout")
        )
        wait = None if timeout is None else timeout + (grace or DEFAULT_TIMEOUT)
        reply, fds = yield _Call(request, wait=wait)
        entry = _expect(reply, fds, BlobReply, 1).blob
        release = _ReleaseOnce(self._post, Release(rid=self.rid(), id=entry.id, ack=False))
        try:
            if entry.pooled:
                mapped = self.slots.mapping(fds[0], entry.size, entry.owner)
            else:
                check_received_fd(fds[0], entry.size)
                mapped = map_readonly(fds[0], entry.size)
        except BaseException:
            release()
            raise
        finally:
            os.close(fds[0])
        read = BrokerRead(mapped, entry, release, owned=not entry.pooled)
        # A read dropped without close() still gives its reference back.
        weakref.finalize(read, release)
        return read

    def release(self, blob: BlobId | uuid.UUID) -> Op[None]:
        reply, fds = yield _Call(Release(rid=self.rid(), id=_blob_id(blob)))
        _expect(reply, fds, Ok)

    def delete(self, target: Target) -> Op[None]:
        blob, key = _target(target)
        reply, fds = yield _Call(Delete(rid=self.rid(), id=blob, key=key))
        _expect(reply, fds, Ok)

    def renew(self, target: Target, lease_ms: int | None) -> Op[BlobEntry]:
        blob, key = _target(target)
        _check_placing(0, None, lease_ms)
        reply, fds = yield _Call(Renew(rid=self.rid(), id=blob, key=key, lease_ms=lease_ms))
        return _expect(reply, fds, BlobReply).blob

    def stats(self) -> Op[StatsEntry]:
        reply, fds = yield _Call(Stats(rid=self.rid()))
        return _expect(reply, fds, StatsReply).stats

    def mint_read_token(self, target: Target, ttl: float | None) -> Op[str]:
        blob, key = _target(target)
        ttl_ms = _ttl_millis(ttl)
        reply, fds = yield _Call(MintToken(rid=self.rid(), id=blob, key=key, ttl_ms=ttl_ms))
        return _expect(reply, fds, TokenReply).token

    def listing(self, include_deleted: bool) -> Op[list[BlobEntry]]:
        request = List(rid=self.rid(), include_deleted=include_deleted)
        step = _Call(request)
        entries: list[BlobEntry] = []
        while True:
            reply, fds = yield step
            part = _expect(reply, fds, ListReply)
            entries.extend(part.blobs)
            if not part.more:
                return entries
            step = _Call(request, send=False)

    # -- what comes in -------------------------------------------------------------------

    @staticmethod
    def decode(message: Message, fds: tuple[int, ...]) -> Reply:
        try:
            if isinstance(message, ErrorReply):
                raise PeerRefused(
                    f"the broker closed the connection: {message.message} ({message.code})",
                    code=message.code,
                    reply_to=message.reply_to,
                )
            if not isinstance(message, UserPayload):
                raise RemoteProtocolError(
                    f"expected a broker reply in a UserPayload, got {type(message).__name__}"
                )
            return decode_reply(message.data)
        except BaseException:
            _close(fds)
            raise

    def unsolicited(self, reply: Reply, fds: tuple[int, ...]) -> None:
        """Take a message nobody waits for: a notification, or a late reply to undo."""
        _close(fds)
        match reply:
            case SlotFree(id=blob):
                held = self.pooled.pop(blob, None)
                if held is not None and not held[0].closed:
                    held[0].release(held[1])
            case ProducerGone(client=owner):
                self.slots.forget(owner)
            case Refused(rid=0):
                raise_refusal(reply)
            case BlobReply(rid=rid, blob=entry):
                op = self.abandoned.pop(rid, None)
                if op is Get:
                    self._post(Release(rid=self.rid(), id=entry.id, ack=False))
                elif op is Create:
                    self._post(Delete(rid=self.rid(), id=entry.id, ack=False))
            case ListReply(more=True):
                pass
            case _:
                self.abandoned.pop(getattr(reply, "rid", 0), None)

    def abandon(self, call: _Call) -> Timeout:
        """The caller stops waiting for *call*'s reply: undo it when it comes."""
        self.abandoned[call.request.rid] = type(call.request)
        return Timeout(f"the broker did not answer {type(call.request).__name__.lower()} in time")

    def close(self) -> None:
        self.slots.close()
        if self._local is not None:
            self._local.close()


def _expect(reply: Reply, fds: tuple[int, ...], kind: type[R], nfds: int = 0) -> R:
    """*reply* if it is a *kind* with *nfds* fds; raise the broker's refusal otherwise."""
    if isinstance(reply, kind) and len(fds) == nfds:
        return reply
    _close(fds)
    if isinstance(reply, Refused):
        raise_refusal(reply)
    raise RemoteProtocolError(
        f"the broker answered with {type(reply).__name__} and {len(fds)} fds, "
        f"expected {kind.__name__} with {nfds}"
    )


def _no_broker(path: str, exc: ConnectionRefused) -> ConnectionRefused:
    return ConnectionRefused(f"no broker at {path} ({exc}); start one with `blobplane serve`")


# -- the blocking client ----------------------------------------------------------------------


class BrokerClient:
    """A blocking connection to the broker; made by `connect_broker()`."""

    def __init__(self, channel: sync_channel.Channel, *, timeout: float | None) -> None:
        self._channel = channel
        self._core = _Core(self._post)
        self.timeout = timeout
        self._deferred: list[Request] = []
        self._closed = False

    @property
    def welcome(self) -> Welcome:
        """What the broker granted this connection (rights, quota, client number)."""
        assert self._core.welcome is not None
        return self._core.welcome

    @property
    def closed(self) -> bool:
        return self._closed

    def put_bytes(
        self, data: object, *, key: str | None = None, lease_ms: int | None = None
    ) -> BlobEntry:
        """Copy *data* (any buffer) into a new sealed blob and publish it."""
        return self._run(self._core.put_bytes(data, key, lease_ms))

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
        return BrokerBlob(self, entry, mapped)

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
        key: str,
        obj: object,
        *,
        pool: BlobPool | None = None,
        lease_ms: int | None = None,
    ) -> BlobEntry:
        """Publish any picklable object under *key*, its large buffers in shared memory."""
        # blobplane.objects sits above the client layer: imported when used.
        from blobplane.objects.transfer import put_object

        return put_object(self, key, obj, pool=pool, lease_ms=lease_ms)

    def get_object(
        self, key: str, *, timeout: float | None = None, restricted: bool | AllowList = False
    ) -> Any:
        """The object under *key*; the reference goes back when its last buffer is collected."""
        from blobplane.objects.transfer import get_object

        return get_object(self, key, timeout=timeout, restricted=restricted)

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
        self._channel.close()
        self._core.close()

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

    def _seal(self, blob: BlobId) -> None:
        self._run(self._core.seal(blob))

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

    def _exchange(self, call: _Call) -> Answer:
        if self._closed:
            raise BlobClosed("this broker client is closed")
        if call.send:
            self._send_deferred()
            # Bytes: checked by `_checked`, so the channel need not decode them again.
            self._channel.send(_checked(call.request), call.fds, timeout=self.timeout)
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

    def _post(self, request: Request) -> None:
        """Send a request that gets no reply, now if possible (from `MappedRead.close()`)."""
        if self._closed:
            return
        try:
            self._channel.send(_checked(request), timeout=self.timeout)
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


def _checked(request: Request) -> bytes:
    """The request, encoded and decoded once more: what the broker would refuse is refused here.

    The broker ends a connection that sends a malformed request, so a bad
    argument that slipped past the checks above must not reach it.
    """
    try:
        data = encode(request)
        decode_request(data)
    except (RemoteProtocolError, ValueError, TypeError) as exc:
        raise LocalProtocolError(f"the broker would refuse this request: {exc}") from None
    return data


def _payload(request: Request) -> UserPayload:
    return UserPayload(data=_checked(request))


def connect_broker(
    path: str | os.PathLike[str] | None = None,
    token: str | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    name: str = "",
) -> BrokerClient:
    """Connect to the broker at *path* (default: $BLOBPLANE_BROKER or the default socket).

    *token* (default: $BLOBPLANE_TOKEN) is presented to the broker, which then
    grants exactly its rights; *name* shows in the broker's log.
    """
    socket_path = resolve_socket(path)
    token = token if token is not None else os.environ.get(ENV_TOKEN)
    try:
        channel = sync_channel.connect(socket_path, timeout=timeout)
    except ConnectionRefused as exc:
        raise _no_broker(socket_path, exc) from exc
    client = BrokerClient(channel, timeout=timeout)
    try:
        client._run(client._core.hello(token, name))
    except BaseException:
        client.close()
        raise
    return client


# -- the asyncio client -----------------------------------------------------------------------

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


class AsyncBrokerClient:
    """An asyncio connection to the broker; made by ``await connect_broker_async()``.

    A reader (a callback of the event loop) takes in every reply and
    notification, so many tasks may call the broker at once over one connection.
    """

    def __init__(self, channel: aio.AsyncChannel, *, timeout: float | None) -> None:
        self._channel = channel
        self._core = _Core(self._post)
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        # One future per request waiting for its reply (None between the parts of a
        # listing); replies that come while nobody awaits them wait in `_early`.
        self._pending: dict[int, asyncio.Future[_Delivery] | None] = {}
        self._early: dict[int, deque[_Delivery]] = {}
        self._sending = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._posted: list[UserPayload] = []  # requests without a reply, sent on the next turn
        self._slot_freed = asyncio.Event()
        self._failure: BlobError | None = None
        self._closed = False
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
        self, data: object, *, key: str | None = None, lease_ms: int | None = None
    ) -> BlobEntry:
        return await self._run(self._core.put_bytes(data, key, lease_ms))

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
        return AsyncBrokerBlob(self, entry, mapped)

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
        key: str,
        obj: object,
        *,
        pool: BlobPool | None = None,
        lease_ms: int | None = None,
    ) -> BlobEntry:
        """Publish any picklable object under *key*, its large buffers in shared memory."""
        # blobplane.objects sits above the client layer: imported when used.
        from blobplane.objects.transfer import put_object_async

        return await put_object_async(self, key, obj, pool=pool, lease_ms=lease_ms)

    async def get_object(
        self, key: str, *, timeout: float | None = None, restricted: bool | AllowList = False
    ) -> Any:
        """The object under *key*; the reference goes back when its last buffer is collected."""
        from blobplane.objects.transfer import get_object_async

        return await get_object_async(self, key, timeout=timeout, restricted=restricted)

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
        for task in self._background:
            task.cancel()
        self._channel.close()
        self._core.close()
        self._fail(BlobClosed("this broker client is closed"))

    async def aclose(self) -> None:
        self.close()
        await asyncio.gather(*self._background, return_exceptions=True)

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

    async def _seal(self, blob: BlobId) -> None:
        await self._run(self._core.seal(blob))

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

    async def _exchange(self, call: _Call) -> Answer:
        rid = call.request.rid
        early = self._early.get(rid)
        if early:
            return _delivered(early.popleft())
        future: asyncio.Future[_Delivery] = self._loop.create_future()
        self._pending[rid] = future
        self._check_usable()  # after the future exists: a failure from now on reaches it
        if call.send:
            await self._send(_payload(call.request), call.fds)
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

    async def _send(self, payload: UserPayload, fds: tuple[int, ...] = ()) -> None:
        """Send a request: at once if the socket takes it, else in turn with other senders."""
        if self._posted:
            self._send_posted()  # releases and deletes go in the order they were made
        # Encoded and checked by `_payload`: the channel need not decode it again.
        if not self._sending.locked() and self._channel._try_send_built(payload, fds) is not None:
            return
        async with self._sending:
            await self._channel._send_built(payload, fds, timeout=self.timeout)

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
        self._posted.append(_payload(request))
        if len(self._posted) == 1:
            self._loop.call_soon(self._send_posted)

    def _send_posted(self) -> None:
        posted, self._posted = self._posted, []
        for index, payload in enumerate(posted):
            if self._closed:
                return
            try:
                if (
                    not self._sending.locked()
                    and self._channel._try_send_built(payload) is not None
                ):
                    continue
            except BlobError:
                return  # the connection is gone, and with it every reference it held
            # The socket is full or another task sends: the rest go in order, in a task.
            task = self._loop.create_task(self._send_quietly(posted[index:]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return

    async def _send_quietly(self, payloads: list[UserPayload]) -> None:
        try:
            async with self._sending:
                for payload in payloads:
                    await self._channel._send_built(payload, timeout=self.timeout)
        except BlobError:
            pass  # the connection is gone, and with it every reference it held

    # Last in the class: from here on `list` names this method in the class body.
    async def list(self, *, include_deleted: bool = False) -> list[BlobEntry]:
        return await self._run(self._core.listing(include_deleted))


async def connect_broker_async(
    path: str | os.PathLike[str] | None = None,
    token: str | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    name: str = "",
) -> AsyncBrokerClient:
    """`connect_broker` for asyncio."""
    socket_path = resolve_socket(path)
    token = token if token is not None else os.environ.get(ENV_TOKEN)
    try:
        channel = await aio.connect(socket_path, timeout=timeout)
    except ConnectionRefused as exc:
        raise _no_broker(socket_path, exc) from exc
    client = AsyncBrokerClient(channel, timeout=timeout)
    try:
        await client._run(client._core.hello(token, name))
    except BaseException:
        await client.aclose()
        raise
    return client
