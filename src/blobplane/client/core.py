"""What both broker clients share, with no I/O: each operation written once as a generator.

An operation (`ClientCore.get`, `ClientCore.put`...) yields the `Call`s it
needs and is sent back each reply with its fds; the sync client answers them
blocking, the asyncio one awaiting, so the two cannot drift apart. Here too:
the checks of arguments before anything is sent, the errors the broker
names raised as themselves, and the notifications nobody waits for.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import uuid
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import NoReturn, TypeAlias, TypeVar

from blobplane import errors
from blobplane.auto_pool import AutoPool, PoolSetting, SlotOwner, default_auto_pool
from blobplane.backends.checks import check_received_fd, check_regular_and_size
from blobplane.backends.mapping import byte_view, copier, map_readonly, map_writable
from blobplane.blobs import ProducerBlob, SharedMemoryBlobs
from blobplane.broker.protocol import (
    MAX_INLINE_PUT,
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
    check_key,
    decode_reply,
    decode_request,
    encode,
)
from blobplane.channel import DEFAULT
from blobplane.channel.base import ChannelBase, TimeoutArg
from blobplane.client.handles import BrokerRead
from blobplane.errors import (
    BlobError,
    BrokerLimitReached,
    ConnectionRefused,
    InvalidSize,
    LocalProtocolError,
    NotSendable,
    PeerRefused,
    QuotaExceeded,
    RemoteProtocolError,
    Timeout,
    TokenRefused,
)
from blobplane.fds import close_fds
from blobplane.pool import BlobPool, PoolLoan
from blobplane.slot_cache import SlotCache
from blobplane.types import BlobBackend, BlobId, BlobToken, UnixFd, is_number
from blobplane.wire import ErrorReply, Message, UserPayload

__all__ = [
    "DEFAULT_TIMEOUT",
    "Answer",
    "Call",
    "ClientCore",
    "Op",
    "Target",
    "checked",
    "no_broker",
    "payload_of",
    "raise_refusal",
]

DEFAULT_TIMEOUT = 30.0

Target: TypeAlias = BlobId | uuid.UUID | str
R = TypeVar("R", bound=Reply)
T = TypeVar("T")

# Every error class the library defines, by name: what a Refused names is raised as itself.
_ERRORS: dict[str, type[BlobError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, BlobError)
}


_NO_ID = BlobId(uuid.UUID(int=0))


def _check_placing(size: int, key: str | None, lease_ms: int | None) -> None:
    BlobToken(_NO_ID, size, lease_ms)  # the size and lease checks of tokens
    if key is not None:
        check_key(key)


def _target(target: Target) -> tuple[uuid.UUID | None, str | None]:
    """(id, None) or (None, key): how a request names the blob."""
    if isinstance(target, BlobId):
        return target.uuid, None
    if isinstance(target, uuid.UUID):
        return target, None
    if isinstance(target, str):
        check_key(target)
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
    if not is_number(seconds) or seconds < 0:
        raise InvalidSize(f"{what} is a number of seconds >= 0 or None, got {seconds!r}")
    return round(seconds * 1000)


# The longest ttl the broker's MintToken takes (protocol `Millis`): about 285,000 years.
_MAX_TTL_MS = 2**53


def _ttl_millis(seconds: float | None) -> int | None:
    """A token's ttl for the wire: whole milliseconds, at least 1 (None: no ttl of its own)."""
    if seconds is None:
        return None
    if not is_number(seconds) or not math.isfinite(seconds) or seconds <= 0:
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
class Call:
    """One step of an operation: send *request* (unless *send* is False) and await its reply.

    *wait* is how long the reply may take (DEFAULT: the client's timeout).
    """

    request: Request
    fds: tuple[int, ...] = ()
    wait: TimeoutArg = DEFAULT
    send: bool = True  # False: the next part of a reply that comes in parts


Answer: TypeAlias = tuple[Reply, tuple[int, ...]]
Op: TypeAlias = Generator[Call, Answer, T]


