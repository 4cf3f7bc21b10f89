"""The broker's registry: which blobs exist, who holds them, whose bytes they are, when they end.

Theory of operation
-------------------

The registry is a sans-I/O state machine. The server calls one method per
request; the method either raises a `BlobError` (and changes nothing) or
changes the state and returns its result together with a list of *actions*
that the server carries out in order: close the broker's fd of a blob
(`FreeBlob`), tell a producer that a pool slot came back (`NotifyProducer`),
answer the gets that wait for a blob (`WakeWaiters`), log why a blob went
(`Evicted`), write a blob out to its spill file or read it back (`Spill`,
`Restore`). The registry never touches an fd, a file, a socket or a timer;
time comes from the injected clock (seconds, `time.monotonic` by default).

A blob lives in one of these states::

    create ──> ALLOCATED ──seal──> SEALED ──delete/lease/evict/producer gone──> DELETED
    put ─────────────────────────> SEALED                                         │
    ALLOCATED ──delete/lease/owner gone──> freed                                  │
    DELETED ──last reference released──> freed <──────────────────────────────────┘

    SEALED ──memory pressure──> SPILLED ──get──> RESTORING ──restored──> SEALED
    SPILLED, RESTORING ──delete/lease──> freed;  RESTORING ──spill file damaged──> freed

Only a SEALED blob can be got; each get counts one reference of the caller,
each release gives one back. An ALLOCATED blob answers get with `Pending`:
the server parks the request and re-runs `get()` on `WakeWaiters`, which
comes when the blob is sealed or gone. A withdrawn (DELETED) blob answers no
new get and gives its key up at once, but its bytes stay accounted until the
last reference is released; then `FreeBlob` says the broker's fd may go.

Bytes count against the global memory limit and against the *account* of
the client that created or put the blob (see `Grant.account`), until the blob
is freed. A client's disconnect releases its references and frees the blobs
it never sealed; what it sealed stays until deleted, its lease ends or it is
evicted.

A blob belongs to the connection that placed it (its *owner*, which alone
may seal it) and to that connection's account. Delete and renew need their
right, except of one's own blob: one placed by this connection, or under
this connection's named account (`Grant.account`, a token's id), that is by
any connection presenting the same token, now or later, after the placing
one has gone. A connection without a named account gets one of its own that
no other connection shares; a grant bound to one blob owns nothing.

A pooled blob is a slot of a producer's `BlobPool`, published with
`put(pooled=True)`. Its memory is the producer's, but the broker pins it for
as long as it is published, so the whole slot (its memfd's size, which may
exceed the payload's) counts against the memory limit and the producer's
quota like any blob. It stays published until it is deleted, its lease ends
or its producer disconnects, and is never evicted; once it is withdrawn and
its last reference is released, `NotifyProducer` hands the slot back (only
then may the producer write to it again), to be reused unless a reader whose
right to read may lapse (a token holder) was given it. A pooled blob put
with *keep* (the clients' `put_bytes` and `put_object` put their automatic
pool's slots so) outlives its producer instead: when the producer
disconnects, the broker takes its memory over and it becomes a blob like any
other, still published and still counted against the account that put it.
Such a slot can be evicted or spilled like any blob, and its producer, if
still connected, gets it back then.

A *cached* blob (a copy fetched from a peer broker, `create(cached=True)`)
is evictable even without *evict*: it can be fetched again.

Eviction (when enabled) takes sealed, non-pooled blobs that nobody
references, least recently used first (use = put, seal, get, release). It is
planned before anything changes: when even evicting every candidate would not
make room, nothing is evicted and the request is refused.

Spilling (with *spill*) takes the same blobs as eviction, least recently
used first, and for the memory limit it replaces eviction: a spilled blob's
bytes move to a file (`Spill`, the server writes it and then closes the
memfd) and stop counting against the memory limit, but they still count
against the account's quota, since the blob still exists and can be got.
A cached blob is evicted rather than spilled: it can be fetched again.
`--evict` beside spilling then only frees room under a quota, from the
account's own idle blobs, spilled ones included. A get of a spilled blob
answers `Pending(restore=True)`: the server calls `restore()`, which makes
room the same way (spilling others) and reserves the memory, and parks the
get; every get of it meanwhile parks too, and `restored()` wakes them all.
A restore that finds the file damaged ends with `restore_failed(lost=True)`:
the blob is gone (`Evicted` with `LOST`).

A lease that has run out makes the blob unusable at once (get, seal and renew
say `LeaseExpired`) even before `expire()` reclaims it; `create` and `put`
reclaim expired blobs themselves, so their keys and bytes are free again.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import TypeAlias

from blobplane.broker.protocol import check_key
from blobplane.broker.rights import Grant, Right
from blobplane.errors import (
    BlobDeleted,
    BlobNotFound,
    BlobSealed,
    BrokerLimitReached,
    ClientQuotaExceeded,
    DuplicateClient,
    InvalidSize,
    KeyInUse,
    LeaseExpired,
    MemoryLimitExceeded,
    NotHolding,
    NotOwner,
    RightMissing,
    UnknownClient,
)
from blobplane.sizes import format_size
from blobplane.types import BlobId, BlobToken, is_int

__all__ = [
    "MAX_KEPT_PER_CLIENT",
    "AccountUsage",
    "Action",
    "BlobInfo",
    "BlobRegistry",
    "BlobState",
    "BrokerStats",
    "ClientId",
    "EvictReason",
    "Evicted",
    "FreeBlob",
    "GetResult",
    "NotifyProducer",
    "Pending",
    "Placed",
    "Ready",
    "Restore",
    "Spill",
    "WakeWaiters",
]

# Pool slots one connection may have put to outlive it (`put(keep=True)`): each is sealed
# against writes when it goes, which a client can make slow (see `BrokerServer`).
MAX_KEPT_PER_CLIENT = 256

ClientId: TypeAlias = int


class BlobState(enum.StrEnum):
    ALLOCATED = "allocated"  # the broker made it; its owner is filling it
    SEALED = "sealed"  # immutable and published: gets succeed
    DELETED = "deleted"  # withdrawn: no new gets; freed when the last reference goes
    SPILLED = "spilled"  # sealed, its bytes in a spill file instead of memory
    RESTORING = "restoring"  # sealed, being read back from its spill file


class EvictReason(enum.StrEnum):
    LEASE_EXPIRED = "lease-expired"
    MEMORY = "memory-pressure"
    ABANDONED = "abandoned"  # its owner disconnected before sealing it
    PRODUCER_GONE = "producer-gone"  # the producer of a pooled slot disconnected
    LOST = "lost"  # its spill file could not be read back intact


# -- actions: what the server must do after a call ---------------------------------------


@dataclass(frozen=True, slots=True)
class FreeBlob:
    """The blob is gone from the registry: close the broker's fd of it."""

    id: BlobId


