"""Peers that are down, stall or die mid-transfer; clients that stop reading; no leftovers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

pytest.importorskip("pyarrow.flight")

import numpy as np
import pyarrow as pa
from pyarrow import flight

from blobplane.broker.flight.address import parse_address
from blobplane.broker.flight.client import FlightBlobClient
from blobplane.broker.flight.federation import rendezvous
from blobplane.broker.flight.tickets import StreamInfo, encode_stream_info
from blobplane.client import connect_broker
from blobplane.errors import BlobError, InvalidSize, PeerUnreachable, Timeout
from blobplane.types import BlobId
from brokers import Broker, read_line, spawn, wait_until
from flight_brokers import at, cluster, free_ports, peer

BIG = 512 << 20


def key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def nothing_left(broker: Broker, memfds_before: int) -> None:
    """No blob, byte, reference or memfd of a failed fetch stays in the broker."""
    with connect_broker(broker.socket_path) as checker:
        wait_until(
            lambda: (s := checker.stats()).blobs == 0 and s.bytes == 0 and s.references == 0,
            "the broker to hold nothing",
        )
    wait_until(lambda: broker.memfds() == memfds_before, "no memfd left behind")


def fetch_in_background(broker: Broker, name: str) -> tuple[threading.Thread, list[object]]:
    """A get of *name* in a thread; its outcome (an error, or the size) lands in the list."""
    outcome: list[object] = []

    def run() -> None:
        started = time.monotonic()
        try:
            with connect_broker(broker.socket_path) as consumer, consumer.get(name) as mapped:
                outcome.append(len(mapped))
        except BlobError as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_the_copy_to_be_placed(broker: Broker) -> None:
    with connect_broker(broker.socket_path) as checker:
        wait_until(lambda: checker.stats().allocated == 1, "the copy to be placed", timeout=10)


@pytest.mark.timeout(30)
def test_a_peer_that_is_down_is_unreachable_and_the_broker_goes_on() -> None:
    dead = free_ports(1)[0]
    with cluster(("--peer", f"grpc://127.0.0.1:{dead}", "--peer-timeout", "2s")) as running:
        broker = running.brokers[0]
        memfds = broker.memfds()
        with connect_broker(broker.socket_path) as consumer:
            started = time.monotonic()
            with pytest.raises(PeerUnreachable, match=str(dead)):
                consumer.get(key())
            assert time.monotonic() - started < 5
            # The broker serves on.
            consumer.put_bytes(b"still here", key="local")
            with consumer.get("local") as mapped:
                assert bytes(mapped.as_slice()) == b"still here"
            consumer.delete("local")
        nothing_left(broker, memfds)


@pytest.mark.timeout(40)
def test_a_peer_that_stalls_mid_transfer_is_given_up_on() -> None:
    with cluster(at(0), (*peer(0), "--peer-timeout", "1s")) as running:
        home, other = running.brokers
        name = key()
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(np.ones(BIG, dtype=np.uint8), key=name)
        memfds = other.memfds()
        thread, outcome = fetch_in_background(other, name)
        wait_for_the_copy_to_be_placed(other)
        os.kill(home.pid, signal.SIGSTOP)
        try:
            thread.join(20)
            assert not thread.is_alive()
            error, seconds = outcome
            assert isinstance(error, PeerUnreachable), outcome
            assert "sent less than 1.0 MiB in 1.0 s" in str(error)
            assert isinstance(seconds, float)
            assert seconds < 10
            nothing_left(other, memfds)
        finally:
            os.kill(home.pid, signal.SIGCONT)


@pytest.mark.timeout(40)
def test_a_peer_killed_mid_transfer_publishes_nothing() -> None:
    with cluster(at(0), (*peer(0), "--peer-timeout", "10s")) as running:
        home, other = running.brokers
        name = key()
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(np.ones(BIG, dtype=np.uint8), key=name)
        memfds = other.memfds()
        thread, outcome = fetch_in_background(other, name)
        wait_for_the_copy_to_be_placed(other)
        os.kill(home.pid, signal.SIGSTOP)  # frozen mid-transfer, then killed
        os.kill(home.pid, signal.SIGKILL)
        thread.join(20)
        assert not thread.is_alive()
        error, seconds = outcome
        assert isinstance(error, PeerUnreachable), outcome
        assert isinstance(seconds, float)
        assert seconds < 8  # well within the peer timeout
        nothing_left(other, memfds)
        with connect_broker(other.socket_path) as consumer:
            # The key is free for a local blob, and the broker is fine.
            consumer.put_bytes(b"mine now", key=name)
            consumer.delete(name)


@pytest.mark.timeout(30)
def test_a_get_timeout_bounds_a_fetch_from_a_stalled_peer() -> None:
    with cluster(at(0), (*peer(0), "--peer-timeout", "3s")) as running:
        home, other = running.brokers
        name = key()
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(b"x" * 4096, key=name)
        memfds = other.memfds()
        os.kill(home.pid, signal.SIGSTOP)
        try:
            with connect_broker(other.socket_path) as consumer:
                started = time.monotonic()
                with pytest.raises(Timeout):
                    consumer.get(name, timeout=0.5)
                assert time.monotonic() - started < 2
                # Without a timeout of its own, the peer timeout bounds it.
                with pytest.raises(PeerUnreachable, match=r"did not answer within 3\.0 s"):
                    consumer.get(name)
            nothing_left(other, memfds)
        finally:
            os.kill(home.pid, signal.SIGCONT)


@pytest.mark.timeout(40)
def test_a_broker_stops_even_when_a_flight_client_stops_reading() -> None:
    with cluster(at(0), check_exit=False) as running:
        home = running.brokers[0]
        name = key()
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(np.ones(BIG, dtype=np.uint8), key=name)
        client = FlightBlobClient(running.url(0), running.token())
        stream = client.open(name)
        next(iter(stream.chunks()))  # one chunk, then no more reading
        started = time.monotonic()
        status = home.stop()
        assert status == 0, home.log()
        assert time.monotonic() - started < 8
        assert "event=flight.stop_timeout" in home.log()
        assert "event=broker.stopped" in home.log()
        stream.cancel()
        client.close()


UPLOADER = """
import json, sys, time
import pyarrow as pa
from pyarrow import flight

