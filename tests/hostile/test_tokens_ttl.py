"""A token's ttl is a positive time wherever it enters, and however short it never means forever.

The entries: `TokenAuthority.mint`, the client's `mint_read_token`, the `MintToken` request as
a hostile client frames it itself, and `blobplane token create --ttl`.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import msgspec
import pytest

from blobplane import channel
from blobplane.broker import protocol
from blobplane.broker.protocol import Hello, MintToken, Refused, Reply, TokenReply
from blobplane.broker.tokens import TokenAuthority, generate_key, load_key
from blobplane.client import BrokerClient, connect_broker, connect_broker_async
from blobplane.errors import ConnectionClosed, InvalidSize, PeerRefused, TokenExpired
from blobplane.types import BlobId
from blobplane.wire import ErrorReply, UserPayload
from brokers import Broker, run_cli, running_broker, wait_until

pytestmark = pytest.mark.timeout(60)

BAD_TTLS: list[object] = [0, 0.0, -0.0, -1, -0.0004, -1e9, math.inf, -math.inf, math.nan, True]


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker() as running:
        yield running


@pytest.fixture
def owner(broker: Broker) -> Iterator[BrokerClient]:
    """A client with a blob to hand on; the broker's fds come back to where they were."""
    before = broker.fds()
    with connect_broker(broker.socket_path, name="owner") as client:
        entry = client.put_bytes(b"payload", key=f"ttl-{uuid.uuid4().hex}")
        yield client
        client.delete(entry.blob_id)
    wait_until(lambda: broker.fds() == before, "the broker's fds to come back")
    assert broker.alive()


def the_key(client: BrokerClient) -> str:
    (entry,) = [e for e in client.list() if e.key is not None and e.key.startswith("ttl-")]
    assert entry.key is not None
    return entry.key


def claims_of(broker: Broker, token: str) -> tuple[float, float | None]:
    """When *token* was issued and when it expires (read as of 1970: whatever it says, it holds)."""
    claims = TokenAuthority(load_key(broker.key_path), clock=lambda: 0.0).verify(token)
    return claims.issued_at, claims.expires_at


# -- TokenAuthority.mint --------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [*BAD_TTLS, "60", b"60"], ids=repr)
def test_the_authority_refuses_a_ttl_that_is_not_a_positive_time(ttl: object) -> None:
    authority = TokenAuthority(generate_key())
    with pytest.raises(InvalidSize, match="positive number of seconds"):
        authority.mint("get", ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidSize, match="positive number of seconds"):
        authority.mint_for_blob(BlobId.new(), ttl=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [1e-9, 1e-6, 0.0004])
def test_a_sub_millisecond_ttl_expires_rather_than_never(ttl: float) -> None:
    now = [1_800_000_000.0]
    authority = TokenAuthority(generate_key(), clock=lambda: now[0])
    token = authority.mint("get", ttl=ttl)
    try:
        expires_at = authority.verify(token).expires_at
    except TokenExpired:
        expires_at = now[0]  # so short that it is over as soon as it is made
    assert expires_at is not None
    assert expires_at <= now[0] + 0.001
    now[0] += 0.001
    with pytest.raises(TokenExpired):
        authority.verify(token)


# -- the client ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [*BAD_TTLS, "60"], ids=repr)
def test_mint_read_token_refuses_a_ttl_that_is_not_a_positive_time(
    broker: Broker, owner: BrokerClient, ttl: object
) -> None:
    minted_before = broker.log().count("event=token.minted")
    with pytest.raises(InvalidSize, match="positive number of seconds"):
        owner.mint_read_token(the_key(owner), ttl=ttl)  # type: ignore[arg-type]
    assert owner.stats().clients >= 1  # the connection carries on
    assert broker.log().count("event=token.minted") == minted_before


def test_mint_read_token_refuses_a_ttl_longer_than_the_wire_takes(owner: BrokerClient) -> None:
    with pytest.raises(InvalidSize, match="None for a token that does not expire"):
        owner.mint_read_token(the_key(owner), ttl=1e300)


@pytest.mark.parametrize("ttl", [1e-9, 0.0001, 0.0004])
def test_a_sub_millisecond_ttl_becomes_one_millisecond(
    broker: Broker, owner: BrokerClient, ttl: float
) -> None:
    token = owner.mint_read_token(the_key(owner), ttl=ttl)
    issued_at, expires_at = claims_of(broker, token)
    assert expires_at is not None
    assert expires_at - issued_at == pytest.approx(0.001, abs=1e-6)
    time.sleep(0.01)
    with pytest.raises(TokenExpired):
        connect_broker(broker.socket_path, token=token)


def test_a_ttl_is_kept_to_the_millisecond(broker: Broker, owner: BrokerClient) -> None:
    token = owner.mint_read_token(the_key(owner), ttl=1.5)
    issued_at, expires_at = claims_of(broker, token)
    assert expires_at is not None
    assert expires_at - issued_at == pytest.approx(1.5, abs=1e-6)


def test_the_async_client_refuses_zero_too(broker: Broker, owner: BrokerClient) -> None:
    key = the_key(owner)

    async def scenario() -> str:
        async with await connect_broker_async(broker.socket_path) as client:
            for ttl in (0, -1, 0.0):
                with pytest.raises(InvalidSize, match="positive number of seconds"):
                    await client.mint_read_token(key, ttl=ttl)
            return await client.mint_read_token(key, ttl=0.0002)

    token = asyncio.run(scenario())
    assert claims_of(broker, token)[1] is not None