@dataclass(frozen=True, slots=True)
class NotifyProducer:
    """The pooled blob *id* is free: tell *client*, its producer, that it has its slot back.

    *reuse* False: a reader whose right to read may lapse (a token's, a
    per-blob grant) was given the slot and may still hold it, so the slot
    must not carry another blob; the producer drops it instead.
    """

    client: ClientId
    id: BlobId
    reuse: bool = True


@dataclass(frozen=True, slots=True)
class WakeWaiters:
    """Blob *id* was sealed or went away: re-run `get()` for every request parked on it."""

    id: BlobId


@dataclass(frozen=True, slots=True)
class Evicted:
    """The registry withdrew a blob on its own (not at anyone's request): log it."""

    id: BlobId
    key: str | None
    size: int
    reason: EvictReason


@dataclass(frozen=True, slots=True)
class Spill:
    """Write blob *id*'s *size* bytes to its spill file, then close the broker's fd of it.

    The registry already counts the blob as spilled: if the write fails, call
    `spill_failed()`; if a get asked for it meanwhile (it is RESTORING), put
    the fd back and call `restored()`.
    """

    id: BlobId
    size: int


@dataclass(frozen=True, slots=True)
class Restore:
    """Read blob *id* back from its spill file into a new sealed memfd.

    Then `restored()`, or `restore_failed()` (`lost=True` when the file was
    damaged). Its memory is reserved already.
    """

    id: BlobId
    size: int


Action: TypeAlias = FreeBlob | NotifyProducer | WakeWaiters | Evicted | Spill | Restore


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A snapshot of one blob. Times come from the registry's clock."""

    id: BlobId
    key: str | None
    size: int
    state: BlobState
    owner: ClientId | None  # None once the creator disconnected
    account: str  # whose quota it counts against; with a token's, whose blob it is
    pooled: bool
    lease_ms: int | None
    expires_at: float | None
    references: int
    created_at: float
    last_used: float
    charge: int  # bytes counted against the limit and the quota (a pool slot's whole size)

    @property
    def token(self) -> BlobToken:
        return BlobToken(self.id, self.size, self.lease_ms)


@dataclass(frozen=True, slots=True)
class Placed:
    """A blob created or put, and what the server must do first (evictions, expiries)."""

    info: BlobInfo
    actions: list[Action]

    @property
    def id(self) -> BlobId:
        return self.info.id


@dataclass(frozen=True, slots=True)
class Ready:
    """The blob is sealed; one reference was counted for the caller (it must release it)."""

    info: BlobInfo


@dataclass(frozen=True, slots=True)
class Pending:
    """The blob is not ready: park the request, and `get()` again on `WakeWaiters(id)`.

    Not sealed yet; or, with *restore*, its bytes are in a spill file: call
    `restore()` first (which starts a restore unless one is under way).
    """

    id: BlobId
    restore: bool = False


GetResult: TypeAlias = Ready | Pending


@dataclass(frozen=True, slots=True)
class AccountUsage:
    name: str
    bytes: int
    blobs: int
    max_bytes: int | None
    clients: int


@dataclass(frozen=True, slots=True)
class BrokerStats:
    clients: int
    blobs: int  # every blob the registry holds, withdrawn ones still referenced included
    allocated: int
    sealed: int  # spilled ones included
    deleted: int  # withdrawn but still referenced
    pooled: int
    bytes: int  # accounted against the memory limit, pooled slots included
    pooled_bytes: int  # the part of `bytes` held by pooled slots
    memory_limit: int | None
    references: int
    evictions: int  # for memory since the start
    expirations: int  # leases that ran out since the start
    accounts: tuple[AccountUsage, ...]
    spilled: int = 0  # sealed blobs whose bytes are in spill files, not memory
    spilled_bytes: int = 0  # their bytes: counted in their accounts, not in `bytes`
    spills: int = 0  # blobs chosen to be spilled since the start
    restores: int = 0  # blobs read back since the start


# -- internal records ---------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Account:
    name: str
    max_bytes: int | None
    bytes: int = 0
    blobs: int = 0
    clients: int = 0