class ClientCore:
    """Everything both clients share: each operation, written once as a generator.

    An operation yields the `Call`s it needs and is sent back each reply
    with its fds; the sync client answers them blocking, the asyncio one
    awaiting, so the two cannot drift apart. No I/O here.
    """

    def __init__(self, post: Callable[[Request], None]) -> None:
        self._rids = itertools.count(1)
        self._post = post
        self.welcome: Welcome | None = None
        # Pooled blobs published and not given back yet: id -> (pool, slot, the
        # AutoPool it is a slot of, if any); and pooled puts not answered yet, by rid.
        self.pooled: dict[uuid.UUID, tuple[BlobPool, int, AutoPool | None]] = {}
        self.putting: dict[int, tuple[BlobPool, int, AutoPool | None]] = {}
        # Requests whose caller stopped waiting: their replies must be undone.
        self.abandoned: dict[int, type[Request]] = {}
        self.slots = SlotCache()
        self._local: SharedMemoryBlobs | None = None
        # Where `put_bytes` and `put_object` copy a payload (None: fresh blobs), and
        # what they take slots as.
        self.auto_pool: AutoPool | None = default_auto_pool()
        self.slot_owner = SlotOwner()

    def rid(self) -> int:
        return next(self._rids)

    # -- operations ----------------------------------------------------------------------

    def hello(self, token: str | None, name: str) -> Op[Welcome]:
        if token is not None and (not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS):
            raise TokenRefused(
                "this is not a token any broker minted (a string of at most "
                f"{MAX_TOKEN_CHARS} characters); mint one with `blobplane token create`"
            )
        reply, fds = yield Call(Hello(rid=self.rid(), token=token, name=name))
        self.welcome = expect(reply, fds, Welcome)
        return self.welcome

    def put_bytes(
        self, data: object, key: str | None, lease_ms: int | None, sealed: bool = False
    ) -> Op[BlobEntry]:
        view = byte_view(data)
        return (yield from self.put_filled(view.nbytes, copier(view), key, lease_ms, sealed))

    def put_filled(
        self,
        size: int,
        write: Callable[[memoryview], None],
        key: str | None,
        lease_ms: int | None,
        sealed: bool = False,
    ) -> Op[BlobEntry]:
        """Publish *size* bytes that *write* lays out: up to `MAX_INLINE_PUT` inside the
        request (the broker makes the sealed memfd); else in a slot of `auto_pool`, put to
        stay published after this client goes; else (*sealed*, or no room) a fresh blob."""
        if size <= MAX_INLINE_PUT:
            _check_placing(size, key, lease_ms)
            data = bytearray(size)
            with memoryview(data) as view:
                write(view)
            request = Put(rid=self.rid(), size=size, key=key, lease_ms=lease_ms, data=bytes(data))
            reply, fds = yield Call(request)
            return expect(reply, fds, BlobReply).blob
        pool = None if sealed else self.auto_pool
        loan = None if pool is None else self.slot_owner.loan(pool, size)
        if loan is not None:
            with loan:  # the slot stays the broker's until it says SlotFree
                with loan.buffer as view:
                    write(view)
                try:
                    return (yield from self.put_pooled(loan, key, lease_ms, keep=True, auto=pool))
                except QuotaExceeded as exc:
                    # No room for the slot, up to a quarter larger than the payload, or this
                    # connection keeps the most slots allowed: a fresh blob may still fit.
                    if loan.pool.slot_size <= size and not isinstance(exc, BrokerLimitReached):
                        raise
        if self._local is None:
            self._local = SharedMemoryBlobs(BlobBackend.MEMFD)
        with self._local.create(size) as blob:
            if size:
                with blob.buffer as view:
                    write(view)
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
        reply, fds = yield Call(request, (blob.fileno(),))
        return expect(reply, fds, BlobReply).blob

    def put_pooled(
        self,
        loan: PoolLoan,
        key: str | None,
        lease_ms: int | None,
        keep: bool = False,
        auto: AutoPool | None = None,
    ) -> Op[BlobEntry]:
        """Publish *loan*'s slot; *auto*: the `AutoPool` it is a slot of, which closes it when
        the broker says it must not be reused (`SlotFree.reuse`)."""
        _check_placing(loan.length, key, lease_ms)
        request = Put(
            rid=self.rid(), size=loan.length, key=key, lease_ms=lease_ms, pooled=True, keep=keep
        )
        pool, slot = loan.pool, loan.slot
        # Held for the broker from before it can have the slot, and until the broker's
        # answer says otherwise (`decode`), whenever it comes: a caller that stops
        # waiting (a timeout, a cancellation) may have had its put published.
        pool.retain(slot)
        self.putting[request.rid] = (pool, slot, auto)
        reply, fds = yield Call(request, (loan.fileno(),))
        return expect(reply, fds, BlobReply).blob

    def create(
        self, size: int, key: str | None, lease_ms: int | None
    ) -> Op[tuple[BlobEntry, mmap.mmap | None]]:
        _check_placing(size, key, lease_ms)
        reply, fds = yield Call(Create(rid=self.rid(), size=size, key=key, lease_ms=lease_ms))
        entry = expect(reply, fds, BlobReply, 1).blob
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
        reply, fds = yield Call(Seal(rid=self.rid(), id=blob.uuid))
        expect(reply, fds, Ok)

    def get(self, target: Target, timeout: float | None, grace: float | None) -> Op[BrokerRead]:
        blob, key = _target(target)
        request = Get(
            rid=self.rid(), id=blob, key=key, timeout_ms=_millis(timeout, "a get's timeout")
        )
        wait = None if timeout is None else timeout + (grace or DEFAULT_TIMEOUT)
        reply, fds = yield Call(request, wait=wait)
        entry = expect(reply, fds, BlobReply, 1).blob
        release = _ReleaseOnce(self._post, Release(rid=self.rid(), id=entry.id, ack=False))
        try:
            if entry.pooled:
                mapped = self.slots.mapping(fds[0], entry.size, entry.owner)
            else:
                info = check_received_fd(fds[0], entry.size)
                mapped = map_readonly(fds[0], entry.size, info)
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
        reply, fds = yield Call(Release(rid=self.rid(), id=_blob_id(blob)))
        expect(reply, fds, Ok)

    def delete(self, target: Target) -> Op[None]:
        blob, key = _target(target)
        reply, fds = yield Call(Delete(rid=self.rid(), id=blob, key=key))
        expect(reply, fds, Ok)

    def renew(self, target: Target, lease_ms: int | None) -> Op[BlobEntry]:
        blob, key = _target(target)
        _check_placing(0, None, lease_ms)
        reply, fds = yield Call(Renew(rid=self.rid(), id=blob, key=key, lease_ms=lease_ms))
        return expect(reply, fds, BlobReply).blob

    def stats(self) -> Op[StatsEntry]:
        reply, fds = yield Call(Stats(rid=self.rid()))
        return expect(reply, fds, StatsReply).stats

    def mint_read_token(self, target: Target, ttl: float | None) -> Op[str]:
        blob, key = _target(target)
        ttl_ms = _ttl_millis(ttl)
        reply, fds = yield Call(MintToken(rid=self.rid(), id=blob, key=key, ttl_ms=ttl_ms))
        return expect(reply, fds, TokenReply).token

    def listing(self, include_deleted: bool) -> Op[list[BlobEntry]]:
        request = List(rid=self.rid(), include_deleted=include_deleted)
        step = Call(request)
        entries: list[BlobEntry] = []
        while True:
            reply, fds = yield step
            part = expect(reply, fds, ListReply)
            entries.extend(part.blobs)
            if not part.more:
                return entries
            step = Call(request, send=False)

    # -- what comes in -------------------------------------------------------------------

    def decode(self, message: Message, fds: tuple[int, ...]) -> Reply:
        """The reply *message* carries. Both drivers decode every message as it arrives, so
        the answer to a pooled put settles its slot here, in order, whoever waits for it:
        published (`pooled`, before any `SlotFree` of it is read), or refused and free."""
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
            reply = decode_reply(message.data)
        except BaseException:
            close_fds(fds)
            raise
        if self.putting:
            held = self.putting.pop(getattr(reply, "rid", 0), None)
            if held is not None:
                if isinstance(reply, BlobReply):
                    self.pooled[reply.blob.id] = held
                elif isinstance(reply, Refused) and not held[0].closed:
                    held[0].release(held[1])
        return reply

    def unsolicited(self, reply: Reply, fds: tuple[int, ...]) -> None:
        """Take a message nobody waits for: a notification, or a late reply to undo."""
        close_fds(fds)
        match reply:
            case SlotFree(id=blob, reuse=reuse):
                held = self.pooled.pop(blob, None)
                if held is None:
                    return
                pool, slot, auto = held
                if not reuse and auto is not None and auto.drop(pool):
                    return
                if not pool.closed:
                    pool.release(slot)
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

    def abandon(self, call: Call) -> Timeout:
        """The caller stops waiting for *call*'s reply: undo it when it comes."""
        self.abandoned[call.request.rid] = type(call.request)
        return Timeout(f"the broker did not answer {type(call.request).__name__.lower()} in time")

    def close(self) -> None:
        """The client's own state; its automatic-pool slots and connection go with `let_go`."""
        self.slots.close()
        if self._local is not None:
            self._local.close()