client = flight.FlightClient(sys.argv[1])
options = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer " + sys.argv[2].encode())])
schema = pa.schema([("data", pa.binary())])
command = json.dumps({"key": "cut", "size": 32 << 20})
writer, _ = client.do_put(flight.FlightDescriptor.for_command(command), schema, options)
writer.write_table(pa.table({"data": [b"y" * (8 << 20)]}, schema=schema))
print("sent", flush=True)
time.sleep(60)
"""


class LyingPeer(flight.FlightServerBase):  # type: ignore[misc]
    """A Flight server that answers every get the way its `mode` says: in the "get" action's
    answer itself (*inline*), or, the answer saying the bytes do not come inline, in the
    DoGet stream that follows."""

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.mode = ""
        self.inline = True
        self.released = threading.Event()  # ends the calls that "hang"

    def shutdown(self) -> None:
        self.released.set()
        super().shutdown()

    def _story(self, asked: str) -> tuple[int, bytes, object, int]:
        """The declared size, the bytes sent, the key and the offset its mode tells of."""
        declared, sent, key, offset = 20, b"x" * 20, asked, 0
        match self.mode:
            case "longer":
                declared = 10
            case "shorter":
                sent = b"x" * 10
            case "other key":
                key = "someone-else"
            case "huge":
                declared = 1 << 61
            case "range":
                offset = 5
            case "silent":
                time.sleep(3)  # past the peer timeout
        return declared, sent, key, offset

    def do_action(self, context: object, action: flight.Action) -> list[bytes]:
        asked = json.loads(action.body.to_pybytes())["key"]
        if not self.inline:
            size, blob_id = (1 << 30 if self.mode == "hang" else 20), str(uuid.uuid4())
            answer = {"size": size, "id": blob_id, "key": asked, "offset": 0, "length": size}
            return [json.dumps({**answer, "inline": False}).encode()]
        declared, sent, key, offset = self._story(asked)
        results: list[bytes] = {
            "no bytes": [],
            "more results": [sent, b"x"],
            "flood": [sent, *[b"x" * (2 << 20)] * 8],  # messages over the inline bound
        }.get(self.mode, [sent])
        if self.mode == "schema":
            key = 7
        answer = {"size": declared, "id": str(uuid.uuid4()), "key": key, "offset": offset}
        if self.mode == "eternal":  # a lease no broker could hold
            answer["lease_left_ms"] = 1 << 62
        head = json.dumps({**answer, "length": declared - offset, "inline": True}).encode()
        return [head, *results]

    def do_get(self, context: object, ticket: flight.Ticket) -> flight.FlightDataStream:
        declared, sent, key, offset = self._story(json.loads(ticket.ticket)["key"])
        if self.mode == "hang":  # never opens the stream it said would come
            self.released.wait(60)
        if self.mode == "trickle":  # 40 KiB a second of the 8 MiB it declares
            info = StreamInfo(8 << 20, BlobId.new(), str(key), 0, 8 << 20)
            schema = pa.schema([("data", pa.binary())], metadata=encode_stream_info(info))

            def drops() -> Iterator[pa.RecordBatch]:
                for _ in range(2048):
                    time.sleep(0.1)
                    yield pa.record_batch([pa.array([b"x" * 4096], pa.binary())], schema=schema)

            return flight.GeneratorStream(schema, drops())
        rows = [None] if self.mode == "nulls" else [sent]
        column = pa.string() if self.mode == "schema" else pa.binary()
        info = StreamInfo(declared, BlobId.new(), str(key), offset, declared - offset)
        schema = pa.schema([("data", column)], metadata=encode_stream_info(info))
        return flight.RecordBatchStream(pa.table({"data": pa.array(rows, column)}, schema=schema))


LIES: dict[bool, list[tuple[str, type[BlobError]]]] = {
    True: [
        ("longer", PeerUnreachable),
        ("shorter", PeerUnreachable),
        ("other key", PeerUnreachable),
        ("range", PeerUnreachable),
        ("no bytes", PeerUnreachable),
        ("more results", PeerUnreachable),
        ("flood", PeerUnreachable),
        ("eternal", PeerUnreachable),
        ("schema", PeerUnreachable),
        ("huge", PeerUnreachable),
        ("silent", PeerUnreachable),
    ],
    False: [
        ("longer", PeerUnreachable),
        ("shorter", PeerUnreachable),
        ("other key", PeerUnreachable),
        ("range", PeerUnreachable),
        ("nulls", PeerUnreachable),
        ("schema", PeerUnreachable),
        ("huge", InvalidSize),
        ("silent", PeerUnreachable),
        ("trickle", PeerUnreachable),  # cut off once 1 MiB did not come in --peer-timeout
    ],
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("inline", [True, False], ids=["inline answer", "stream"])
def test_what_a_lying_peer_sends_is_refused_and_nothing_stays(inline: bool) -> None:
    liar = LyingPeer()
    liar.inline = inline
    try:
        peer_args = ("--peer", f"grpc://127.0.0.1:{liar.port}", "--peer-timeout", "2s")
        with cluster(peer_args) as running:
            broker = running.brokers[0]
            memfds = broker.memfds()
            with connect_broker(broker.socket_path) as consumer:
                for mode, error in LIES[inline]:
                    liar.mode = mode
                    with pytest.raises(error):
                        consumer.get(key())
                liar.mode = ""
                with consumer.get("honest") as mapped:  # the same peer, telling the truth
                    assert bytes(mapped.as_slice()) == b"x" * 20
                consumer.delete("honest")
            nothing_left(broker, memfds)
    finally:
        liar.shutdown()


@pytest.mark.timeout(60)
def test_a_peer_that_never_opens_its_streams_holds_a_few_threads_not_the_others() -> None:
    liar = LyingPeer()
    liar.inline, liar.mode = False, "hang"
    try:
        liar_url = f"grpc://127.0.0.1:{liar.port}"
        with cluster(at(0), (*peer(0), "--peer", liar_url, "--peer-timeout", "1s")) as running:
            home, asker = running.brokers
            peers = (parse_address(running.url(0)), parse_address(liar_url))
            # Keys the liar is asked for first: each of its asks waits for a DoGet that
            # never opens, with a deadline fit for the GiB it claims.
            names = [name for name in (key() for _ in range(200)) if
                     rendezvous(name, peers)[0] == peers[1]][:10]  # fmt: skip
            with connect_broker(home.socket_path) as producer:
                for name in names:
                    producer.put_bytes(name.encode(), key=name)
            took = []
            with connect_broker(asker.socket_path) as consumer:
                for name in names:  # the home answers each, once the liar was given up on
                    started = time.monotonic()
                    with consumer.get(name, timeout=10) as mapped:
                        assert bytes(mapped.as_slice()) == name.encode()
                    took.append(time.monotonic() - started)
            # Four asks wait for the liar, a peer timeout each, and keep their threads; the
            # others skip it at once (were it asked, they would wait for threads never
            # freed, and fail).
            assert all(seconds >= 0.9 for seconds in took[:4]), took
            assert all(seconds < 0.5 for seconds in took[4:]), took
    finally:
        liar.shutdown()


@pytest.mark.timeout(30)
def test_streams_and_uploads_cut_short_leave_nothing() -> None:
    with cluster(at(0)) as running:
        home = running.brokers[0]
        name = key()
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(np.ones(64 << 20, dtype=np.uint8), key=name)
        with connect_broker(home.socket_path) as checker:
            # The producer's pool slot, sealed and taken over once its disconnection is done.
            wait_until(lambda: checker.stats().pooled == 0, "the slot to be taken over")
        memfds = home.memfds()
        with FlightBlobClient(running.url(0), running.token()) as client:
            stream = client.open(name)
            next(iter(stream.chunks()))
            with connect_broker(home.socket_path) as checker:
                assert checker.stats().references == 1  # the stream holds one
                stream.cancel()
                del stream
                wait_until(lambda: checker.stats().references == 0, "the stream's reference")
        # An upload whose client dies in the middle publishes nothing.
        uploader = spawn(UPLOADER, running.url(0), running.token())
        assert read_line(uploader) == "sent"
        with connect_broker(home.socket_path) as checker:
            wait_until(lambda: checker.stats().allocated == 1, "the upload's blob")
        uploader.kill()
        uploader.communicate()
        with connect_broker(home.socket_path) as checker:
            wait_until(lambda: checker.stats().allocated == 0, "the cut upload to be freed")
            assert "cut" not in {entry.key for entry in checker.list()}
            checker.delete(name)
        wait_until(lambda: home.memfds() == memfds - 1, "no memfd left but the deleted blob's")


def memfd_bytes(broker: Broker) -> int:
    """The memory the memfds the broker holds open have allocated, in bytes."""
    total = 0
    for name in os.listdir(f"/proc/{broker.pid}/fd"):
        path = f"/proc/{broker.pid}/fd/{name}"
        try:
            if os.readlink(path).startswith("/memfd:"):
                total += os.stat(path).st_blocks * 512
        except FileNotFoundError:
            continue
    return total


@pytest.mark.timeout(30)
def test_an_upload_message_over_the_limit_is_refused_and_nothing_stays() -> None:
    with cluster((*at(0), "--max-message", "1MiB")) as running:
        home = running.brokers[0]
        memfds = home.memfds()
        data = np.random.default_rng(7).bytes(4 << 20)
        with FlightBlobClient(running.url(0), running.token()) as client:
            with pytest.raises(InvalidSize, match=r"larger than the 1\.0 MiB"):
                client.put(data, key="one-big-message", chunk=2 << 20)
            with connect_broker(home.socket_path) as checker:
                wait_until(
                    lambda: (s := checker.stats()).blobs == 0 and s.bytes == 0,
                    "the refused upload to be freed",
                )
            wait_until(lambda: home.memfds() == memfds, "no memfd left behind")
            # The same bytes in messages within the limit are taken.
            client.put(data, key="small-messages", chunk=512 << 10)
        with connect_broker(home.socket_path) as checker:
            assert [entry.key for entry in checker.list()] == ["small-messages"]
            with checker.get("small-messages") as mapped:
                assert bytes(mapped.as_slice()) == data
            checker.delete("small-messages")


@pytest.mark.timeout(40)
def test_a_stalled_upload_loses_its_reservation_and_its_memory() -> None:
    with cluster((*at(0), "--upload-timeout", "2s")) as running:
        home = running.brokers[0]
        memfds = home.memfds()
        uploader = spawn(UPLOADER, running.url(0), running.token())
        try:
            assert read_line(uploader) == "sent"  # 8 MiB of the 32 it declared, then nothing
            started = time.monotonic()
            with connect_broker(home.socket_path) as checker:
                wait_until(
                    lambda: (s := checker.stats()).blobs == 0 and s.bytes == 0,
                    "the stalled upload's reservation to be released",
                    timeout=15,
                )
                assert time.monotonic() - started < 8
                assert "cut" not in {entry.key for entry in checker.list()}
                # Its key and its bytes are free again while its client still holds the call.
                assert uploader.poll() is None
                checker.put_bytes(b"the key is free", key="cut")
                checker.delete("cut")
            # The gRPC thread still holds a duplicate of the memfd, but none of its pages.
            wait_until(lambda: memfd_bytes(home) == 0, "the written pages to be released")
            assert "event=flight.upload_stalled" in home.log()
        finally:
            uploader.kill()
            uploader.communicate()
        wait_until(lambda: home.memfds() == memfds, "no memfd left once the client is gone")
