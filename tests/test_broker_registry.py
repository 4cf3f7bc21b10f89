"""The broker's pure registry: operations, errors, quotas, eviction, leases and crash cleanup."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from blobplane.broker import (
    BlobRegistry,
    BlobState,
    Evicted,
    EvictReason,
    FreeBlob,
    Grant,
    NotifyProducer,
    Pending,
    Placed,
    Ready,
    Right,
    WakeWaiters,
)
from blobplane.broker.protocol import MAX_KEY_BYTES
from blobplane.broker.registry import MAX_KEPT_PER_CLIENT, Action, Spill
from blobplane.errors import (
    BlobDeleted,
    BlobError,
    BlobNotFound,
    BlobSealed,
    BrokerLimitReached,
    ClientQuotaExceeded,
    DuplicateClient,
    InvalidKey,
    InvalidSize,
    KeyInUse,
    LeaseExpired,
    MemoryLimitExceeded,
    NotHolding,
    NotOwner,
    QuotaExceeded,
    RightMissing,
    UnknownClient,
)
from blobplane.types import BlobId

PRODUCER, CONSUMER, OTHER = 1, 2, 3
KiB = 1024

SIZES = st.integers(0, 400)
NAMES = st.sampled_from(["a", "b", "c"])
KEYS = st.none() | NAMES
LEASES = st.none() | st.integers(1, 5000)


class Clock:
    """A clock the test moves by hand: nothing here ever sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def registry(
    clock: Clock,
    *,
    memory_limit: int | None = None,
    evict: bool = False,
    clients: tuple[int, ...] = (PRODUCER, CONSUMER),
) -> BlobRegistry:
    reg = BlobRegistry(memory_limit=memory_limit, evict=evict, clock=clock)
    for client in clients:
        reg.connect(client)
    return reg


def ready(reg: BlobRegistry, client: int, target: BlobId | str) -> Ready:
    result = reg.get(client, target)
    assert isinstance(result, Ready), result
    return result


def published(reg: BlobRegistry, size: int, key: str | None = None, **kwargs: object) -> BlobId:
    placed = reg.put(PRODUCER, size, key=key, **kwargs)  # type: ignore[arg-type]
    assert placed.actions == []
    return placed.id


def frees(actions: list[Action]) -> list[BlobId]:
    return [a.id for a in actions if isinstance(a, FreeBlob)]


# -- the life of a blob ---------------------------------------------------------------------


def test_create_seal_get_release_delete(clock: Clock) -> None:
    reg = registry(clock)
    placed = reg.create(PRODUCER, 10 * KiB, key="frame", lease_ms=5000)
    assert placed.actions == []
    info = placed.info
    assert (info.state, info.size, info.key, info.owner) == (
        BlobState.ALLOCATED,
        10 * KiB,
        "frame",
        PRODUCER,
    )
    assert info.token.id == placed.id
    assert info.token.lease_ms == 5000
    assert info.expires_at == clock.now + 5
    assert reg.stats().bytes == 10 * KiB
    assert reg.stats().allocated == 1

    assert reg.get(CONSUMER, "frame") == Pending(placed.id)
    assert reg.info(placed.id).references == 0  # a wait counts nothing

    assert reg.seal(PRODUCER, placed.id) == [WakeWaiters(placed.id)]
    got = ready(reg, CONSUMER, "frame")
    assert got.info.id == placed.id
    assert got.info.references == 1
    assert got.info.state is BlobState.SEALED
    assert reg.stats().references == 1

    assert reg.release(CONSUMER, placed.id) == []
    assert reg.delete(PRODUCER, "frame") == [FreeBlob(placed.id)]
    stats = reg.stats()
    assert (stats.blobs, stats.bytes, stats.references) == (0, 0, 0)


def test_put_publishes_a_sealed_blob_at_once(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 4 * KiB, "doc")
    assert reg.info(blob_id).state is BlobState.SEALED
    assert ready(reg, CONSUMER, blob_id).info.key == "doc"
    assert reg.stats().sealed == 1


def test_zero_byte_blobs_are_fine(clock: Clock) -> None:
    reg = registry(clock, memory_limit=0)
    blob_id = published(reg, 0)
    assert ready(reg, CONSUMER, blob_id).info.size == 0


def test_a_client_may_hold_several_references_and_releases_them_one_by_one(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 100)
    ready(reg, CONSUMER, blob_id)
    ready(reg, CONSUMER, blob_id)
    ready(reg, PRODUCER, blob_id)
    assert reg.info(blob_id).references == 3
    reg.delete(PRODUCER, blob_id)
    assert reg.release(CONSUMER, blob_id) == []
    assert reg.release(PRODUCER, blob_id) == []
    assert reg.release(CONSUMER, blob_id) == [FreeBlob(blob_id)]
    with pytest.raises(BlobNotFound):
        reg.release(CONSUMER, blob_id)


def test_list_and_stats(clock: Clock) -> None:
    reg = registry(clock, memory_limit=1 << 20)
    first = published(reg, 100, "a")
    second = reg.create(PRODUCER, 200).id
    pooled = published(reg, 300, "p", pooled=True)
    ready(reg, CONSUMER, first)
    reg.delete(PRODUCER, first)
    assert [info.id for info in reg.list()] == [second, pooled]
    assert [info.id for info in reg.list(CONSUMER, include_deleted=True)] == [
        first,
        second,
        pooled,
    ]
    stats = reg.stats(CONSUMER)
    assert (stats.clients, stats.blobs, stats.allocated, stats.sealed, stats.deleted) == (
        2,
        3,
        1,
        1,
        1,
    )
    assert (stats.pooled, stats.bytes, stats.pooled_bytes) == (1, 600, 300)
    assert (stats.memory_limit, stats.references) == (1 << 20, 1)
    usage = {a.name: a for a in stats.accounts}
    assert usage[f"client:{PRODUCER}"].bytes == 600
    assert usage[f"client:{PRODUCER}"].blobs == 3
    assert usage[f"client:{CONSUMER}"].bytes == 0


# -- keys ----------------------------------------------------------------------------------


def test_keys_are_unique_among_live_blobs(clock: Clock) -> None:
    reg = registry(clock)
    published(reg, 10, "k")
    with pytest.raises(KeyInUse, match=r"'k'.*delete it first"):
        reg.put(CONSUMER, 10, key="k")
    with pytest.raises(KeyInUse):
        reg.create(PRODUCER, 10, key="k")
    assert reg.stats().blobs == 1