# -- a hostile client's own frames ----------------------------------------------------------------


class Raw:
    """A connection that says hello properly, then frames whatever it is told to."""

    def __init__(self, path: str) -> None:
        self.channel = channel.connect(path, timeout=10)
        welcome = self.call(protocol.encode(Hello(rid=1)))
        assert isinstance(welcome, protocol.Welcome)

    def call(self, data: bytes) -> Reply:
        self.channel.send(UserPayload(data=data))
        message, fds = self.channel.recv(timeout=10)
        for fd in fds:
            os.close(fd)
        if isinstance(message, ErrorReply):
            raise PeerRefused(message.message, code=message.code)
        assert isinstance(message, UserPayload)
        return protocol.decode_reply(message.data)

    def close(self) -> None:
        self.channel.close()


def mint_frame(key: str, ttl_ms: object) -> bytes:
    """A MintToken as msgpack, with whatever *ttl_ms* (no client would send most of these)."""
    return msgspec.msgpack.encode({"op": "mint", "rid": 2, "key": key, "ttl_ms": ttl_ms})


@pytest.mark.parametrize(
    "ttl_ms",
    [0, -1, -1000, -(2**63), 2**53 + 1, 2**64 - 1, 0.0, 0.5, -0.5, 1.5, "1000", True, False],
    ids=repr,
)
def test_a_raw_mint_with_a_ttl_that_is_not_a_positive_time_is_refused(
    broker: Broker, owner: BrokerClient, ttl_ms: object
) -> None:
    minted_before = broker.log().count("event=token.minted")
    raw = Raw(broker.socket_path)
    try:
        reply = raw.call(mint_frame(the_key(owner), ttl_ms))
        assert isinstance(reply, Refused), reply
        assert (reply.rid, reply.error) == (0, "RemoteProtocolError")
        assert "ttl_ms" in reply.message
        with pytest.raises((ConnectionClosed, PeerRefused)):
            raw.call(protocol.encode(protocol.Stats(rid=3)))  # it was hung up on
    finally:
        raw.close()
    assert broker.log().count("event=token.minted") == minted_before
    with connect_broker(broker.socket_path) as fine:  # everyone else is served
        assert fine.stats().clients >= 1


def test_a_raw_mint_of_one_millisecond_is_the_shortest_token(
    broker: Broker, owner: BrokerClient
) -> None:
    raw = Raw(broker.socket_path)
    try:
        reply = raw.call(protocol.encode(MintToken(rid=2, key=the_key(owner), ttl_ms=1)))
    finally:
        raw.close()
    assert isinstance(reply, TokenReply), reply
    issued_at, expires_at = claims_of(broker, reply.token)
    assert expires_at is not None
    assert expires_at - issued_at == pytest.approx(0.001, abs=1e-6)


# -- the command line ----------------------------------------------------------------------------


def token_create(broker: Broker, *ttl: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli("token", "create", "--ttl", *ttl, env={"BLOBPLANE_BROKER": broker.socket_path})


@pytest.mark.parametrize("ttl", ["0", "0s", "0ms", "0h0m", "-1", "-5m", "0.0", "nan", "inf"])
def test_token_create_refuses_a_ttl_that_is_not_a_positive_time(broker: Broker, ttl: str) -> None:
    result = token_create(broker, ttl)
    err = result.stderr.decode()
    assert result.returncode == 2, err  # a usage error, as click reports them
    assert re.search(r"Invalid value for '--ttl'", err), err
    assert "Traceback" not in err
    assert not result.stdout


@pytest.mark.parametrize("ttl", ["0.4ms", "0.0001"])
def test_token_create_makes_a_sub_millisecond_ttl_one_millisecond(broker: Broker, ttl: str) -> None:
    result = token_create(broker, ttl)
    assert result.returncode == 0, result.stderr.decode()
    issued_at, expires_at = claims_of(broker, result.stdout.decode().strip())
    assert expires_at is not None
    assert expires_at - issued_at == pytest.approx(0.001, abs=1e-6)


def test_a_get_that_waits_past_its_tokens_expiry_gets_nothing(broker: Broker) -> None:
    """The token is checked again when the blob its get waited for comes, not only at the
    get: a key put after the token lapsed is never handed to its bearer."""
    token = TokenAuthority(load_key(broker.key_path)).mint("get", ttl=1.0)
    key = f"later-{uuid.uuid4().hex}"
    outcome: list[object] = []

    def wait_for_it() -> None:
        with connect_broker(broker.socket_path, token=token) as reader:
            try:
                with reader.get(key, timeout=30) as read:
                    outcome.append(bytes(read.as_slice()))
            except TokenExpired as exc:
                outcome.append(exc)

    waiting = threading.Thread(target=wait_for_it)
    waiting.start()
    with connect_broker(broker.socket_path) as owner:
        wait_until(lambda: owner.stats().waiting_gets == 1, "the get to be parked")
        time.sleep(1.2)  # the token lapses while its get waits
        entry = owner.put_bytes(b"too late", key=key)
        waiting.join(10)
        owner.delete(entry.blob_id)
    assert not waiting.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], TokenExpired), outcome
