"""A token minted by a token's bearer never outlives that token; a lapsed bearer mints nothing."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from blobplane import channel
from blobplane.broker import protocol
from blobplane.broker.protocol import Hello, MintToken, Refused, TokenReply, Welcome
from blobplane.broker.tokens import TokenAuthority, load_key
from blobplane.client import connect_broker
from blobplane.errors import ConnectionClosed, RightMissing, TokenExpired
from blobplane.wire import UserPayload
from brokers import Broker, running_broker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def guarded() -> Iterator[Broker]:
    with running_broker("--require-token") as broker:
        yield broker


@pytest.fixture(scope="module")
def open_broker() -> Iterator[Broker]:
    with running_broker() as broker:
        yield broker


@pytest.fixture
def settled(guarded: Broker) -> Iterator[None]:
    """The broker holds no fd more after the case than before it."""
    before = guarded.fds()
    yield
    wait_until(lambda: guarded.fds() == before, "the broker's fds to come back")
    assert guarded.alive()


def authority(broker: Broker, clock_offset: float = 0.0) -> TokenAuthority:
    return TokenAuthority(load_key(broker.key_path), clock=lambda: time.time() + clock_offset)


def expiry(broker: Broker, token: str) -> float | None:
    """When *token* expires, read as of 1970 (so that an expired one reads too)."""
    return TokenAuthority(load_key(broker.key_path), clock=lambda: 0.0).verify(token).expires_at


@pytest.fixture
def blob_key(guarded: Broker) -> Iterator[str]:
    key = f"minted-{uuid.uuid4().hex}"
    with connect_broker(guarded.socket_path, token=authority(guarded).mint("all", ttl=60)) as admin:
        entry = admin.put_bytes(b"handed on", key=key)
        yield key
        admin.delete(entry.blob_id)


@pytest.mark.parametrize("asked", [None, 3600.0, 1e9], ids=["no ttl", "an hour", "decades"])
def test_a_minted_token_expires_with_its_minters(
    guarded: Broker, settled: None, blob_key: str, asked: float | None
) -> None:
    minter_token = authority(guarded).mint("get", ttl=30)
    minter_expiry = expiry(guarded, minter_token)
    with connect_broker(guarded.socket_path, token=minter_token) as minter:
        handed = minter.mint_read_token(blob_key, ttl=asked)
    assert expiry(guarded, handed) == minter_expiry


def test_a_shorter_ttl_than_the_minters_is_kept(
    guarded: Broker, settled: None, blob_key: str
) -> None:
    minter_token = authority(guarded).mint("get", ttl=3600)
    with connect_broker(guarded.socket_path, token=minter_token) as minter:
        handed = minter.mint_read_token(blob_key, ttl=5)
    handed_expiry, minter_expiry = expiry(guarded, handed), expiry(guarded, minter_token)
    assert handed_expiry is not None
    assert minter_expiry is not None
    assert handed_expiry < minter_expiry
    assert handed_expiry == pytest.approx(time.time() + 5, abs=2)


def test_a_minter_whose_token_never_expires_may_mint_one_that_never_expires(
    guarded: Broker, settled: None, blob_key: str
) -> None:
    with connect_broker(guarded.socket_path, token=authority(guarded).mint("get", ttl=None)) as m:
        assert expiry(guarded, m.mint_read_token(blob_key)) is None
        assert expiry(guarded, m.mint_read_token(blob_key, ttl=60)) is not None


def test_a_connection_without_a_token_has_no_cap(open_broker: Broker) -> None:
    with connect_broker(open_broker.socket_path) as client:
        entry = client.put_bytes(b"free", key="uncapped")
        assert expiry(open_broker, client.mint_read_token("uncapped")) is None
        client.delete(entry.blob_id)


def test_a_bearer_whose_token_expired_mints_nothing_and_what_it_minted_lapses_too(
    guarded: Broker, settled: None, blob_key: str
) -> None:
    # A token with about 1.5 s left, minted as if 58.5 s ago with a ttl of a minute.
    minter_token = authority(guarded, clock_offset=-58.5).mint("get", ttl=60)
    minter_expiry = expiry(guarded, minter_token)
    assert minter_expiry is not None
    with connect_broker(guarded.socket_path, token=minter_token) as minter:
        handed = minter.mint_read_token(blob_key, ttl=3600)
        assert expiry(guarded, handed) == minter_expiry
        with (
            connect_broker(guarded.socket_path, token=handed) as reader,  # valid for now
            reader.get(blob_key) as mapped,
        ):
            assert bytes(mapped.as_slice()) == b"handed on"
        time.sleep(max(0.0, minter_expiry - time.time()) + 0.2)
        with pytest.raises(TokenExpired, match="expired"):
            minter.mint_read_token(blob_key, ttl=60)
        with pytest.raises(ConnectionClosed):  # refused once, then closed
            minter.mint_read_token(blob_key)
    with pytest.raises(TokenExpired):
        connect_broker(guarded.socket_path, token=handed)
    with pytest.raises(TokenExpired):
        connect_broker(guarded.socket_path, token=minter_token)


def test_a_raw_mint_of_the_longest_ttl_is_capped_too(
    guarded: Broker, settled: None, blob_key: str
) -> None:
    """The cap is the broker's: a client that frames MintToken itself gets no more."""
    minter_token = authority(guarded).mint("get", ttl=30)
    raw = channel.connect(guarded.socket_path, timeout=10)
    try:
        replies = []
        for request in (
            Hello(rid=1, token=minter_token),
            MintToken(rid=2, key=blob_key, ttl_ms=2**53),
            MintToken(rid=3, key=blob_key),
        ):
            raw.send(UserPayload(data=protocol.encode(request)))
            message, fds = raw.recv(timeout=10)
            for fd in fds:
                os.close(fd)
            assert isinstance(message, UserPayload)
            replies.append(protocol.decode_reply(message.data))
    finally:
        raw.close()
    welcome, longest, unbounded = replies
    assert isinstance(welcome, Welcome), welcome
    for reply in (longest, unbounded):
        assert isinstance(reply, TokenReply), reply
        assert not isinstance(reply, Refused)
        assert expiry(guarded, reply.token) == expiry(guarded, minter_token)


def test_a_per_blob_bearer_still_cannot_mint(guarded: Broker, settled: None, blob_key: str) -> None:
    with connect_broker(guarded.socket_path, token=authority(guarded).mint("get", ttl=30)) as m:
        handed = m.mint_read_token(blob_key, ttl=30)
    with (
        connect_broker(guarded.socket_path, token=handed) as sandbox,
        pytest.raises(RightMissing, match="cannot hand the blob on"),
    ):
        sandbox.mint_read_token(blob_key, ttl=1)