def test_a_deleted_blob_gives_its_key_up_while_readers_finish(clock: Clock) -> None:
    reg = registry(clock)
    old = published(reg, 10, "latest")
    ready(reg, CONSUMER, "latest")
    assert reg.delete(PRODUCER, "latest") == []  # still read
    new = published(reg, 20, "latest")
    assert ready(reg, CONSUMER, "latest").info.id == new
    assert reg.release(CONSUMER, old) == [FreeBlob(old)]
    assert reg.info(new).key == "latest"  # freeing the old one left the new key alone
    assert reg.stats().bytes == 20


@pytest.mark.parametrize("key", ["", "a\0b", "x" * (MAX_KEY_BYTES + 1), "é" * 513, 7, b"k"])
def test_bad_keys_are_refused(clock: Clock, key: object) -> None:
    reg = registry(clock)
    with pytest.raises(InvalidKey, match="key"):
        reg.put(PRODUCER, 10, key=key)  # type: ignore[arg-type]
    with pytest.raises((InvalidKey, BlobNotFound)):
        reg.get(CONSUMER, key)  # type: ignore[arg-type]
    assert reg.stats().blobs == 0


def test_a_key_of_the_longest_length_is_fine(clock: Clock) -> None:
    reg = registry(clock)
    published(reg, 1, "k" * MAX_KEY_BYTES)
    ready(reg, CONSUMER, "k" * MAX_KEY_BYTES)


# -- errors of each operation ----------------------------------------------------------------


def test_clients_must_be_connected_once(clock: Clock) -> None:
    reg = registry(clock)
    with pytest.raises(DuplicateClient, match="already connected"):
        reg.connect(PRODUCER)
    reg.disconnect(CONSUMER)
    assert not reg.connected(CONSUMER)
    for call in (
        lambda: reg.create(CONSUMER, 1),
        lambda: reg.put(CONSUMER, 1),
        lambda: reg.get(CONSUMER, "k"),
        lambda: reg.release(CONSUMER, BlobId.new()),
        lambda: reg.delete(CONSUMER, "k"),
        lambda: reg.renew(CONSUMER, "k", 1),
        lambda: reg.seal(CONSUMER, BlobId.new()),
        lambda: reg.list(CONSUMER),
        lambda: reg.stats(CONSUMER),
        lambda: reg.disconnect(CONSUMER),
    ):
        with pytest.raises(UnknownClient, match="not connected"):
            call()


@pytest.mark.parametrize("size", [-1, 1.5, True, "10", 2**63])
def test_bad_sizes_are_refused(clock: Clock, size: object) -> None:
    reg = registry(clock)
    with pytest.raises(InvalidSize):
        reg.create(PRODUCER, size)  # type: ignore[arg-type]
    with pytest.raises(InvalidSize):
        reg.put(PRODUCER, size)  # type: ignore[arg-type]
    assert reg.stats().blobs == 0


@pytest.mark.parametrize("lease_ms", [0, -5, 1.5, True])
def test_bad_leases_are_refused(clock: Clock, lease_ms: object) -> None:
    reg = registry(clock)
    with pytest.raises(InvalidSize, match="lease_ms"):
        reg.put(PRODUCER, 1, lease_ms=lease_ms)  # type: ignore[arg-type]
    blob_id = published(reg, 1)
    with pytest.raises(InvalidSize, match="lease_ms"):
        reg.renew(PRODUCER, blob_id, lease_ms)  # type: ignore[arg-type]
    assert reg.info(blob_id).lease_ms is None


def test_get_errors(clock: Clock) -> None:
    reg = registry(clock)
    with pytest.raises(BlobNotFound, match="no live blob has the key 'nope'"):
        reg.get(CONSUMER, "nope")
    with pytest.raises(BlobNotFound, match="never existed"):
        reg.get(CONSUMER, BlobId.new())
    with pytest.raises(BlobNotFound, match="must be a BlobId"):
        reg.get(CONSUMER, 12)  # type: ignore[arg-type]
    blob_id = published(reg, 1, "k")
    ready(reg, CONSUMER, blob_id)
    reg.delete(PRODUCER, blob_id)
    with pytest.raises(BlobDeleted, match="was deleted"):
        reg.get(CONSUMER, blob_id)
    with pytest.raises(BlobNotFound):  # the key went with the delete
        reg.get(CONSUMER, "k")
    assert issubclass(BlobDeleted, BlobNotFound)


