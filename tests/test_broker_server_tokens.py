"""Tokens over the wire (--require-token) and quotas (--memory-limit, --max-bytes, --evict)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from blobplane.broker.tokens import TokenAuthority, generate_key, load_key
from blobplane.client import connect_broker
from blobplane.errors import (
    ClientQuotaExceeded,
    MemoryLimitExceeded,
    RightMissing,
    TokenExpired,
    TokenRefused,
)
from brokers import Broker, running_broker

pytestmark = pytest.mark.timeout(60)

KIB = 1024


@pytest.fixture(scope="module")
def guarded() -> Iterator[Broker]:
    with running_broker("--require-token") as broker:
        yield broker


def authority(broker: Broker, *, clock_offset: float = 0.0) -> TokenAuthority:
    return TokenAuthority(load_key(broker.key_path), clock=lambda: time.time() + clock_offset)


def _tamper(token: str) -> str:
    """Flip one character of the claims: the signature no longer matches."""
    prefix, claims, mac = token.split(".")
    flipped = "A" if claims[5] != "A" else "B"
    return f"{prefix}.{claims[:5]}{flipped}{claims[6:]}.{mac}"


def test_without_a_token_the_connection_is_refused(guarded: Broker) -> None:
    with pytest.raises(TokenRefused, match="requires a token"):
        connect_broker(guarded.socket_path)
    assert re.search(r"event=client\.refused .*error=TokenRefused", guarded.log())


@pytest.mark.parametrize(
    "forge",
    [
        lambda good: "not-a-token",
        lambda good: "bp1.AAAA.BBBB",
        lambda good: good[:-2],
        _tamper,
        lambda good: TokenAuthority(generate_key()).mint("all", ttl=60),  # another broker's key
        lambda good: "bp1.\u00e9t\u00e9.x",
        lambda good: "bp1." + "A" * 5000,
    ],
    ids=["garbage", "made up", "cut", "altered claims", "other key", "not ascii", "huge"],
)
def test_forged_and_altered_tokens_are_refused(guarded: Broker, forge: object) -> None:
    good = authority(guarded).mint("all", ttl=60)
    assert callable(forge)
    with pytest.raises(TokenRefused):
        connect_broker(guarded.socket_path, token=forge(good))
    with connect_broker(guarded.socket_path, token=good) as fine:
        assert fine.stats().token_required


def test_an_expired_token_is_refused(guarded: Broker) -> None:
    expired = authority(guarded, clock_offset=-7200).mint("all", ttl=3600)
    with pytest.raises(TokenExpired, match="expired"):
        connect_broker(guarded.socket_path, token=expired)


def test_a_token_grants_exactly_its_rights(guarded: Broker) -> None:
    minter = authority(guarded)
    with connect_broker(guarded.socket_path, token=minter.mint("put,delete", ttl=60)) as writer:
        assert writer.welcome.rights == ("delete", "put")
        entry = writer.put_bytes(b"published", key="rights")
        with pytest.raises(RightMissing, match="'get'"):
            writer.get("rights")
        with pytest.raises(RightMissing, match="'create'"):
            writer.create(10)
        with pytest.raises(RightMissing):
            writer.stats()
        with connect_broker(guarded.socket_path, token=minter.mint("get", ttl=60)) as reader:
            with reader.get("rights") as mapped:
                assert bytes(mapped.as_slice()) == b"published"
            with pytest.raises(RightMissing):
                reader.delete("rights")
            with pytest.raises(RightMissing):
                reader.put_bytes(b"no")
        writer.delete(entry.blob_id)


def test_a_per_blob_token_over_a_guarded_broker(guarded: Broker) -> None:
    with connect_broker(guarded.socket_path, token=authority(guarded).mint("all", ttl=60)) as owner:
        entry = owner.put_bytes(b"one blob", key="handed over")
        token = owner.mint_read_token("handed over", ttl=60)
        with connect_broker(guarded.socket_path, token=token) as sandbox:
            with sandbox.get("handed over") as mapped:
                assert bytes(mapped.as_slice()) == b"one blob"
            with pytest.raises(RightMissing):
                sandbox.mint_read_token("handed over")
        owner.delete(entry.blob_id)


def test_max_bytes_is_shared_by_the_connections_of_one_token(guarded: Broker) -> None:
    token = authority(guarded).mint("all", ttl=60, max_bytes=100 * KIB)
    with (
        connect_broker(guarded.socket_path, token=token) as first,
        connect_broker(guarded.socket_path, token=token) as second,
    ):
        kept = first.put_bytes(bytes(60 * KIB))
        with pytest.raises(ClientQuotaExceeded, match="quota"):
            second.put_bytes(bytes(60 * KIB))
        with pytest.raises(ClientQuotaExceeded, match="can never fit"):
            second.create(200 * KIB)
        first.delete(kept.blob_id)
        second.delete(second.put_bytes(bytes(60 * KIB)).blob_id)


# -- the global memory limit ---------------------------------------------------------------------


def test_a_full_broker_refuses_without_evict() -> None:
    with (
        running_broker("--memory-limit", "100KiB") as broker,
        connect_broker(broker.socket_path) as client,
    ):
        first = client.put_bytes(bytes(60 * KIB), key="first")
        with pytest.raises(MemoryLimitExceeded, match="--evict"):
            client.put_bytes(bytes(60 * KIB), key="second")
        with pytest.raises(MemoryLimitExceeded, match="can never fit"):
            client.create(200 * KIB)
        stats = client.stats()
        assert stats.bytes == 60 * KIB
        assert stats.evictions == 0
        with client.get("first") as mapped:  # untouched
            assert len(mapped) == 60 * KIB
        client.delete(first.blob_id)


def test_evict_takes_the_least_recently_used_idle_blobs() -> None:
    with (
        running_broker("--memory-limit", "100KiB", "--evict") as broker,
        connect_broker(broker.socket_path) as client,
    ):
        client.put_bytes(bytes(40 * KIB), key="old")
        client.put_bytes(bytes(40 * KIB), key="held")
        reading = client.get("held")  # referenced: never evicted
        client.put_bytes(bytes(40 * KIB), key="new")  # evicts "old"
        assert {e.key for e in client.list()} == {"held", "new"}
        assert re.search(r"event=blob\.evicted .*key=old .*reason=memory-pressure", broker.log())
        client.put_bytes(bytes(40 * KIB), key="newer")  # evicts "new", not the held one
        assert {e.key for e in client.list()} == {"held", "newer"}
        with pytest.raises(MemoryLimitExceeded, match="even after evicting"):
            client.put_bytes(bytes(70 * KIB), key="too big while one is held")
        assert client.stats().evictions == 2
        assert len(reading.as_slice()) == 40 * KIB
        reading.close()
        client.delete("held")
        client.delete("newer")