@dataclass(slots=True, eq=False)
class _Client:
    id: ClientId
    grant: Grant
    account: _Account
    # dicts as ordered sets, so that cleanup runs (and reports) in a stable order
    owned: dict[BlobId, None] = field(default_factory=dict)
    held: dict[BlobId, None] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Blob:
    id: BlobId
    size: int
    key: str | None
    owner: ClientId | None
    account: _Account
    pooled: bool
    state: BlobState
    lease_ms: int | None
    expires_at: float | None
    created_at: float
    last_used: float
    # Bytes held against the limit and the account: the memfd's real size,
    # which for a pool slot may exceed `size` (the payload).
    charge: int = 0
    holders: dict[ClientId, int] = field(default_factory=dict)
    references: int = 0
    deadline_entry: int = -1  # the tiebreak of its one valid entry in the deadline heap
    cached: bool = False  # a copy of a peer's blob: evictable even without `evict`
    # Its charge is in `_spilled_bytes`, not `_bytes` (SPILLED; a RESTORING blob
    # has its memory reserved again).
    spilled: bool = False
    keep: bool = False  # pooled, and stays published when its producer goes
    # Pooled, and given to a reader whose right to read may lapse (`NotifyProducer.reuse`).
    disclosed: bool = False

    def info(self) -> BlobInfo:
        return BlobInfo(
            id=self.id,
            key=self.key,
            size=self.size,
            state=self.state,
            owner=self.owner,
            account=self.account.name,
            pooled=self.pooled,
            lease_ms=self.lease_ms,
            expires_at=self.expires_at,
            references=self.references,
            created_at=self.created_at,
            last_used=self.last_used,
            charge=self.charge,
        )

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def idles(self) -> bool:
        """Whether it may be evicted or spilled when idle: not a slot its producer owns."""
        return not self.pooled or self.keep

    def describe(self) -> str:
        return f"blob {self.id}" + (f" (key {self.key!r})" if self.key is not None else "")