def test_seal_errors(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = reg.create(PRODUCER, 10).id
    with pytest.raises(NotOwner, match="only its creator"):
        reg.check_seal(CONSUMER, blob_id)
    with pytest.raises(NotOwner):
        reg.seal(CONSUMER, blob_id)
    with pytest.raises(BlobNotFound):
        reg.seal(PRODUCER, BlobId.new())
    assert reg.check_seal(PRODUCER, blob_id).state is BlobState.ALLOCATED  # changes nothing
    assert reg.info(blob_id).state is BlobState.ALLOCATED
    reg.seal(PRODUCER, blob_id)
    with pytest.raises(BlobSealed, match="already sealed"):
        reg.seal(PRODUCER, blob_id)
    put_id = published(reg, 10)
    with pytest.raises(BlobSealed):
        reg.seal(PRODUCER, put_id)


def test_sealing_a_deleted_blob_fails_and_frees_nothing_twice(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = reg.create(PRODUCER, 10).id
    assert reg.delete(PRODUCER, blob_id) == [WakeWaiters(blob_id), FreeBlob(blob_id)]
    with pytest.raises(BlobNotFound):
        reg.seal(PRODUCER, blob_id)


def test_release_errors(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10)
    with pytest.raises(NotHolding, match="holds no reference"):
        reg.release(CONSUMER, blob_id)
    ready(reg, PRODUCER, blob_id)
    with pytest.raises(NotHolding):  # another client's reference is not yours
        reg.release(CONSUMER, blob_id)
    with pytest.raises(BlobNotFound):
        reg.release(CONSUMER, BlobId.new())
    assert reg.info(blob_id).references == 1


def test_delete_errors(clock: Clock) -> None:
    reg = registry(clock)
    with pytest.raises(BlobNotFound):
        reg.delete(PRODUCER, "missing")
    blob_id = published(reg, 10)
    ready(reg, CONSUMER, blob_id)
    reg.delete(PRODUCER, blob_id)
    with pytest.raises(BlobDeleted):
        reg.delete(PRODUCER, blob_id)


def test_discard_forgets_an_unbacked_blob_without_freeing_an_fd(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = reg.create(PRODUCER, 10, key="k").id
    with pytest.raises(NotOwner):
        reg.discard(CONSUMER, blob_id)
    assert reg.discard(PRODUCER, blob_id) == [WakeWaiters(blob_id)]
    assert reg.stats().blobs == 0
    assert reg.stats().bytes == 0
    published(reg, 1, "k")  # the key is free again
    sealed = published(reg, 1)
    with pytest.raises(NotOwner):
        reg.discard(PRODUCER, sealed)


# -- rights ------------------------------------------------------------------------------------


def test_each_operation_needs_its_right(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10, "k")
    reg.connect(OTHER, Grant(rights=frozenset()))
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: reg.get(OTHER, "k"), "get"),
        (lambda: reg.check_get(OTHER, "k"), "get"),
        (lambda: reg.put(OTHER, 1), "put"),
        (lambda: reg.create(OTHER, 1), "create"),
        (lambda: reg.delete(OTHER, blob_id), "delete"),
        (lambda: reg.renew(OTHER, blob_id, 10), "renew"),
        (lambda: reg.list(OTHER), "list"),
        (lambda: reg.stats(OTHER), "stats"),
    ]
    for call, right in calls:
        with pytest.raises(RightMissing, match=f"does not grant '{right}'"):
            call()
    assert reg.list()
    assert reg.stats().blobs == 1


def test_owners_delete_and_renew_their_own_blobs_without_the_right(clock: Clock) -> None:
    reg = registry(clock, clients=())
    reg.connect(PRODUCER, Grant(rights=frozenset({Right.PUT})))
    reg.connect(CONSUMER, Grant(rights=frozenset({Right.PUT, Right.GET})))
    mine = reg.put(PRODUCER, 10, lease_ms=1000).id
    theirs = reg.put(CONSUMER, 10).id
    reg.renew(PRODUCER, mine, 5000)
    with pytest.raises(RightMissing, match="only renew the blobs it created"):
        reg.renew(PRODUCER, theirs, 5000)
    with pytest.raises(RightMissing, match="only delete the blobs it created"):
        reg.delete(PRODUCER, theirs)
    assert reg.delete(PRODUCER, mine) == [FreeBlob(mine)]
    reg.connect(OTHER, Grant(rights=frozenset({Right.DELETE, Right.RENEW})))
    reg.renew(OTHER, theirs, 100)
    assert reg.delete(OTHER, theirs) == [FreeBlob(theirs)]


def test_a_per_blob_grant_gets_that_blob_and_nothing_else(clock: Clock) -> None:
    reg = registry(clock)
    shared = published(reg, 10, "shared")
    secret = published(reg, 10, "secret")
    reg.connect(OTHER, Grant.for_blob(shared))
    assert ready(reg, OTHER, shared).info.id == shared
    assert ready(reg, OTHER, "shared").info.id == shared
    assert reg.check_get(OTHER, shared).references == 2
    for target in (secret, "secret", "missing", BlobId.new()):
        with pytest.raises(RightMissing, match=f"grants a get of blob {shared} only"):
            reg.get(OTHER, target)
    for call in (
        lambda: reg.put(OTHER, 1),
        lambda: reg.create(OTHER, 1),
        lambda: reg.delete(OTHER, shared),
        lambda: reg.renew(OTHER, shared, 10),
        lambda: reg.list(OTHER),
        lambda: reg.stats(OTHER),
    ):
        with pytest.raises(RightMissing, match="grants a get of blob"):
            call()
    assert reg.release(OTHER, shared) == []


def test_check_get_raises_what_get_would_and_counts_nothing(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10, lease_ms=1000)
    assert reg.check_get(CONSUMER, blob_id).references == 0
    assert reg.info(blob_id).references == 0
    clock.advance(1)
    with pytest.raises(LeaseExpired):
        reg.check_get(CONSUMER, blob_id)


# -- quotas and eviction -------------------------------------------------------------------


def test_memory_limit_refuses_without_eviction(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100)
    first = published(reg, 60)
    with pytest.raises(MemoryLimitExceeded, match=r"over its memory limit.*--evict") as info:
        reg.create(CONSUMER, 41)
    assert isinstance(info.value, QuotaExceeded)
    with pytest.raises(MemoryLimitExceeded):
        reg.put(CONSUMER, 41, key="k")
    assert reg.stats().blobs == 1
    assert reg.stats().bytes == 60
    published(reg, 40, "k")  # exactly full is fine, and the refused key was not taken
    reg.delete(PRODUCER, first)
    published(reg, 60)


def test_a_blob_larger_than_the_limit_can_never_fit(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100, evict=True)
    idle = published(reg, 50)
    with pytest.raises(MemoryLimitExceeded, match=r"can never fit.*--memory-limit"):
        reg.put(PRODUCER, 101)
    assert reg.info(idle).state is BlobState.SEALED  # nothing evicted for nothing


def test_client_quota_refuses_and_is_shared_by_an_account(clock: Clock) -> None:
    reg = registry(clock, clients=())
    quota = Grant(max_bytes=100, account="token:abc")
    reg.connect(PRODUCER, quota)
    reg.connect(OTHER, quota)
    reg.connect(CONSUMER)
    published(reg, 70)
    with pytest.raises(ClientQuotaExceeded, match=r"'token:abc'.*--max-bytes") as info:
        reg.put(OTHER, 31)
    assert isinstance(info.value, QuotaExceeded)
    reg.put(OTHER, 30)
    reg.put(CONSUMER, 1000)  # another account is not limited by this one
    with pytest.raises(ClientQuotaExceeded, match="can never fit"):
        reg.put(OTHER, 101)


def test_a_reconnect_with_the_same_token_keeps_its_quota_used(clock: Clock) -> None:
    reg = registry(clock, clients=())
    quota = Grant(max_bytes=100, account="token:abc")
    reg.connect(PRODUCER, quota)
    published(reg, 80)
    reg.disconnect(PRODUCER)
    reg.connect(OTHER, quota)
    with pytest.raises(ClientQuotaExceeded):
        reg.put(OTHER, 21)
    usage = {a.name: a for a in reg.stats().accounts}
    assert usage["token:abc"].bytes == 80
    assert usage["token:abc"].clients == 1


def test_eviction_takes_the_least_recently_used_idle_blobs(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100, evict=True)
    a = published(reg, 30, "a")
    b = published(reg, 30, "b")
    c = published(reg, 30, "c")
    ready(reg, CONSUMER, a)
    reg.release(CONSUMER, a)  # a is now the most recently used
    placed = reg.put(PRODUCER, 50, key="d")  # 40 over: b alone is not enough
    assert placed.actions == [
        Evicted(b, "b", 30, EvictReason.MEMORY),
        FreeBlob(b),
        Evicted(c, "c", 30, EvictReason.MEMORY),
        FreeBlob(c),
    ]
    assert {info.key for info in reg.list()} == {"a", "d"}
    assert reg.stats().bytes == 80
    assert reg.stats().evictions == 2
    with pytest.raises(BlobNotFound):
        reg.get(CONSUMER, "b")


def test_eviction_never_touches_referenced_unsealed_deleted_or_pooled_blobs(
    clock: Clock,
) -> None:
    reg = registry(clock, memory_limit=100, evict=True)
    held = published(reg, 20)
    ready(reg, CONSUMER, held)
    unsealed = reg.create(PRODUCER, 20).id
    withdrawn = published(reg, 20)
    ready(reg, CONSUMER, withdrawn)
    reg.delete(PRODUCER, withdrawn)
    pooled = published(reg, 10, pooled=True)
    idle = published(reg, 20)
    assert reg.stats().bytes == 90
    # 30 more needs 20 freed: only `idle` may go.
    placed = reg.put(PRODUCER, 30)
    assert frees(placed.actions) == [idle]
    ready(reg, CONSUMER, placed.id)
    # Nothing else is evictable: the request is refused and nothing changes.
    before = reg.list(include_deleted=True)
    with pytest.raises(MemoryLimitExceeded, match="even after evicting every sealed blob"):
        reg.put(PRODUCER, 1)
    assert reg.list(include_deleted=True) == before
    for blob_id in (held, unsealed, withdrawn, pooled):
        assert reg.info(blob_id)


def test_eviction_is_planned_before_anything_goes(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100, evict=True)
    idle = published(reg, 30)
    held = published(reg, 60)
    ready(reg, CONSUMER, held)
    with pytest.raises(MemoryLimitExceeded):
        reg.put(PRODUCER, 50)  # evicting `idle` would not be enough
    assert reg.info(idle).state is BlobState.SEALED
    assert frees(reg.put(PRODUCER, 40).actions) == [idle]


def test_client_quota_evicts_only_that_accounts_blobs(clock: Clock) -> None:
    reg = registry(clock, evict=True, clients=(CONSUMER,))
    reg.connect(PRODUCER, Grant(max_bytes=100))
    others = reg.put(CONSUMER, 50).id
    mine = published(reg, 60)
    placed = reg.put(PRODUCER, 50)
    assert frees(placed.actions) == [mine]
    assert reg.info(others).state is BlobState.SEALED
    held = placed.id
    ready(reg, CONSUMER, held)
    with pytest.raises(ClientQuotaExceeded, match="after evicting all its idle sealed blobs"):
        reg.put(PRODUCER, 60)


def test_global_limit_and_client_quota_together(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100, evict=True, clients=(CONSUMER,))
    reg.connect(PRODUCER, Grant(max_bytes=50))
    theirs = reg.put(CONSUMER, 60).id
    mine = published(reg, 30)
    # 40 more: 20 over the quota (only `mine` helps), 10 over the limit.
    assert frees(reg.put(PRODUCER, 40).actions) == [mine]
    assert reg.info(theirs).state is BlobState.SEALED
    assert reg.stats().bytes == 100


def test_deleted_blobs_stay_accounted_until_the_last_release(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100)
    blob_id = published(reg, 100)
    ready(reg, CONSUMER, blob_id)
    reg.delete(PRODUCER, blob_id)
    assert reg.stats().bytes == 100
    with pytest.raises(MemoryLimitExceeded):
        reg.put(PRODUCER, 1)
    reg.release(CONSUMER, blob_id)
    assert reg.stats().bytes == 0
    published(reg, 100)


# -- leases --------------------------------------------------------------------------------------


def test_expire_withdraws_blobs_whose_lease_ended(clock: Clock) -> None:
    reg = registry(clock)
    short = published(reg, 10, "short", lease_ms=1000)
    long = published(reg, 20, "long", lease_ms=5000)
    forever = published(reg, 30)
    assert reg.next_deadline() == clock.now + 1
    clock.advance(0.999)
    assert reg.expire() == []
    clock.advance(0.001)
    assert reg.expire() == [
        Evicted(short, "short", 10, EvictReason.LEASE_EXPIRED),
        FreeBlob(short),
    ]
    assert reg.next_deadline() == clock.now + 4
    assert reg.expire(clock.now + 100) == [
        Evicted(long, "long", 20, EvictReason.LEASE_EXPIRED),
        FreeBlob(long),
    ]
    assert reg.next_deadline() is None
    assert [info.id for info in reg.list()] == [forever]
    assert reg.stats().expirations == 2
    assert reg.stats().evictions == 0


def test_an_expired_blob_is_unusable_before_it_is_reclaimed(clock: Clock) -> None:
    reg = registry(clock)
    sealed = published(reg, 10, "k", lease_ms=100)
    unsealed = reg.create(PRODUCER, 10, lease_ms=100).id
    clock.advance(0.1)
    with pytest.raises(LeaseExpired, match="has run out"):
        reg.get(CONSUMER, "k")
    with pytest.raises(LeaseExpired, match="before the renewal"):
        reg.renew(PRODUCER, sealed, 1000)
    with pytest.raises(LeaseExpired, match="before it was sealed"):
        reg.seal(PRODUCER, unsealed)
    assert reg.expire() == [
        Evicted(sealed, "k", 10, EvictReason.LEASE_EXPIRED),
        FreeBlob(sealed),
        Evicted(unsealed, None, 10, EvictReason.LEASE_EXPIRED),
        WakeWaiters(unsealed),
        FreeBlob(unsealed),
    ]


def test_an_expired_blob_that_is_still_read_stays_until_released(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10, "k", lease_ms=100)
    ready(reg, CONSUMER, blob_id)
    clock.advance(1)
    assert reg.expire() == [Evicted(blob_id, "k", 10, EvictReason.LEASE_EXPIRED)]
    assert reg.info(blob_id).state is BlobState.DELETED
    assert reg.stats().bytes == 10
    assert reg.release(CONSUMER, blob_id) == [FreeBlob(blob_id)]


def test_renew_moves_the_deadline_and_none_removes_it(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10, lease_ms=1000)
    clock.advance(0.9)
    info = reg.renew(PRODUCER, blob_id, 1000)
    assert info.expires_at == clock.now + 1
    assert info.lease_ms == 1000
    assert reg.next_deadline() == clock.now + 1
    clock.advance(0.9)
    assert reg.expire() == []  # the old deadline passed, the blob lives on
    reg.renew(PRODUCER, blob_id, None)
    assert reg.next_deadline() is None
    assert reg.expire(clock.now + 10**6) == []
    assert reg.info(blob_id).expires_at is None


def test_renew_by_key_and_of_a_deleted_blob(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10, "k", lease_ms=1000)
    assert reg.renew(PRODUCER, "k", 2000).lease_ms == 2000
    ready(reg, CONSUMER, blob_id)
    reg.delete(PRODUCER, blob_id)
    with pytest.raises(BlobDeleted):
        reg.renew(PRODUCER, blob_id, 1000)


def test_many_renewals_do_not_grow_the_deadline_heap_without_bound(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10, lease_ms=1000)
    for _ in range(10_000):
        reg.renew(PRODUCER, blob_id, 1000)
    assert len(reg._deadlines) < 200
    clock.advance(1)
    assert frees(reg.expire()) == [blob_id]


def test_create_and_put_reclaim_expired_blobs_themselves(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100)
    old = published(reg, 100, "k", lease_ms=100)
    clock.advance(0.1)
    # No expire() call: the key and the bytes are free all the same.
    placed = reg.put(PRODUCER, 100, key="k")
    assert placed.actions == [Evicted(old, "k", 100, EvictReason.LEASE_EXPIRED), FreeBlob(old)]
    assert reg.stats().bytes == 100


def test_an_expired_blob_still_read_does_not_count_as_room(clock: Clock) -> None:
    reg = registry(clock, memory_limit=100)
    old = published(reg, 100, lease_ms=100)
    ready(reg, CONSUMER, old)
    clock.advance(1)
    with pytest.raises(MemoryLimitExceeded):
        reg.put(PRODUCER, 1)
    assert reg.info(old).state is BlobState.SEALED  # the refusal changed nothing


def test_a_refused_request_loses_no_expiry(clock: Clock) -> None:
    reg = registry(clock)
    old = published(reg, 1, lease_ms=100)
    published(reg, 1, "taken")
    clock.advance(1)
    with pytest.raises(KeyInUse):
        reg.put(PRODUCER, 1, key="taken")
    assert reg.expire() == [Evicted(old, None, 1, EvictReason.LEASE_EXPIRED), FreeBlob(old)]


# -- crash cleanup ---------------------------------------------------------------------------------


def test_a_producer_that_disconnects_before_sealing_loses_its_blob(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = reg.create(PRODUCER, 100, key="frame").id
    assert reg.get(CONSUMER, "frame") == Pending(blob_id)
    assert reg.disconnect(PRODUCER) == [
        Evicted(blob_id, "frame", 100, EvictReason.ABANDONED),
        WakeWaiters(blob_id),
        FreeBlob(blob_id),
    ]
    # The parked get, run again on WakeWaiters, now fails.
    with pytest.raises(BlobNotFound):
        reg.get(CONSUMER, blob_id)
    stats = reg.stats()
    assert (stats.blobs, stats.bytes, stats.clients) == (0, 0, 1)
    assert [a.name for a in stats.accounts] == [f"client:{CONSUMER}"]


def test_a_consumer_that_disconnects_gives_its_references_back(clock: Clock) -> None:
    reg = registry(clock)
    kept = published(reg, 10, "kept")
    gone = published(reg, 20, "gone")
    for _ in range(3):
        ready(reg, CONSUMER, kept)
    ready(reg, CONSUMER, gone)
    ready(reg, PRODUCER, gone)
    reg.delete(PRODUCER, "gone")
    assert reg.disconnect(CONSUMER) == []  # the producer still reads `gone`
    assert reg.info(kept).references == 0
    assert reg.info(gone).references == 1
    assert reg.stats().references == 1
    assert reg.release(PRODUCER, gone) == [FreeBlob(gone)]


def test_a_consumer_that_disconnects_last_frees_a_deleted_blob(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10)
    ready(reg, CONSUMER, blob_id)
    reg.delete(PRODUCER, blob_id)
    assert reg.disconnect(CONSUMER) == [FreeBlob(blob_id)]
    assert reg.stats().bytes == 0


def test_published_blobs_outlive_their_producer(clock: Clock) -> None:
    reg = registry(clock)
    blob_id = published(reg, 10, "kept", lease_ms=1000)
    assert reg.disconnect(PRODUCER) == []
    info = ready(reg, CONSUMER, "kept").info
    assert info.owner is None
    assert info.account == f"client:{PRODUCER}"
    reg.connect(PRODUCER)  # a new connection is not the old owner
    with pytest.raises(NotOwner):
        reg.seal(PRODUCER, blob_id)
    reg.release(CONSUMER, blob_id)
    clock.advance(1)
    assert frees(reg.expire()) == [blob_id]
    assert f"client:{PRODUCER}" in {a.name for a in reg.stats().accounts}
    reg.disconnect(PRODUCER)
    assert reg.stats().accounts == tuple(
        a for a in reg.stats().accounts if a.name == f"client:{CONSUMER}"
    )


# -- pooled blobs ---------------------------------------------------------------------------------


def test_a_pooled_slot_goes_back_to_its_producer_after_the_last_release(clock: Clock) -> None:
    reg = registry(clock, memory_limit=10)
    slot = published(reg, 10, "frame", pooled=True)
    ready(reg, CONSUMER, "frame")
    assert reg.release(CONSUMER, slot) == []  # still published: not yet reusable
    ready(reg, CONSUMER, "frame")
    assert reg.delete(PRODUCER, "frame") == []
    assert reg.release(CONSUMER, slot) == [FreeBlob(slot), NotifyProducer(PRODUCER, slot)]
    assert reg.stats().pooled_bytes == 0


@pytest.mark.parametrize(
    "grant",
    [
        Grant(account="token:reader", key_id="key"),
        Grant(expires_at=1e12),
        "for the blob",
    ],
    ids=["a token's", "expiring", "bound to the blob"],
)
def test_a_slot_a_lapsing_reader_got_comes_back_not_to_be_reused(
    clock: Clock, grant: Grant | str
) -> None:
    reg = registry(clock)
    slot = published(reg, 10, "frame", pooled=True)
    reg.connect(OTHER, grant if isinstance(grant, Grant) else Grant.for_blob(slot))
    ready(reg, CONSUMER, "frame")  # a reader for good: no matter
    ready(reg, OTHER, slot)
    reg.delete(PRODUCER, "frame")
    reg.release(CONSUMER, slot)
    assert reg.release(OTHER, slot) == [FreeBlob(slot), NotifyProducer(PRODUCER, slot, False)]


def test_a_slot_served_to_a_lapsing_reader_by_the_broker_is_reused(clock: Clock) -> None:
    """Over Flight the broker reads the slot for the reader, who never holds its memory."""
    reg = registry(clock)
    slot = published(reg, 10, "frame", pooled=True)
    reg.connect(OTHER, Grant(account="token:remote", key_id="key"))
    assert isinstance(reg.get(OTHER, "frame", served=True), Ready)
    reg.delete(PRODUCER, "frame")
    assert reg.release(OTHER, slot) == [FreeBlob(slot), NotifyProducer(PRODUCER, slot, True)]


def test_grants_that_read_everything_for_good() -> None:
    assert Grant().reads_everything_for_good
    assert Grant(max_bytes=10).reads_everything_for_good
    assert not Grant(rights=frozenset({Right.PUT})).reads_everything_for_good
    assert not Grant(account="token:t").reads_everything_for_good
    assert not Grant(key_id="k").reads_everything_for_good
    assert not Grant(expires_at=1e12).reads_everything_for_good
    assert not Grant.for_blob(BlobId.new()).reads_everything_for_good


def test_a_spilled_slot_a_lapsing_reader_got_comes_back_not_to_be_reused(clock: Clock) -> None:
    reg = BlobRegistry(memory_limit=200, spill=True, clock=clock)
    for client in (PRODUCER, CONSUMER):
        reg.connect(client)
    reg.connect(OTHER, Grant(account="token:reader", key_id="key"))
    kept = published(reg, 100, "kept", pooled=True, keep=True)
    ready(reg, OTHER, "kept")
    reg.release(OTHER, kept)
    placed = reg.put(CONSUMER, 150)
    assert Spill(kept, 100) in placed.actions
    assert reg.spill_written(kept) == [NotifyProducer(PRODUCER, kept, False)]


def test_an_unread_pooled_slot_goes_back_at_once_when_deleted(clock: Clock) -> None:
    reg = registry(clock)
    slot = published(reg, 100, pooled=True)
    assert reg.delete(PRODUCER, slot) == [FreeBlob(slot), NotifyProducer(PRODUCER, slot)]


def test_a_pooled_slot_goes_back_when_its_lease_ends(clock: Clock) -> None:
    reg = registry(clock)
    slot = published(reg, 100, pooled=True, lease_ms=10)
    clock.advance(1)
    assert reg.expire() == [
        Evicted(slot, None, 100, EvictReason.LEASE_EXPIRED),
        FreeBlob(slot),
        NotifyProducer(PRODUCER, slot),
    ]


def test_pooled_slots_are_withdrawn_when_their_producer_goes(clock: Clock) -> None:
    reg = registry(clock)
    read = published(reg, 100, "read", pooled=True)
    unread = published(reg, 100, "unread", pooled=True)
    ready(reg, CONSUMER, read)
    assert reg.disconnect(PRODUCER) == [
        Evicted(read, "read", 100, EvictReason.PRODUCER_GONE),
        Evicted(unread, "unread", 100, EvictReason.PRODUCER_GONE),
        FreeBlob(unread),
    ]
    with pytest.raises(BlobNotFound):
        reg.get(CONSUMER, "read")
    assert reg.release(CONSUMER, read) == [FreeBlob(read)]  # nobody left to notify
    assert reg.stats().pooled_bytes == 0


def test_pooled_slots_count_their_whole_slot_against_the_quota(clock: Clock) -> None:
    reg = registry(clock, clients=())
    reg.connect(PRODUCER, Grant(max_bytes=1000))
    slot = reg.put(PRODUCER, 10, pooled=True, charge=600).id  # a 600-byte slot, 10 used
    assert reg.info(slot).charge == 600
    assert (reg.stats().bytes, reg.stats().pooled_bytes) == (600, 600)
    with pytest.raises(ClientQuotaExceeded):
        reg.put(PRODUCER, 10, pooled=True, charge=600)
    with pytest.raises(InvalidSize):
        reg.put(PRODUCER, 10, pooled=True, charge=9)  # less than the payload it holds
    reg.delete(PRODUCER, slot)
    assert (reg.stats().bytes, reg.stats().pooled_bytes) == (0, 0)


# -- errors say what to do ----------------------------------------------------------------------


def test_every_refusal_is_a_blob_error_with_advice(clock: Clock) -> None:
    reg = registry(clock, memory_limit=10)
    calls: list[Callable[[], object]] = [
        lambda: reg.put(PRODUCER, 11),
        lambda: reg.get(CONSUMER, "nothing"),
        lambda: reg.connect(PRODUCER),
        lambda: reg.release(CONSUMER, published(reg, 1)),
    ]
    for call in calls:
        with pytest.raises(BlobError) as info:
            call()
        message = str(info.value)
        assert ";" in message, message  # what went wrong; what to do


# -- every operation at random: the books always balance ------------------------------------------


PUT_KINDS = ("fresh", "pooled", "kept")  # kept: pooled, outliving its producer


class RegistryMachine(RuleBasedStateMachine):
    """Random operations against a model of the server: the fds it holds, the references.

    After every step the registry's accounting matches its blobs and the
    model; after the run, once every client is gone and every blob deleted,
    everything is back to zero and every fd was freed exactly once.
    """

    LIMIT = 700
    SHARED_QUOTA = 400

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.reg = BlobRegistry(clock=self.clock)
        self.fds: dict[BlobId, int] = {}  # the fds the server holds: id -> producer
        self.freed: set[BlobId] = set()
        self.ids: list[BlobId] = []
        self.created: set[BlobId] = set()
        self.sealed: set[BlobId] = set()
        self.pooled: set[BlobId] = set()
        # Pooled blobs put with keep, by producer: the broker's once it goes.
        self.kept: dict[BlobId, int] = {}
        self.holds: dict[int, Counter[BlobId]] = {}
        # Clients connected with a token's grant (a shared account), and the pooled
        # blobs one of them got.
        self.token_holders: set[int] = set()
        self.disclosed: set[BlobId] = set()
        self.next_client = 1

    @initialize(evict=st.booleans())
    def start(self, evict: bool) -> None:
        self.reg = BlobRegistry(memory_limit=self.LIMIT, evict=evict, clock=self.clock)

    # -- the server's side: carry out the actions ---------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case FreeBlob(blob_id):
                    assert blob_id in self.fds, "freed twice, or never placed"
                    assert not any(held[blob_id] for held in self.holds.values())
                    del self.fds[blob_id]
                    self.freed.add(blob_id)
                case NotifyProducer(client, blob_id, reuse):
                    assert blob_id in self.freed
                    assert blob_id in self.pooled
                    assert client in self.holds  # still connected
                    # Reusable unless a token's holder (who may keep it) got the slot.
                    assert reuse is (blob_id not in self.disclosed)
                case WakeWaiters(blob_id):
                    assert blob_id in self.created
                case Evicted(blob_id, _, _, reason):
                    event(f"evicted: {reason}")
                    assert blob_id in self.fds
                    if reason is EvictReason.MEMORY:
                        assert blob_id in self.sealed
                        assert blob_id not in self.pooled or blob_id in self.kept
                        assert not any(held[blob_id] for held in self.holds.values())
                    if reason is EvictReason.ABANDONED:
                        assert blob_id not in self.sealed

    def attempt(self, call: Callable[[], object]) -> object:
        """Run *call*; a refusal must leave the registry exactly as it was."""
        before = (self.reg.list(include_deleted=True), self.reg.stats())
        try:
            return call()
        except BlobError as exc:
            event(f"refused: {type(exc).__name__}")
            assert (self.reg.list(include_deleted=True), self.reg.stats()) == before
            return None

    def placed(self, placed: object, creator: int) -> None:
        if isinstance(placed, Placed):
            self.apply(placed.actions)
            self.fds[placed.id] = creator
            self.ids.append(placed.id)

    # -- rules --------------------------------------------------------------------------

    @rule(quota=st.none() | st.integers(50, 800), shared=st.booleans())
    def connect(self, quota: int | None, shared: bool) -> None:
        client, self.next_client = self.next_client, self.next_client + 1
        grant = (
            Grant(max_bytes=self.SHARED_QUOTA, account="shared")
            if shared
            else Grant(max_bytes=quota)
        )
        self.reg.connect(client, grant)
        self.holds[client] = Counter()
        if shared:
            self.token_holders.add(client)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        client = data.draw(st.sampled_from(sorted(self.holds)))
        kept = self.reg.kept_by(client)
        assert sorted(kept, key=self.ids.index) == sorted(
            (b for b, producer in self.kept.items() if producer == client and b in self.fds),
            key=self.ids.index,
        )
        # The server seals some against writes (the others, a process still maps writable).
        sealed = set(data.draw(st.lists(st.sampled_from(kept), unique=True))) if kept else set()
        del self.holds[client]
        self.apply(self.reg.disconnect(client, sealed))
        for blob_id in [b for b, producer in self.kept.items() if producer == client]:
            del self.kept[blob_id]
            if blob_id in sealed:
                self.pooled.discard(blob_id)  # the broker's from now on

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), size=SIZES, key=KEYS, lease=LEASES)
    def create(self, data: st.DataObject, size: int, key: str | None, lease: int | None) -> None:
        client = data.draw(st.sampled_from(sorted(self.holds)))
        placed = self.attempt(lambda: self.reg.create(client, size, key=key, lease_ms=lease))
        if isinstance(placed, Placed):
            self.created.add(placed.id)
        self.placed(placed, client)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), size=SIZES, key=KEYS, lease=LEASES, kind=st.sampled_from(PUT_KINDS))
    def put(
        self, data: st.DataObject, size: int, key: str | None, lease: int | None, kind: str
    ) -> None:
        pooled, keep = kind != "fresh", kind == "kept"
        client = data.draw(st.sampled_from(sorted(self.holds)))
        placed = self.attempt(
            lambda: self.reg.put(client, size, key=key, lease_ms=lease, pooled=pooled, keep=keep)
        )
        if isinstance(placed, Placed):
            self.sealed.add(placed.id)
            if pooled:
                self.pooled.add(placed.id)
                if keep:
                    self.kept[placed.id] = client
        self.placed(placed, client)

    @precondition(lambda self: self.holds and self.ids)
    @rule(data=st.data())
    def seal(self, data: st.DataObject) -> None:
        client = data.draw(st.sampled_from(sorted(self.holds)))
        blob_id = data.draw(st.sampled_from(self.ids))
        actions = self.attempt(lambda: self.reg.seal(client, blob_id))
        if isinstance(actions, list):
            self.sealed.add(blob_id)
            self.apply(actions)

    @precondition(lambda self: self.holds and self.ids)
    @rule(data=st.data(), served=st.booleans())
    def get(self, data: st.DataObject, served: bool) -> None:
        client = data.draw(st.sampled_from(sorted(self.holds)))
        target = data.draw(st.sampled_from(self.ids) | NAMES)
        result = self.attempt(lambda: self.reg.get(client, target, served=served))
        if isinstance(result, Ready):
            self.holds[client][result.info.id] += 1
            assert result.info.id in self.sealed
            # Served over Flight, the reader never held the memory.
            if result.info.pooled and client in self.token_holders and not served:
                self.disclosed.add(result.info.id)
        elif isinstance(result, Pending):
            assert result.id in self.created
            assert result.id not in self.sealed

    @precondition(lambda self: any(+held for held in self.holds.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        holders = sorted(client for client, held in self.holds.items() if +held)
        client = data.draw(st.sampled_from(holders))
        # In the order of creation: blob ids are random, so sorting them by value would
        # give hypothesis another order each time it replays the same choices.
        blob_id = data.draw(st.sampled_from(sorted(+self.holds[client], key=self.ids.index)))
        self.holds[client][blob_id] -= 1
        self.apply(self.reg.release(client, blob_id))

    @precondition(lambda self: self.holds and self.ids)
    @rule(data=st.data())
    def release_wrongly(self, data: st.DataObject) -> None:
        client = data.draw(st.sampled_from(sorted(self.holds)))
        blob_id = data.draw(st.sampled_from(self.ids))
        if not self.holds[client][blob_id]:
            self.attempt(lambda: self.reg.release(client, blob_id))

    @precondition(lambda self: self.holds and self.ids)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        client = data.draw(st.sampled_from(sorted(self.holds)))
        target = data.draw(st.sampled_from(self.ids) | NAMES)
        actions = self.attempt(lambda: self.reg.delete(client, target))
        if isinstance(actions, list):
            self.apply(actions)

    @precondition(lambda self: self.holds and self.ids)
    @rule(data=st.data(), lease=LEASES)
    def renew(self, data: st.DataObject, lease: int | None) -> None:
        client = data.draw(st.sampled_from(sorted(self.holds)))
        blob_id = data.draw(st.sampled_from(self.ids))
        self.attempt(lambda: self.reg.renew(client, blob_id, lease))

    @rule(ms=st.integers(0, 3000))
    def tick(self, ms: int) -> None:
        self.clock.advance(ms / 1000)

    @rule()
    def expire(self) -> None:
        self.apply(self.reg.expire())

    # -- what must always hold --------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        blobs = self.reg.list(include_deleted=True)
        stats = self.reg.stats()
        assert {info.id for info in blobs} == set(self.fds)
        assert stats.bytes == sum(info.charge for info in blobs)
        assert stats.pooled_bytes == sum(info.charge for info in blobs if info.pooled)
        assert stats.bytes <= self.LIMIT
        held: Counter[BlobId] = Counter()
        for counts in self.holds.values():
            held.update(counts)
        assert stats.references == sum(held.values())
        for info in blobs:
            assert info.references == held[info.id]
            assert info.pooled == (info.id in self.pooled)
        for account in stats.accounts:
            mine = [info for info in blobs if info.account == account.name]
            assert account.bytes == sum(info.charge for info in mine)
            assert account.blobs == len(mine)
            assert account.max_bytes is None or account.bytes <= account.max_bytes
        keys = [info.key for info in self.reg.list() if info.key is not None]
        assert len(keys) == len(set(keys))
        assert stats.clients == len(self.holds)

    def teardown(self) -> None:
        for client in sorted(self.holds):
            del self.holds[client]
            self.apply(self.reg.disconnect(client))
        admin = self.next_client
        self.reg.connect(admin)
        self.holds[admin] = Counter()
        for info in self.reg.list():
            self.apply(self.reg.delete(admin, info.id))
        del self.holds[admin]
        self.apply(self.reg.disconnect(admin))
        stats = self.reg.stats()
        assert (stats.blobs, stats.bytes, stats.pooled_bytes, stats.references) == (0, 0, 0, 0)
        assert stats.accounts == ()
        assert self.fds == {}
        assert self.reg.next_deadline() is None


RegistryMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
test_registry_machine = RegistryMachine.TestCase


def test_a_kept_pooled_blob_outlives_its_producer_and_is_evicted_like_any(clock: Clock) -> None:
    reg = registry(clock, memory_limit=200, evict=True)
    kept = published(reg, 100, "kept", pooled=True, keep=True)
    gone = published(reg, 50, "gone", pooled=True)
    unsealable = published(reg, 20, "unsealable", pooled=True, keep=True)
    assert (reg.stats().pooled, reg.stats().pooled_bytes) == (3, 170)
    assert reg.kept_by(PRODUCER) == [kept, unsealable]
    # The server sealed one against writes; the other, someone still maps writable.
    assert reg.disconnect(PRODUCER, {kept}) == [
        Evicted(gone, "gone", 50, EvictReason.PRODUCER_GONE),
        FreeBlob(gone),
        Evicted(unsealable, "unsealable", 20, EvictReason.PRODUCER_GONE),
        FreeBlob(unsealable),
    ]
    info = ready(reg, CONSUMER, "kept").info
    assert (info.pooled, info.owner) == (False, None)  # the broker's now, still published
    assert (reg.stats().pooled, reg.stats().pooled_bytes, reg.stats().bytes) == (0, 0, 100)
    reg.release(CONSUMER, kept)
    # Idle, it makes room as any sealed blob does (no producer left to notify).
    reg.connect(PRODUCER)
    placed = reg.put(PRODUCER, 150)
    assert placed.actions == [Evicted(kept, "kept", 100, EvictReason.MEMORY), FreeBlob(kept)]


def test_an_idle_kept_slot_is_evicted_back_to_its_live_producer(clock: Clock) -> None:
    reg = registry(clock, memory_limit=200, evict=True)
    kept = published(reg, 100, "kept", pooled=True, keep=True)
    placed = reg.put(CONSUMER, 150)
    assert placed.actions == [
        Evicted(kept, "kept", 100, EvictReason.MEMORY),
        FreeBlob(kept),
        NotifyProducer(PRODUCER, kept),
    ]


def spilling_kept_slot(clock: Clock) -> tuple[BlobRegistry, BlobId]:
    """A kept slot whose spill the server is writing (it holds the slot's fd for that)."""
    reg = BlobRegistry(memory_limit=200, spill=True, clock=clock)
    for client in (PRODUCER, CONSUMER, OTHER):
        reg.connect(client)
    kept = published(reg, 100, "kept", pooled=True, keep=True)
    assert Spill(kept, 100) in reg.put(OTHER, 150).actions
    return reg, kept


def test_a_kept_slot_being_spilled_is_sealed_or_withdrawn_when_its_producer_goes(
    clock: Clock,
) -> None:
    # Not sealed (the seal went through the spill's fd, and the kernel refused it):
    # withdrawn, so that a failed write cannot put the writable slot back in service.
    reg, kept = spilling_kept_slot(clock)
    assert reg.kept_by(PRODUCER) == [kept]
    actions = reg.disconnect(PRODUCER, set())
    assert Evicted(kept, "kept", 100, EvictReason.PRODUCER_GONE) in actions
    with pytest.raises(BlobNotFound):
        reg.spill_failed(kept)
    # Sealed: the broker's, on disk, with nobody to give the slot back to.
    reg, kept = spilling_kept_slot(clock)
    assert reg.disconnect(PRODUCER, {kept}) == []
    assert reg.spill_written(kept) == []
    assert reg.info(kept).pooled is False


def test_a_kept_slot_restored_while_its_spill_was_written_is_withdrawn_unsealed(
    clock: Clock,
) -> None:
    reg, kept = spilling_kept_slot(clock)
    reg.restore(kept)  # a get came while the write was under way
    assert reg.kept_by(PRODUCER) == [kept]
    reg.disconnect(PRODUCER, set())
    with pytest.raises(BlobNotFound):
        reg.restored(kept)


def test_slots_kept_past_a_connection_are_bounded_per_connection(clock: Clock) -> None:
    reg = registry(clock)
    for _ in range(MAX_KEPT_PER_CLIENT):
        published(reg, 1, pooled=True, keep=True)
    with pytest.raises(BrokerLimitReached):
        reg.put(PRODUCER, 1, pooled=True, keep=True)
    published(reg, 1, pooled=True)  # without keep: withdrawn with the connection
    assert len(reg.kept_by(PRODUCER)) == MAX_KEPT_PER_CLIENT
