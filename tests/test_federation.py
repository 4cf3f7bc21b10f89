"""Two and three brokers on loopback: the Flight endpoint, and gets that miss fetched from peers."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator

import pytest

pytest.importorskip("pyarrow.flight")

import numpy as np
import pyarrow as pa
from pyarrow import flight

from blobplane.backends.memlimit import available_memory
from blobplane.broker.flight.address import parse_address
from blobplane.broker.flight.arrow import from_flight_error
from blobplane.broker.flight.client import FlightBlobClient
from blobplane.broker.flight.federation import rendezvous
from blobplane.broker.flight.tickets import (
    MAX_TICKET_BYTES,
    BlobTicket,
    GetAnswer,
    StreamInfo,
    decode_get_answer,
    decode_stream_info,
    encode,
    encode_stream_info,
)
from blobplane.broker.tokens import TokenAuthority, generate_key
from blobplane.client import connect_broker
from blobplane.errors import (
    BlobNotFound,
    InvalidSize,
    KeyInUse,
    PeerUnreachable,
    RemoteProtocolError,
    RightMissing,
    Timeout,
    TokenRefused,
)
from blobplane.types import BlobId
from brokers import Broker, start, wait_until
from flight_brokers import Cluster, at, cluster, peer


def stream_metadata(size: int) -> dict[bytes, bytes]:
    return encode_stream_info(StreamInfo(size, BlobId.new(), "k", 0, size))


def key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def payload(size: int) -> bytes:
    return np.random.default_rng(size).bytes(size)


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def flight_gets(broker: Broker, name: str) -> int:
    """How many DoGets of the key *name* this broker served (its debug log says)."""
    return len(re.findall(rf"event=flight\.get .*key={re.escape(name)} ", broker.log()))


def settled(broker: Broker) -> None:
    """The broker holds no reference and no unsealed blob: every get and fetch finished."""
    with connect_broker(broker.socket_path) as checker:
        wait_until(
            lambda: (s := checker.stats()).references == 0 and s.allocated == 0,
            "every reference released and no unsealed blob left",
        )


@pytest.fixture(scope="module")
def pair() -> Iterator[Cluster]:
    """Broker 0 serves Flight; broker 1 serves Flight too and names broker 0 as its peer."""
    with cluster(at(0), (*at(1), *peer(0))) as running:
        yield running


# A GiB is held three times at once (the test's bytes, the original, the copy), and more
# while they are compared: a host with less memory to spare skips it.
GIB_ROOM = 6 << 30
ROOM_FOR_A_GIB = pytest.mark.skipif(
    available_memory() < GIB_ROOM, reason="needs 6 GiB of memory available"
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "size", [0, 1, 4096, 64 << 20, pytest.param(1 << 30, marks=ROOM_FOR_A_GIB, id="1GiB")]
)
def test_a_blob_put_on_one_broker_is_got_from_another(pair: Cluster, size: int) -> None:
    home, other = pair.brokers
    data = payload(size)
    name = key()
    with connect_broker(home.socket_path) as producer:
        producer.put_bytes(data, key=name)
    with connect_broker(other.socket_path) as consumer:
        with consumer.get(name) as mapped:
            assert len(mapped) == size
            assert sha(mapped.as_slice()) == sha(data)
        # The second get is answered from the copy: nothing travels again.
        with consumer.get(name) as mapped:
            assert sha(mapped.as_slice()) == sha(data)
        copy = {entry.key: entry for entry in consumer.list()}[name]
    assert copy.account == "peer-cache"
    assert copy.state == "sealed"
    assert copy.lease_ms == 600_000  # --cache-ttl's default
    assert flight_gets(home, name) == 1
    settled(other)
    settled(home)


@pytest.mark.timeout(30)
def test_objects_travel_with_their_header(pair: Cluster) -> None:
    home, other = pair.brokers
    name = key()
    frame = np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024)
    with connect_broker(home.socket_path) as producer:
        producer.put_object({"frame": frame, "tag": "x"}, key=name)
    with connect_broker(other.socket_path) as consumer:
        got = consumer.get_object(name, restricted=True)
        assert got["tag"] == "x"
        assert np.array_equal(got["frame"], frame)
        assert not got["frame"].flags.writeable  # a view of the copy's sealed memory
        del got
    settled(other)


@pytest.mark.timeout(30)
def test_a_stock_flight_client_lists_fetches_and_uploads(pair: Cluster) -> None:
    """No blobplane code on the client side: pyarrow.flight and a bearer header."""
    home = pair.brokers[0]
    name = key()
    data = payload(3 << 20)
    with connect_broker(home.socket_path) as producer:
        producer.put_bytes(data, key=name)
    client = flight.FlightClient(pair.url(0))
    options = flight.FlightCallOptions(
        headers=[(b"authorization", f"Bearer {pair.token()}".encode())]
    )
    infos = {info.descriptor.path[0].decode(): info for info in client.list_flights(b"", options)}
    info = infos[name]
    assert info.total_bytes == len(data)
    described = client.get_flight_info(flight.FlightDescriptor.for_path(name), options)
    assert described.total_bytes == len(data)
    assert described.endpoints[0].ticket == info.endpoints[0].ticket
    schema = client.get_schema(flight.FlightDescriptor.for_path(name), options).schema
    assert schema.metadata[b"blobplane.size"] == str(len(data)).encode()
    with pytest.raises(flight.FlightError, match="BlobNotFound"):
        client.get_flight_info(flight.FlightDescriptor.for_path(key()), options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert b"".join(value.as_py() for value in table.column("data")) == data
    # A ticket written by hand, and one range of the blob.
    ticket = flight.Ticket(f'{{"key": "{name}", "offset": 5, "length": 1000}}'.encode())
    table = client.do_get(ticket, options).read_all()
    assert b"".join(value.as_py() for value in table.column("data")) == data[5:1005]
    # The "get" action: the answer, then the bytes of a range of at most 1 MiB; a larger
    # one is only described (DoGet it).
    assert [action.type for action in client.list_actions(options)] == ["get"]
    asked = flight.Action("get", f'{{"key": "{name}", "offset": 7, "length": 4096}}'.encode())
    head, body = client.do_action(asked, options)
    answer = json.loads(head.body.to_pybytes())
    assert answer == {
        "size": len(data),
        "id": json.loads(info.endpoints[0].ticket.ticket)["id"],
        "key": name,
        "offset": 7,
        "length": 4096,
        "lease_left_ms": None,  # put without a lease
        "inline": True,
    }
    assert body.body.to_pybytes() == data[7 : 7 + 4096]
    (head,) = client.do_action(flight.Action("get", f'{{"key": "{name}"}}'.encode()), options)
    assert json.loads(head.body.to_pybytes())["inline"] is False
    with pytest.raises(flight.FlightError, match="RemoteProtocolError"):
        list(client.do_action(flight.Action("delete", b"{}"), options))
    # An upload: a descriptor command with the key and the exact size.
    uploaded = key()
    descriptor = flight.FlightDescriptor.for_command(f'{{"key": "{uploaded}", "size": 6}}')
    schema = pa.schema([("data", pa.binary())])
    writer, results = client.do_put(descriptor, schema, options)
    writer.write_table(pa.table({"data": [b"abc", b"def"]}, schema=schema))
    writer.done_writing()
    answer = results.read()
    writer.close()
    assert b'"size":6' in answer.to_pybytes()
    with connect_broker(home.socket_path) as reader, reader.get(uploaded) as mapped:
        assert bytes(mapped.as_slice()) == b"abcdef"
    client.close()
    settled(home)


@pytest.mark.timeout(30)
def test_a_range_outside_the_blob_is_refused(pair: Cluster) -> None:
    """By a DoGet and by the "get" action alike; neither keeps a reference (`settled`)."""
    home = pair.brokers[0]
    name = key()
    with connect_broker(home.socket_path) as producer:
        producer.put_bytes(payload(4096), key=name)
    client = flight.FlightClient(pair.url(0))
    options = flight.FlightCallOptions(
        headers=[(b"authorization", f"Bearer {pair.token()}".encode())]
    )
    for outside in ('"offset": 4097', '"offset": 1, "length": 4096'):
        raw = f'{{"key": "{name}", {outside}}}'.encode()
        with pytest.raises(flight.FlightError, match="InvalidSize"):
            client.do_get(flight.Ticket(raw), options).read_all()
        with pytest.raises(flight.FlightError, match="InvalidSize"):
            list(client.do_action(flight.Action("get", raw), options))
    (head, body) = client.do_action(
        flight.Action("get", f'{{"key": "{name}", "offset": 4096}}'.encode()), options
    )
    assert json.loads(head.body.to_pybytes())["length"] == 0
    assert body.body.size == 0
    client.close()
    settled(home)


@pytest.mark.timeout(30)
def test_uploads_publish_exactly_what_they_declared(pair: Cluster) -> None:
    home = pair.brokers[0]
    with connect_broker(home.socket_path) as local:
        blobs_before = local.stats().blobs
    memfds_before = home.memfds()
    with FlightBlobClient(pair.url(0), pair.token()) as client:
        name = key()
        data = payload(10 << 20)
        result = client.put(data, key=name)
        assert result.size == len(data)
        with connect_broker(home.socket_path) as local, local.get(name) as mapped:
            assert sha(mapped.as_slice()) == sha(data)
        with pytest.raises(KeyInUse):
            client.put(b"again", key=name)
        # More than declared, fewer than declared: refused, nothing published.
        for sent, declared in ((b"x" * 100, 10), (b"x" * 10, 100)):
            refused = key()
            with pytest.raises((InvalidSize, RemoteProtocolError)):
                _declare(client, refused, declared, sent)
            with connect_broker(home.socket_path) as local, pytest.raises(BlobNotFound):
                local.get(refused, timeout=0)
        # An upload larger than the host is refused before a byte is allocated.
        with pytest.raises(InvalidSize):
            _declare(client, key(), 1 << 60)
    with connect_broker(home.socket_path) as local:
        local.delete(name)
        wait_until(lambda: local.stats().blobs == blobs_before, "the refused uploads to go")
        assert local.stats().allocated == 0
    wait_until(lambda: home.memfds() == memfds_before, "no memfd left behind")


def _declare(client: FlightBlobClient, name: str, size: int, sent: bytes = b"") -> None:
    """Upload *sent* while declaring *size* bytes."""
    schema = pa.schema([("data", pa.binary())])
    command = f'{{"key": "{name}", "size": {size}}}'
    try:
        writer, results = client._client.do_put(
            flight.FlightDescriptor.for_command(command), schema, client.options()
        )
        if sent:
            writer.write_table(pa.table({"data": [sent]}, schema=schema))
        writer.done_writing()
        results.read()
        writer.close()
    except flight.FlightError as exc:
        raise from_flight_error(exc, "the broker") from None


@pytest.mark.timeout(30)
def test_a_peer_refuses_a_broker_whose_token_it_did_not_mint() -> None:
    stranger = TokenAuthority(generate_key()).mint("get", ttl=60)
    with cluster(at(0), (*peer(0), "--peer-token", stranger)) as running:
        home, other = running.brokers
        name = key()
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(b"for brokers of this key", key=name)
        with (
            connect_broker(other.socket_path) as consumer,
            pytest.raises(PeerUnreachable, match="token"),
        ):
            consumer.get(name)
        assert re.search(r"event=flight\.refused op=get .*TokenRefused", home.log())
        settled(other)


@pytest.mark.timeout(30)
def test_rights_are_those_of_the_token(pair: Cluster) -> None:
    home = pair.brokers[0]
    name, other_name = key(), key()
    with connect_broker(home.socket_path) as local:
        entry = local.put_bytes(b"secret", key=name)
        local.put_bytes(b"other", key=other_name)
        per_blob = local.mint_read_token(name, ttl=60)
    url = pair.url(0)
    with FlightBlobClient(url, pair.token("get")) as getter:
        assert getter.get_bytes(name) == b"secret"
        with pytest.raises(RightMissing):
            getter.list()
        with pytest.raises(RightMissing):
            getter.put(b"no", key=key())
    with FlightBlobClient(url, pair.token("list")) as lister:
        assert name in {e.key for e in lister.list()}
        with pytest.raises(RightMissing):
            lister.get_bytes(name)
        with pytest.raises(RightMissing):
            lister.get_inline(name)
    with FlightBlobClient(url, per_blob) as bearer:
        assert bearer.get_bytes(BlobId(entry.id)) == b"secret"
        assert bearer.get_bytes(name) == b"secret"
        _, inline = bearer.get_inline(name)
        assert inline is not None
        assert inline.to_pybytes() == b"secret"
        with pytest.raises(RightMissing):
            bearer.get_bytes(other_name)
        with pytest.raises(RightMissing):
            bearer.get_inline(other_name)
    with FlightBlobClient(url) as anonymous, pytest.raises(TokenRefused):
        anonymous.get_inline(name)
    forged = pair.token("get")[:-4] + "AAAA"
    with FlightBlobClient(url, forged) as forger, pytest.raises(TokenRefused):
        forger.get_bytes(name)
    stranger = TokenAuthority(generate_key()).mint("get", ttl=60)
    with FlightBlobClient(url, stranger) as outsider, pytest.raises(TokenRefused):
        outsider.get_bytes(name)
    settled(home)


@pytest.mark.timeout(30)
def test_many_gets_of_one_missing_key_cause_one_fetch(pair: Cluster) -> None:
    home, other = pair.brokers
    name = key()
    data = payload(32 << 20)
    with connect_broker(home.socket_path) as producer:
        producer.put_bytes(data, key=name)

    def get_one(_: int) -> str:
        with connect_broker(other.socket_path) as consumer, consumer.get(name) as mapped:
            return sha(mapped.as_slice())

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        digests = list(pool.map(get_one, range(12)))
    assert digests == [sha(data)] * 12
    assert flight_gets(home, name) == 1
    settled(other)


@pytest.mark.timeout(30)
def test_what_is_nowhere_is_not_found_and_ids_stay_home(pair: Cluster) -> None:
    home, other = pair.brokers
    with connect_broker(other.socket_path) as consumer:
        started = time.monotonic()
        with pytest.raises(BlobNotFound, match="here or at any of the 1 peers"):
            consumer.get(key())
        assert time.monotonic() - started < 2
        # A get with a timeout asks the peers, then waits for a local publication.
        late = key()
        with pytest.raises(Timeout):
            consumer.get(late, timeout=0.3)
        with connect_broker(home.socket_path) as producer:
            entry = producer.put_bytes(b"at home", key=late)
        # Ids are per broker: a get by id never leaves this one.
        with pytest.raises(BlobNotFound):
            consumer.get(BlobId(entry.id))
        # timeout=0 looks here only.
        with pytest.raises(BlobNotFound):
            consumer.get(late, timeout=0)
        with consumer.get(late, timeout=5) as mapped:
            assert bytes(mapped.as_slice()) == b"at home"
    settled(other)


@pytest.mark.timeout(40)
def test_three_brokers_ask_the_home_of_a_key_first_then_each() -> None:
    with cluster(
        (*at(0), *peer(1), *peer(2)),
        (*at(1), *peer(0), *peer(2)),
        (*at(2), *peer(0), *peer(1)),
    ) as running:
        asker = running.brokers[2]
        peers = (parse_address(running.url(0)), parse_address(running.url(1)))
        index = {peers[0]: 0, peers[1]: 1}
        # One key held by its home, one held by the other peer only.
        at_home, elsewhere = key(), key()
        home = running.brokers[index[rendezvous(at_home, peers)[0]]]
        not_home = running.brokers[index[rendezvous(elsewhere, peers)[1]]]
        # The one at its home larger than the "get" action carries: a DoGet stream.
        large = payload(3 << 20)
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(large, key=at_home)
        with connect_broker(not_home.socket_path) as producer:
            producer.put_bytes(b"away", key=elsewhere)
        with connect_broker(asker.socket_path) as consumer:
            with consumer.get(at_home) as mapped:
                assert sha(mapped.as_slice()) == sha(large)
            with consumer.get(elsewhere) as mapped:
                assert bytes(mapped.as_slice()) == b"away"
        others = [b for b in running.brokers[:2] if b is not home]
        # The home had the key: the other peer was never asked.
        assert "key=" + at_home not in others[0].log()
        # The key's home was asked first, said no, and the other peer had it.
        elsewhere_home = running.brokers[index[rendezvous(elsewhere, peers)[0]]]
        assert re.search(r"event=flight\.refused op=get .*BlobNotFound", elsewhere_home.log())
        assert flight_gets(not_home, elsewhere) == 1
        settled(asker)


@pytest.mark.timeout(40)
def test_copies_expire_and_give_way_to_local_blobs() -> None:
    with cluster(at(0), (*peer(0), "--cache-ttl", "1s", "--memory-limit", "96MiB")) as running:
        home, other = running.brokers
        big, small = key(), key()
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(payload(64 << 20), key=big)
            producer.put_bytes(b"small", key=small)
        with connect_broker(other.socket_path) as consumer:
            with consumer.get(big) as mapped:
                assert len(mapped) == 64 << 20
            # Without --evict, a local blob still evicts a copy: it can be fetched again.
            consumer.put_bytes(payload(64 << 20), key=key())
            assert big not in {entry.key for entry in consumer.list()}
            assert "event=blob.evicted" in other.log()
            with consumer.get(small) as mapped:
                assert bytes(mapped.as_slice()) == b"small"
            assert small in {entry.key for entry in consumer.list()}
            wait_until(
                lambda: small not in {entry.key for entry in consumer.list()},
                "the copy's cache ttl to run out",
                timeout=5,
            )


@pytest.mark.timeout(30)
def test_peers_may_come_from_a_file() -> None:
    with cluster(at(0)) as running:
        home = running.brokers[0]
        peers = os.path.join(running.folder, "peers")
        with open(peers, "w") as file:
            file.write(f"# the brokers of this group\n\n{running.url(0)}  # the home\n")
        other = start(
            running.folder, "--key-file", running.key_path, "--peers-file", peers, name="c.sock"
        )
        try:
            name = key()
            with connect_broker(home.socket_path) as producer:
                producer.put_bytes(b"listed in a file", key=name)
            with connect_broker(other.socket_path) as consumer, consumer.get(name) as mapped:
                assert bytes(mapped.as_slice()) == b"listed in a file"
        finally:
            assert other.stop() == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [5, 3 << 20], ids=["in the answer", "streamed"])
def test_a_copy_lasts_no_longer_than_the_original_lease(pair: Cluster, size: int) -> None:
    home, other = pair.brokers
    name = key()
    with connect_broker(home.socket_path) as producer:
        producer.put_bytes(payload(size), key=name, lease_ms=2000)
    with connect_broker(other.socket_path) as consumer:
        with consumer.get(name) as mapped:
            assert len(mapped) == size
        copy = {entry.key: entry for entry in consumer.list()}[name]
        assert copy.account == "peer-cache"
        assert copy.lease_ms is not None
        assert 0 < copy.lease_ms <= 2000  # not --cache-ttl's ten minutes
        wait_until(
            lambda: name not in {entry.key for entry in consumer.list()},
            "the copy to expire with the original",
            timeout=5,
        )
    settled(other)


@pytest.mark.timeout(30)
def test_tickets_and_commands_are_checked(pair: Cluster) -> None:
    client = flight.FlightClient(pair.url(0))
    options = flight.FlightCallOptions(
        headers=[(b"authorization", f"Bearer {pair.token()}".encode())]
    )
    for ticket in (
        b"",
        b"not json",
        b'{"key": ""}',
        b'{"key": "a", "id": null, "x": 1}',
        b'{"key": "a\\u0000b"}',
        b"{" * 5000,
        b'{"key": "a", "offset": -1}',
    ):
        with pytest.raises(flight.FlightError):
            client.do_get(flight.Ticket(ticket), options).read_all()
    client.close()
    # What a peer sends back is checked too.
    with pytest.raises(RemoteProtocolError):
        decode_stream_info({b"blobplane.size": b"10", b"blobplane.id": b"x"})
    lease = {b"blobplane.lease_left_ms": str(1 << 62).encode()}
    with pytest.raises(RemoteProtocolError, match="beyond any valid value"):
        decode_stream_info({**stream_metadata(10), **lease})
    # An answer about any key a ticket may name fits an answer's bound (JSON escapes the
    # control characters six times over).
    longest = max(
        ("\x01" * n for n in range(600, 700)),
        key=lambda k: len(k) if len(encode(BlobTicket(key=k))) <= MAX_TICKET_BYTES else 0,
    )
    answer = GetAnswer(size=1, id=uuid.uuid4(), key=longest, offset=0, length=1, inline=True)
    info, inline = decode_get_answer(encode(answer))
    assert info.key == longest
    assert inline