def let_go(slot_owner: SlotOwner, channel: ChannelBase) -> None:
    """A client's end: its automatic-pool slots unmapped, then its connection closed.

    What it put from the automatic pool and the broker still publishes is the
    broker's from now on, never loaned (or written) here again. In that order,
    also when the client is dropped unclosed or the process exits: the broker
    seals a slot it keeps only once no process maps it writable, and it tries
    when the connection ends.
    """
    slot_owner.retire()
    channel.close()


class AutoPoolOption:
    """The setting both clients expose of their core: where puts copy."""

    _core: ClientCore
    auto_pool = PoolSetting(
        """Where `put_bytes` and `put_object` copy from 64 KiB up.

        By default the process's pool (`default_auto_pool()`): a slot comes back
        for reuse once its blob is freed, unless the broker gave it to a token
        holder, who may keep it (then the slot is closed). Another `AutoPool`
        for other bounds; None for a fresh sealed memfd every time.
        """
    )


def expect(reply: Reply, fds: tuple[int, ...], kind: type[R], nfds: int = 0) -> R:
    """*reply* if it is a *kind* with *nfds* fds; raise the broker's refusal otherwise."""
    if isinstance(reply, kind) and len(fds) == nfds:
        return reply
    close_fds(fds)
    if isinstance(reply, Refused):
        raise_refusal(reply)
    raise RemoteProtocolError(
        f"the broker answered with {type(reply).__name__} and {len(fds)} fds, "
        f"expected {kind.__name__} with {nfds}"
    )


def no_broker(path: str, exc: ConnectionRefused) -> ConnectionRefused:
    return ConnectionRefused(f"no broker at {path} ({exc}); start one with `blobplane serve`")


def checked(request: Request) -> bytes:
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


def payload_of(request: Request) -> UserPayload:
    return UserPayload(data=checked(request))