class BlobRegistry:
    """Every blob the broker holds, with references, leases and quotas; see the module doc.

    *memory_limit* (None: none) bounds the bytes of all blobs in memory; with
    *evict*, room is made by evicting idle sealed blobs instead of refusing;
    with *spill*, by spilling them to files. Not thread-safe: one event loop
    (or one lock) drives it.
    """

    def __init__(
        self,
        *,
        memory_limit: int | None = None,
        evict: bool = False,
        spill: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if memory_limit is not None and (not is_int(memory_limit) or memory_limit < 0):
            raise InvalidSize(
                f"memory_limit must be a non-negative int or None, got {memory_limit!r}"
            )
        self.memory_limit = memory_limit
        self.evict = evict
        self.spill = spill
        self._clock = clock
        self._blobs: dict[BlobId, _Blob] = {}
        self._keys: dict[str, _Blob] = {}
        self._clients: dict[ClientId, _Client] = {}
        self._accounts: dict[str, _Account] = {}
        # Sealed (in memory or spilled), non-pooled, unreferenced, live blobs in
        # order of last use: exactly the eviction candidates, oldest first; those
        # in memory are the spill candidates.
        self._idle: OrderedDict[BlobId, _Blob] = OrderedDict()
        # (deadline, tiebreak, id); an entry is stale once its blob is gone or has
        # a newer entry (renewed), and is skipped when met.
        self._deadlines: list[tuple[float, int, BlobId]] = []
        self._tiebreak = itertools.count()
        self._bytes = 0
        self._pooled_bytes = 0
        self._spilled_bytes = 0
        self._references = 0
        self._evictions = 0
        self._expirations = 0
        self._spills = 0
        self._restores = 0

    # -- connections ---------------------------------------------------------------------

    def connect(self, client: ClientId, grant: Grant | None = None) -> None:
        """Register a connection with its grant (default: every right, no quota of its own).

        Connections sharing `grant.account` share one quota; the latest
        connect sets its `max_bytes`.
        """
        if client in self._clients:
            raise DuplicateClient(
                f"client {client} is already connected; give each connection an id of its own"
            )
        grant = Grant() if grant is None else grant
        name = grant.account if grant.account is not None else f"client:{client}"
        account = self._accounts.get(name)
        if account is None:
            account = self._accounts[name] = _Account(name, grant.max_bytes)
        account.max_bytes = grant.max_bytes
        account.clients += 1
        self._clients[client] = _Client(client, grant, account)

    def kept_by(self, client: ClientId) -> list[BlobId]:
        """The pool slots *client* put with *keep* (and still its own: not spilled out, or
        adopted): for the server to seal against writes before `disconnect`."""
        return [blob_id for blob_id in self._client(client).owned if self._blobs[blob_id].keep]

    def disconnect(self, client: ClientId, sealed: Container[BlobId] = ()) -> list[Action]:
        """The connection ended, for whatever reason: clean up after it.

        Its references are released, the blobs it created but never sealed
        are freed, and its pooled slots are withdrawn (the producer is gone,
        so nobody is notified). Sealed blobs it published stay, and so do the
        slots it put with *keep* that the server *sealed* against writes
        (`kept_by`): those become the broker's.
        """
        state = self._client(client)
        del self._clients[client]
        actions: list[Action] = []
        for blob_id in state.owned:
            blob = self._blobs[blob_id]
            blob.owner = None
            if blob.state is BlobState.ALLOCATED:
                actions += self._withdraw(blob, EvictReason.ABANDONED)
            elif blob.keep and blob.id in sealed:
                self._adopt(blob)
            elif blob.keep or (blob.pooled and blob.state is BlobState.SEALED):
                actions += self._withdraw(blob, EvictReason.PRODUCER_GONE)
        for blob_id in state.held:
            blob = self._blobs[blob_id]
            count = blob.holders.pop(client)
            blob.references -= count
            self._references -= count
            actions += self._after_release(blob)
        state.account.clients -= 1
        self._drop_if_unused(state.account)
        return actions

    def connected(self, client: ClientId) -> bool:
        return client in self._clients

    def grant(self, client: ClientId) -> Grant:
        """The grant *client* connected with."""
        return self._client(client).grant

    # -- placing blobs -----------------------------------------------------------------

    def create(
        self,
        client: ClientId,
        size: int,
        *,
        key: str | None = None,
        lease_ms: int | None = None,
        cached: bool = False,
    ) -> Placed:
        """Reserve a blob the broker will allocate and *client* will fill and seal.

        The server allocates the memfd after this returns; if that fails, it
        calls `discard()`. *cached*: a copy of a peer's blob, which memory
        pressure may evict even without `evict`.
        """
        placed = self._place(
            client, Right.CREATE, size, key, lease_ms, sealed=False, pooled=False, charge=size
        )
        if cached:
            self._blobs[placed.id].cached = True
        return placed

    def put(
        self,
        client: ClientId,
        size: int,
        *,
        key: str | None = None,
        lease_ms: int | None = None,
        pooled: bool = False,
        keep: bool = False,
        charge: int | None = None,
    ) -> Placed:
        """Publish a blob *client* made and sealed itself (the server has checked its fd).

        With *pooled*, it is a slot of the client's `BlobPool`: never evicted,
        and handed back with `NotifyProducer` once withdrawn and released by
        everyone; with *keep* too, it stays published when its producer
        disconnects (see the module's doc). *charge* is the bytes the blob's
        memory really holds, as the server measured it (default *size*; a slot
        may be larger than its payload): that is what counts against the limit
        and the quota.
        """
        charge = size if charge is None else charge
        if not is_int(charge) or charge < size:
            raise InvalidSize(f"a blob's charge must be an int, at least its size, got {charge!r}")
        if pooled and keep and len(self.kept_by(client)) >= MAX_KEPT_PER_CLIENT:
            raise BrokerLimitReached(
                f"this connection has {MAX_KEPT_PER_CLIENT} pool slots published to outlive it, "
                "the most allowed; put further ones without keep, or fresh blobs"
            )
        return self._place(
            client,
            Right.PUT,
            size,
            key,
            lease_ms,
            sealed=True,
            pooled=pooled,
            keep=pooled and keep,
            charge=charge,
        )

    def check_seal(self, client: ClientId, blob_id: BlobId) -> BlobInfo:
        """Raise what `seal()` would raise, change nothing.

        The server calls it before applying the kernel seals, so that nobody
        can seal a memfd that is not theirs, then `seal()` once they hold.
        """
        state = self._client(client)
        self._require(state, Right.CREATE)
        blob = self._blob(blob_id)
        if blob.state is BlobState.DELETED:
            raise BlobDeleted(f"{blob.describe()} was deleted before it was sealed")
        if blob.owner != client:
            raise NotOwner(
                f"{blob.describe()} was created by another client; only its creator can seal it"
            )
        if blob.state is not BlobState.ALLOCATED:
            raise BlobSealed(f"{blob.describe()} is already sealed")
        if blob.expired(self._clock()):
            raise LeaseExpired(
                f"{blob.describe()}'s lease of {blob.lease_ms} ms ran out before it was sealed; "
                "create it again with a longer lease, or renew it while filling it"
            )
        return blob.info()

    def seal(self, client: ClientId, blob_id: BlobId) -> list[Action]:
        """The kernel seals hold: publish the blob and wake the gets waiting for it."""
        self.check_seal(client, blob_id)
        blob = self._blobs[blob_id]
        blob.state = BlobState.SEALED
        blob.last_used = self._clock()
        self._idle[blob.id] = blob
        return [WakeWaiters(blob.id)]

    def discard(self, client: ClientId, blob_id: BlobId) -> list[Action]:
        """Forget an unsealed blob the server failed to back with memory.

        No `FreeBlob` comes back: the server holds no fd for it.
        """
        self._client(client)
        blob = self._blob(blob_id)
        if blob.state is not BlobState.ALLOCATED or blob.owner != client:
            raise NotOwner(f"only the creator's unsealed {blob.describe()} can be discarded")
        return [a for a in self._withdraw(blob, None) if not isinstance(a, FreeBlob)]

    # -- reading -----------------------------------------------------------------------

    def get(self, client: ClientId, target: BlobId | str, *, served: bool = False) -> GetResult:
        """A sealed blob: count a reference for *client*. An unsealed or spilled one: `Pending`.

        *served*: the broker reads the blob for the client (over Flight), which gets
        its bytes but never its memory, and cannot look again once it released it: a
        pool slot it read may carry another blob afterwards, whatever its grant.
        """
        state = self._client(client)
        blob = self._readable(state, target)
        if blob.state is BlobState.ALLOCATED:
            return Pending(blob.id)
        if blob.state is not BlobState.SEALED:
            return Pending(blob.id, restore=True)
        blob.holders[client] = blob.holders.get(client, 0) + 1
        blob.references += 1
        self._references += 1
        state.held[blob.id] = None
        if blob.pooled and not served and not state.grant.reads_everything_for_good:
            blob.disclosed = True
        self._idle.pop(blob.id, None)
        blob.last_used = self._clock()
        return Ready(blob.info())

    def check_get(self, client: ClientId, target: BlobId | str) -> BlobInfo:
        """Raise what `get()` would raise, count nothing.

        For the server to decide whether *client* may hand the blob on (mint
        a per-blob read token for it).
        """
        return self._readable(self._client(client), target).info()

    def release(self, client: ClientId, blob_id: BlobId) -> list[Action]:
        """*client* gives one reference back."""
        self._client(client)
        blob = self._blob(blob_id)
        count = blob.holders.get(client, 0)
        if count == 0:
            raise NotHolding(
                f"client {client} holds no reference to {blob.describe()}; release only "
                "what a get returned, once per get"
            )
        if count == 1:
            del blob.holders[client]
            del self._clients[client].held[blob.id]
        else:
            blob.holders[client] = count - 1
        blob.references -= 1
        self._references -= 1
        blob.last_used = self._clock()
        return self._after_release(blob)

    # -- spilling ------------------------------------------------------------------------

    def restore(self, blob_id: BlobId) -> list[Action]:
        """Begin bringing a spilled blob back: make room, reserve its memory, `Restore` it.

        Nothing when it is being restored already (or is back). Raises
        `MemoryLimitExceeded` when no room can be made (nothing changes then).
        """
        blob = self._blob(blob_id)
        if blob.state is not BlobState.SPILLED:
            return []
        now = self._clock()
        if blob.expired(now):
            raise LeaseExpired(
                f"{blob.describe()}'s lease of {blob.lease_ms} ms has run out; it is being "
                "reclaimed"
            )
        due = self._due(now)
        evicted, spilled = self._make_room(None, blob.charge, due, restoring=blob)
        actions = self._sweep(now)
        actions += self._take_room(evicted, spilled)
        self._idle.pop(blob.id, None)
        blob.state = BlobState.RESTORING
        self._to_memory(blob)
        actions.append(Restore(blob.id, blob.size))
        return actions

    def restored(self, blob_id: BlobId) -> list[Action]:
        """The restored blob is in memory again: wake the gets waiting for it."""
        blob = self._blob(blob_id)
        if blob.state is not BlobState.RESTORING:
            raise BlobNotFound(f"{blob.describe()} is not being restored")
        blob.state = BlobState.SEALED
        blob.last_used = self._clock()
        self._idle[blob.id] = blob
        self._restores += 1
        return [WakeWaiters(blob.id)]

    def restore_failed(self, blob_id: BlobId, *, lost: bool) -> list[Action]:
        """The restore did not bring the blob back; the server has answered its gets.

        *lost*: its spill file is damaged, so the blob goes (`Evicted` with
        `LOST`, then `FreeBlob`). Otherwise (no memory for it, say) it stays
        spilled and its reserved memory is given back.
        """
        blob = self._blob(blob_id)
        if blob.state is not BlobState.RESTORING:
            raise BlobNotFound(f"{blob.describe()} is not being restored")
        if lost:
            return self._withdraw(blob, EvictReason.LOST)
        self._to_disk(blob)
        self._idle[blob.id] = blob
        return []

    def spill_written(self, blob_id: BlobId) -> list[Action]:
        """The spilled blob is in its file and the server closed its fd of it.

        A kept pool slot is then the broker's blob like any other, and its
        producer gets the slot back (`NotifyProducer`).
        """
        blob = self._blobs.get(blob_id)
        if blob is None or not blob.pooled or blob.state is not BlobState.SPILLED:
            return []
        self._adopt(blob)
        if blob.owner is None or blob.owner not in self._clients:
            return []
        return [NotifyProducer(blob.owner, blob.id, reuse=not blob.disclosed)]

    def spill_failed(self, blob_id: BlobId) -> list[Action]:
        """Writing the spilled blob out failed; the server still holds its memory.

        The blob is in memory again, counted against the limit even when that
        takes the broker over it for a while: the memory was never given back.
        """
        blob = self._blob(blob_id)
        if blob.state is not BlobState.SPILLED:
            raise BlobNotFound(f"{blob.describe()} is not spilled")
        blob.state = BlobState.SEALED
        self._to_memory(blob)
        # The last candidate from now on: the next request that needs room would
        # only fail to write it out again.
        self._idle.move_to_end(blob.id)
        return []

    # -- lifetime ------------------------------------------------------------------------

    def delete(self, client: ClientId, target: BlobId | str) -> list[Action]:
        """Withdraw a blob: no new gets, its key is free; it goes when its readers let go."""
        state = self._client(client)
        blob = self._live(target)
        self._require_control(state, blob, Right.DELETE, "delete")
        return self._withdraw(blob, None)

    def renew(self, client: ClientId, target: BlobId | str, lease_ms: int | None) -> BlobInfo:
        """Restart the blob's lease: it now ends *lease_ms* from now (None: never)."""
        state = self._client(client)
        blob = self._live(target)
        self._require_control(state, blob, Right.RENEW, "renew")
        now = self._clock()
        if blob.expired(now):
            raise LeaseExpired(
                f"{blob.describe()}'s lease of {blob.lease_ms} ms ran out before the renewal; "
                "renew well before the lease ends"
            )
        BlobToken(blob.id, blob.size, lease_ms)  # the same checks as at creation
        blob.lease_ms = lease_ms
        self._set_deadline(blob, now)
        return blob.info()

    def expire(self, now: float | None = None) -> list[Action]:
        """Withdraw every blob whose lease has ended by *now* (default: the clock)."""
        return self._sweep(self._clock() if now is None else now)

    def next_deadline(self) -> float | None:
        """When the next lease ends (clock time), for the server's timer; None: no lease."""
        while self._deadlines:
            deadline, entry, blob_id = self._deadlines[0]
            if self._deadline_valid(entry, blob_id):
                return deadline
            heapq.heappop(self._deadlines)
        return None

    # -- looking -------------------------------------------------------------------------

    def lease_left_ms(self, info: BlobInfo) -> int | None:
        """What is left of *info*'s lease now, in whole milliseconds (None: it has none)."""
        if info.expires_at is None:
            return None
        return max(0, math.ceil((info.expires_at - self._clock()) * 1000))

    def info(self, blob_id: BlobId) -> BlobInfo:
        """The blob as the registry sees it, for the server (no rights checked)."""
        return self._blob(blob_id).info()

    def stats(self, client: ClientId | None = None) -> BrokerStats:
        """Totals; with *client*, its grant must allow `stats`."""
        if client is not None:
            self._require(self._client(client), Right.STATS)
        states = [blob.state for blob in self._blobs.values()]
        spilled = states.count(BlobState.SPILLED)
        on_disk = spilled + states.count(BlobState.RESTORING)
        return BrokerStats(
            clients=len(self._clients),
            blobs=len(self._blobs),
            allocated=states.count(BlobState.ALLOCATED),
            sealed=states.count(BlobState.SEALED) + on_disk,
            deleted=states.count(BlobState.DELETED),
            pooled=sum(blob.pooled for blob in self._blobs.values()),
            bytes=self._bytes,
            pooled_bytes=self._pooled_bytes,
            memory_limit=self.memory_limit,
            references=self._references,
            evictions=self._evictions,
            expirations=self._expirations,
            accounts=tuple(
                AccountUsage(a.name, a.bytes, a.blobs, a.max_bytes, a.clients)
                for a in self._accounts.values()
            ),
            spilled=spilled,
            spilled_bytes=self._spilled_bytes,
            spills=self._spills,
            restores=self._restores,
        )

    # -- internals -----------------------------------------------------------------------

    def _client(self, client: ClientId) -> _Client:
        state = self._clients.get(client)
        if state is None:
            raise UnknownClient(
                f"client {client} is not connected; call connect() first (and nothing after "
                "disconnect())"
            )
        return state

    def _blob(self, blob_id: BlobId) -> _Blob:
        if not isinstance(blob_id, BlobId):
            raise BlobNotFound(f"a blob id must be a BlobId, got {type(blob_id).__name__}")
        blob = self._blobs.get(blob_id)
        if blob is None:
            raise BlobNotFound(
                f"no blob {blob_id}: it never existed here, or it was deleted and freed"
            )
        return blob

    def _live(self, target: BlobId | str) -> _Blob:
        """The blob named by id or key, refusing withdrawn ones."""
        if isinstance(target, str):
            blob = self._keys.get(check_key(target))
            if blob is None:
                raise BlobNotFound(
                    f"no live blob has the key {target!r}; `blobplane ls` lists the keys in use"
                )
            return blob
        blob = self._blob(target)
        if blob.state is BlobState.DELETED:
            raise BlobDeleted(
                f"{blob.describe()} was deleted; readers that hold it keep reading, "
                "but it can no longer be got, renewed or deleted"
            )
        return blob

    def _readable(self, state: _Client, target: BlobId | str) -> _Blob:
        self._require(state, Right.GET)
        bound = state.grant.blob
        if bound is not None:
            if isinstance(target, str):
                holder = self._keys.get(target)
                target_id = None if holder is None else holder.id
            else:
                target_id = target
            if target_id != bound:
                named = repr(target) if isinstance(target, str) else str(target)
                raise RightMissing(
                    f"client {state.id}'s token grants a get of blob {bound} only, not of {named}"
                )
        blob = self._live(target)
        if blob.expired(self._clock()):
            raise LeaseExpired(
                f"{blob.describe()}'s lease of {blob.lease_ms} ms has run out; it is being "
                "reclaimed"
            )
        return blob

    def _require(self, state: _Client, right: Right) -> None:
        if state.grant.blob is not None and right is not Right.GET:
            raise RightMissing(
                f"client {state.id}'s token grants a get of blob {state.grant.blob} only; "
                f"{right.value} needs a token with the {right.value!r} right"
            )
        if not state.grant.allows(right):
            held = ", ".join(sorted(r.value for r in state.grant.rights))
            raise RightMissing(
                f"client {state.id}'s token does not grant {right.value!r} (it grants {held}); "
                f"ask for a token with --rights including {right.value}"
            )

    def _require_control(self, state: _Client, blob: _Blob, right: Right, verb: str) -> None:
        """A client may always delete or renew its own blob (`_owns`); others need the right."""
        if self._owns(state, blob):
            return
        try:
            self._require(state, right)
        except RightMissing as exc:
            raise RightMissing(
                f"{exc}; without it a client may only {verb} the blobs it created, itself "
                "or with the same token"
            ) from None

    @staticmethod
    def _owns(state: _Client, blob: _Blob) -> bool:
        """Whether *blob* is the client's: placed by this connection or under its named account.

        Only a named account (`Grant.account`, a token's) is shared between
        connections; one of the per-connection accounts of clients without
        one never matches another connection. A grant bound to one blob owns
        nothing.
        """
        if state.grant.blob is not None:
            return False
        if blob.owner == state.id:
            return True
        return state.grant.account is not None and blob.account.name == state.grant.account

    def _place(
        self,
        client: ClientId,
        right: Right,
        size: int,
        key: str | None,
        lease_ms: int | None,
        *,
        sealed: bool,
        pooled: bool,
        charge: int,
        keep: bool = False,
    ) -> Placed:
        state = self._client(client)
        self._require(state, right)
        token = BlobToken(BlobId.new(), size, lease_ms)  # checks size and lease like everywhere
        if key is not None:
            check_key(key)
        now = self._clock()
        # Everything that can refuse runs before anything changes, so a refusal
        # loses no action; leases that already ran out count as reclaimed.
        due = self._due(now)
        holder = None if key is None else self._keys.get(key)
        if holder is not None and holder.id not in due:
            raise KeyInUse(
                f"the key {key!r} already names live {holder.describe()}; delete it first "
                "or choose another key"
            )
        evicted, spilled = self._make_room(state.account, charge, due)

        actions = self._sweep(now)
        actions += self._take_room(evicted, spilled)
        blob = _Blob(
            id=token.id,
            size=size,
            key=key,
            owner=client,
            account=state.account,
            pooled=pooled,
            state=BlobState.SEALED if sealed else BlobState.ALLOCATED,
            lease_ms=lease_ms,
            expires_at=None,
            created_at=now,
            last_used=now,
            charge=charge,
            keep=keep,
        )
        self._blobs[blob.id] = blob
        if key is not None:
            self._keys[key] = blob
        state.owned[blob.id] = None
        state.account.blobs += 1
        state.account.bytes += charge
        self._bytes += charge
        if pooled:
            self._pooled_bytes += charge
        if sealed and blob.idles:
            self._idle[blob.id] = blob
        self._set_deadline(blob, now)
        return Placed(blob.info(), actions)

    def _make_room(
        self,
        account: _Account | None,
        size: int,
        due: dict[BlobId, _Blob],
        *,
        restoring: _Blob | None = None,
    ) -> tuple[list[_Blob], list[_Blob]]:
        """The blobs to evict and to spill so that *size* more bytes fit; raises when they cannot.

        *account*: whose quota the bytes count against (None: a restore, whose
        bytes count there already). *restoring*: the spilled blob they are for.
        """
        # Expired blobs nobody holds are freed by the sweep that precedes placing.
        reclaimed = [b for b in due.values() if b.references == 0]
        over_limit = over_quota = 0
        if self.memory_limit is not None:
            in_memory = sum(b.charge for b in reclaimed if not b.spilled)
            over_limit = self._bytes - in_memory + size - self.memory_limit
        if account is not None and account.max_bytes is not None:
            mine = sum(b.charge for b in reclaimed if b.account is account)
            over_quota = account.bytes - mine + size - account.max_bytes
        if over_limit <= 0 and over_quota <= 0:
            return [], []
        if account is not None and account.max_bytes is not None and size > account.max_bytes:
            raise ClientQuotaExceeded(
                f"a blob of {format_size(size)} can never fit this client's quota of "
                f"{format_size(account.max_bytes)} (max_bytes of its token); "
                "ask for a token with a larger --max-bytes"
            )
        if self.memory_limit is not None and size > self.memory_limit:
            raise MemoryLimitExceeded(
                f"a blob of {format_size(size)} can never fit the broker's memory limit of "
                f"{format_size(self.memory_limit)}; start the broker with a larger --memory-limit"
            )
        evicted: list[_Blob] = []
        spilled: list[_Blob] = []
        # The quota first, from this account's own blobs (spilled ones too: they
        # count there); then the global limit, from anyone's blobs in memory: no
        # blob of another goes for this quota's sake.
        if over_quota > 0:
            for blob in self._idle.values():
                if over_quota <= 0:
                    break
                if blob.account is account and blob.id not in due and self._evictable(blob):
                    evicted.append(blob)
                    over_quota -= blob.charge
                    if not blob.spilled:
                        over_limit -= blob.charge
        if over_quota <= 0 and over_limit > 0:
            taken = {blob.id for blob in evicted}
            for blob in self._idle.values():
                if over_limit <= 0:
                    break
                if blob.spilled or blob.id in due or blob.id in taken:
                    continue
                # A copy of a peer's blob can be fetched again: not worth the disk.
                if blob.cached or (self.evict and not self.spill):
                    evicted.append(blob)
                elif self.spill:
                    spilled.append(blob)
                else:
                    continue
                over_limit -= blob.charge
        if over_quota > 0:
            assert account is not None
            raise ClientQuotaExceeded(
                f"a blob of {format_size(size)} would take this client's account "
                f"{account.name!r} {format_size(over_quota)} over its quota of "
                f"{format_size(account.max_bytes or 0)} ({format_size(account.bytes)} in use"
                + (", after evicting all its idle sealed blobs" if self.evict else "")
                + (", spilled blobs included" if self.spill else "")
                + "); release or delete blobs, or ask for a token with a larger --max-bytes"
            )
        if over_limit > 0:
            assert self.memory_limit is not None
            what = (
                f"a blob of {format_size(size)}"
                if restoring is None
                else f"restoring {restoring.describe()} ({format_size(size)}) from disk"
            )
            raise MemoryLimitExceeded(
                f"{what} would take the broker {format_size(over_limit)} "
                f"over its memory limit of {format_size(self.memory_limit)} "
                f"({format_size(self._bytes)} in use"
                + (
                    ", even after spilling every sealed blob that nobody references to disk); "
                    "release references or delete blobs"
                    if self.spill
                    else ", even after evicting every sealed blob that nobody references); "
                    "release references or delete blobs"
                    if self.evict
                    else "); release or delete blobs, or start the broker with --evict "
                    "or --spill-dir"
                )
            )
        return evicted, spilled

    def _evictable(self, blob: _Blob) -> bool:
        """Whether room for a quota may be made by evicting *blob* (an idle one)."""
        return self.evict or blob.cached

    def _take_room(self, evicted: list[_Blob], spilled: list[_Blob]) -> list[Action]:
        """Carry out what `_make_room` chose."""
        actions: list[Action] = []
        for victim in evicted:
            actions += self._withdraw(victim, EvictReason.MEMORY)
        for victim in spilled:
            self._to_disk(victim)
            self._spills += 1
            actions.append(Spill(victim.id, victim.size))
        return actions

    def _to_disk(self, blob: _Blob) -> None:
        """Count *blob*'s bytes as on disk (SPILLED) instead of in memory."""
        blob.state = BlobState.SPILLED
        blob.spilled = True
        self._bytes -= blob.charge
        self._spilled_bytes += blob.charge
        if blob.pooled:
            self._pooled_bytes -= blob.charge

    def _to_memory(self, blob: _Blob) -> None:
        """Count *blob*'s bytes as in memory again (restoring, or a spill that did not happen)."""
        blob.spilled = False
        self._spilled_bytes -= blob.charge
        self._bytes += blob.charge
        if blob.pooled:
            self._pooled_bytes += blob.charge

    def _withdraw(self, blob: _Blob, reason: EvictReason | None) -> list[Action]:
        actions: list[Action] = []
        if reason is not None:
            actions.append(Evicted(blob.id, blob.key, blob.size, reason))
            if reason is EvictReason.MEMORY:
                self._evictions += 1
            elif reason is EvictReason.LEASE_EXPIRED:
                self._expirations += 1
        if blob.key is not None and self._keys.get(blob.key) is blob:
            del self._keys[blob.key]
        self._idle.pop(blob.id, None)
        # Gets wait for an unsealed or restoring blob: they learn it is gone.
        waited_for = blob.state in (BlobState.ALLOCATED, BlobState.RESTORING)
        blob.state = BlobState.DELETED
        if waited_for:
            actions.append(WakeWaiters(blob.id))
        if blob.references == 0:
            actions += self._free(blob)
        return actions

    def _adopt(self, blob: _Blob) -> None:
        """A kept pooled blob whose producer went, or that was spilled: the broker's from
        now on, like any blob (an idle candidate already)."""
        blob.pooled = blob.keep = False
        if not blob.spilled:
            self._pooled_bytes -= blob.charge

    def _after_release(self, blob: _Blob) -> list[Action]:
        if blob.references:
            return []
        if blob.state is BlobState.DELETED:
            return self._free(blob)
        if blob.idles:
            self._idle[blob.id] = blob  # the most recently used idle blob from now on
        return []

    def _free(self, blob: _Blob) -> list[Action]:
        del self._blobs[blob.id]
        self._idle.pop(blob.id, None)
        blob.account.blobs -= 1
        blob.account.bytes -= blob.charge
        if blob.spilled:
            self._spilled_bytes -= blob.charge
        else:
            self._bytes -= blob.charge
            if blob.pooled:
                self._pooled_bytes -= blob.charge
        self._drop_if_unused(blob.account)
        actions: list[Action] = [FreeBlob(blob.id)]
        producer = None if blob.owner is None else self._clients.get(blob.owner)
        if producer is not None:
            producer.owned.pop(blob.id, None)
            if blob.pooled:
                actions.append(NotifyProducer(producer.id, blob.id, reuse=not blob.disclosed))
        return actions

    def _drop_if_unused(self, account: _Account) -> None:
        if account.clients == 0 and account.blobs == 0:
            self._accounts.pop(account.name, None)

    def _set_deadline(self, blob: _Blob, now: float) -> None:
        blob.expires_at = None if blob.lease_ms is None else now + blob.lease_ms / 1000
        if blob.expires_at is not None:
            blob.deadline_entry = next(self._tiebreak)
            heapq.heappush(self._deadlines, (blob.expires_at, blob.deadline_entry, blob.id))
        else:
            blob.deadline_entry = -1
        # Renewals leave stale entries behind; rebuild before they dominate the heap.
        if len(self._deadlines) > 2 * len(self._blobs) + 64:
            self._deadlines = [e for e in self._deadlines if self._deadline_valid(e[1], e[2])]
            heapq.heapify(self._deadlines)

    def _deadline_valid(self, entry: int, blob_id: BlobId) -> bool:
        blob = self._blobs.get(blob_id)
        return (
            blob is not None
            and blob.deadline_entry == entry
            and blob.state is not BlobState.DELETED
        )

    def _due(self, now: float) -> dict[BlobId, _Blob]:
        """Blobs whose lease ended by *now*, found without popping the heap."""
        due: dict[BlobId, _Blob] = {}
        heap = self._deadlines
        stack = [0] if heap else []
        while stack:
            index = stack.pop()
            deadline, entry, blob_id = heap[index]
            if deadline > now:
                continue  # a heap's children come no earlier than their parent
            if self._deadline_valid(entry, blob_id):
                due[blob_id] = self._blobs[blob_id]
            stack.extend(child for child in (2 * index + 1, 2 * index + 2) if child < len(heap))
        return due

    def _sweep(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, entry, blob_id = heapq.heappop(self._deadlines)
            if self._deadline_valid(entry, blob_id):
                actions += self._withdraw(self._blobs[blob_id], EvictReason.LEASE_EXPIRED)
        return actions

    # Last in the class: from here on `list` names this method in the class body,
    # and mypy would read any later `list[...]` annotation as this method.
    def list(
        self, client: ClientId | None = None, *, include_deleted: bool = False
    ) -> list[BlobInfo]:
        """Live blobs in creation order (withdrawn ones too with *include_deleted*).

        With *client*, its grant must allow `list`; None is the server itself.
        """
        if client is not None:
            self._require(self._client(client), Right.LIST)
        return [
            blob.info()
            for blob in self._blobs.values()
            if include_deleted or blob.state is not BlobState.DELETED
        ]
