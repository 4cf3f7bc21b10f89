"""A token's bearer owns what it placed: any connection presenting the same token may delete
and renew it, later ones included; nobody else may without the right.

The registry cases drive the pure `BlobRegistry`; the command-line cases run `blobplane put`
and `blobplane rm` as separate processes (each its own connection) against a real broker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from blobplane.broker import BlobRegistry, FreeBlob, Grant, Right
from blobplane.broker.tokens import TokenAuthority, load_key
from blobplane.client import connect_broker
from blobplane.errors import NotOwner, RightMissing
from brokers import Broker, cli_error, cli_ok, run_cli, running_broker, wait_until

pytestmark = pytest.mark.timeout(60)

FIRST, SECOND, THIRD = 1, 2, 3
PUT_ONLY = frozenset({Right.PUT})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reg() -> BlobRegistry:
    return BlobRegistry(clock=Clock())


def token_grant(account: str, rights: frozenset[Right] = PUT_ONLY) -> Grant:
    return Grant(rights=rights, account=account)


# -- the registry ---------------------------------------------------------------------------------


def test_a_later_connection_with_the_same_token_deletes_and_renews_what_it_put(
    reg: BlobRegistry,
) -> None:
    reg.connect(FIRST, token_grant("token:a"))
    kept = reg.put(FIRST, 10, key="kept", lease_ms=1000).id
    gone = reg.put(FIRST, 10, key="gone").id
    assert reg.disconnect(FIRST) == []  # sealed blobs outlive their connection
    reg.connect(SECOND, token_grant("token:a"))
    assert reg.renew(SECOND, "kept", 5000).lease_ms == 5000
    assert reg.delete(SECOND, gone) == [FreeBlob(gone)]
    assert reg.delete(SECOND, kept) == [FreeBlob(kept)]
    assert reg.list() == []


def test_connections_of_one_token_at_once_own_each_others_blobs(reg: BlobRegistry) -> None:
    reg.connect(FIRST, token_grant("token:a"))
    reg.connect(SECOND, token_grant("token:a"))
    mine = reg.put(FIRST, 10).id
    theirs = reg.put(SECOND, 10).id
    assert reg.delete(SECOND, mine) == [FreeBlob(mine)]
    assert reg.delete(FIRST, theirs) == [FreeBlob(theirs)]


def test_another_token_may_not_delete_or_renew_without_the_right(reg: BlobRegistry) -> None:
    reg.connect(FIRST, token_grant("token:a"))
    blob_id = reg.put(FIRST, 10, key="a's", lease_ms=1000).id
    reg.connect(SECOND, token_grant("token:b"))
    with pytest.raises(RightMissing, match="only delete the blobs it created"):
        reg.delete(SECOND, blob_id)
    with pytest.raises(RightMissing, match="only renew the blobs it created"):
        reg.renew(SECOND, "a's", 5000)
    assert reg.info(blob_id).lease_ms == 1000
    assert [info.id for info in reg.list()] == [blob_id]


def test_connections_without_a_token_never_share_what_they_own(reg: BlobRegistry) -> None:
    # Each of them gets an account of its own ("client:<id>"); a new connection,
    # even one that could guess that name, takes none of it over.
    reg.connect(FIRST, Grant(rights=PUT_ONLY))
    blob_id = reg.put(FIRST, 10, key="anon").id
    assert reg.info(blob_id).account == f"client:{FIRST}"
    reg.disconnect(FIRST)
    reg.connect(SECOND, Grant(rights=PUT_ONLY))
    with pytest.raises(RightMissing, match="only delete"):
        reg.delete(SECOND, blob_id)
    with pytest.raises(RightMissing, match="only renew"):
        reg.renew(SECOND, blob_id, 10)
    reg.connect(THIRD, Grant(rights=PUT_ONLY, account=None))
    with pytest.raises(RightMissing):
        reg.delete(THIRD, "anon")


def test_a_connection_without_a_token_still_owns_what_it_placed(reg: BlobRegistry) -> None:
    reg.connect(FIRST, Grant(rights=frozenset({Right.PUT, Right.CREATE})))
    put = reg.put(FIRST, 10).id
    created = reg.create(FIRST, 10, lease_ms=100).id
    reg.renew(FIRST, created, 1000)
    assert reg.delete(FIRST, put) == [FreeBlob(put)]
    reg.delete(FIRST, created)


def test_a_per_blob_grant_owns_nothing_even_with_a_matching_account(reg: BlobRegistry) -> None:
    reg.connect(FIRST, token_grant("token:a"))
    blob_id = reg.put(FIRST, 10).id
    # Not something a token yields (a per-blob token has an account of its own), but
    # a grant bound to one blob must never delete or renew, whatever its account.
    reg.connect(SECOND, Grant(rights=frozenset({Right.GET}), blob=blob_id, account="token:a"))
    with pytest.raises(RightMissing, match="grants a get of blob"):
        reg.delete(SECOND, blob_id)
    with pytest.raises(RightMissing, match="grants a get of blob"):
        reg.renew(SECOND, blob_id, 10)


def test_only_the_connection_that_created_a_blob_seals_it(reg: BlobRegistry) -> None:
    create = frozenset({Right.CREATE})
    reg.connect(FIRST, token_grant("token:a", create))
    reg.connect(SECOND, token_grant("token:a", create))
    blob_id = reg.create(FIRST, 10).id
    with pytest.raises(NotOwner, match="only its creator can seal it"):
        reg.check_seal(SECOND, blob_id)
    with pytest.raises(NotOwner):
        reg.discard(SECOND, blob_id)
    assert reg.seal(FIRST, blob_id)


def test_ownership_through_the_account_ends_with_the_blob(reg: BlobRegistry) -> None:
    reg.connect(FIRST, token_grant("token:a"))
    blob_id = reg.put(FIRST, 10).id
    reg.disconnect(FIRST)
    reg.connect(SECOND, token_grant("token:a"))
    reg.delete(SECOND, blob_id)
    reg.disconnect(SECOND)
    assert reg.stats().accounts == ()  # the account went with its last blob and connection


# -- over the wire ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[Broker]:
    with running_broker("--require-token") as broker:
        yield broker


def mint(broker: Broker, rights: str) -> str:
    return TokenAuthority(load_key(broker.key_path)).mint(rights, ttl=60)


def keys(broker: Broker) -> set[str | None]:
    with connect_broker(broker.socket_path, token=mint(broker, "list")) as looker:
        return {entry.key for entry in looker.list()}


def test_put_then_rm_from_the_command_line_with_the_same_token(guarded: Broker) -> None:
    before = guarded.fds()
    at = {"BLOBPLANE_BROKER": guarded.socket_path}
    mine = mint(guarded, "put")  # no delete right: ownership alone allows the rm
    theirs = mint(guarded, "put")
    cli_ok(run_cli("put", "-", "--key", "own-a", env={**at, "BLOBPLANE_TOKEN": mine}, stdin=b"a"))
    cli_ok(run_cli("put", "-", "--key", "own-b", env={**at, "BLOBPLANE_TOKEN": theirs}, stdin=b"b"))

    refused = cli_error(run_cli("rm", "own-a", env={**at, "BLOBPLANE_TOKEN": theirs}))
    assert "'delete'" in refused
    assert "only delete the blobs it created" in refused
    assert {"own-a", "own-b"} <= keys(guarded)

    cli_ok(run_cli("rm", "own-a", env={**at, "BLOBPLANE_TOKEN": mine}))
    cli_ok(run_cli("rm", "own-b", "--token", theirs, env=at))
    assert not {"own-a", "own-b"} & keys(guarded)
    wait_until(lambda: guarded.fds() == before, "the broker's fds to come back")


def test_a_reconnect_with_the_same_token_renews_and_deletes(guarded: Broker) -> None:
    before = guarded.fds()
    token = mint(guarded, "put")
    with connect_broker(guarded.socket_path, token=token) as first:
        entry = first.put_bytes(b"x" * 100, key="renewed", lease_ms=60_000)
    with connect_broker(guarded.socket_path, token=mint(guarded, "put")) as stranger:
        with pytest.raises(RightMissing, match="'renew'"):
            stranger.renew("renewed", None)
        with pytest.raises(RightMissing, match="'delete'"):
            stranger.delete(entry.blob_id)
    with connect_broker(guarded.socket_path, token=token) as again:
        assert again.renew("renewed", None).expires_in_ms is None
        again.delete("renewed")
    assert "renewed" not in keys(guarded)
    wait_until(lambda: guarded.fds() == before, "the broker's fds to come back")


def test_ls_shows_whose_account_a_blob_is(guarded: Broker) -> None:
    token = mint(guarded, "put,list")
    at = {"BLOBPLANE_BROKER": guarded.socket_path, "BLOBPLANE_TOKEN": token}
    cli_ok(run_cli("put", "-", "--key", "accounted", env=at, stdin=b"z"))
    (entry,) = [
        e for e in json.loads(cli_ok(run_cli("ls", "--json", env=at))) if e["key"] == "accounted"
    ]
    claims = TokenAuthority(load_key(guarded.key_path)).verify(token)
    assert entry["account"] == f"token:{claims.id}"
    assert entry["owner"] is None  # the connection that put it is gone; its token is not
    cli_ok(run_cli("rm", "accounted", env=at))
