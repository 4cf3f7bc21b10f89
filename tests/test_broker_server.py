"""Every broker operation, against a real `blobplane serve` process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from collections.abc import Iterator

import pytest

from blobplane import BlobBackend, BlobPool, SharedMemoryBlobs
from blobplane.broker.server import default_memory_limit
from blobplane.client import BrokerClient, connect_broker, connect_broker_async
from blobplane.errors import (
    BlobDeleted,
    BlobNotFound,
    BrokerShutdown,
    InvalidKey,
    InvalidSize,
    KeyInUse,
    NotHolding,
    NotSendable,
    RightMissing,
    Timeout,
)
from brokers import Broker, running_broker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker() as running:
        yield running


@pytest.fixture
def client(broker: Broker) -> Iterator[BrokerClient]:
    with connect_broker(broker.socket_path, name="test") as connected:
        yield connected
    # Whatever a test got, it released.
    with connect_broker(broker.socket_path) as checker:
        wait_until(lambda: checker.stats().references == 0, "every reference to be released")


def key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def test_the_broker_says_ready_and_logs_key_value_lines(broker: Broker) -> None:
    with connect_broker(broker.socket_path, name="log check"):
        pass
    log = broker.log()
    assert re.search(r"^ts=\S+Z level=info event=broker\.started socket=\S+ pid=\d+", log, re.M)
    assert re.search(r'event=client\.connected client=\d+ pid=\d+ uid=\d+ name="log check"', log)
    wait_until(lambda: "event=client.disconnected" in broker.log(), "the disconnect's log line")


def test_put_bytes_then_get_by_key_and_by_id(client: BrokerClient) -> None:
    name = key()
    entry = client.put_bytes(b"hello broker", key=name)
    assert (entry.key, entry.size, entry.state, entry.references) == (name, 12, "sealed", 0)
    with client.get(name) as by_key, client.get(entry.blob_id) as by_id:
        assert bytes(by_key.as_slice()) == bytes(by_id.as_slice()) == b"hello broker"
        assert by_key.id == entry.blob_id
        assert by_key.key == name
        assert by_key.token.size == 12
        assert client.renew(name, None).references == 2
        with pytest.raises(TypeError):
            by_key.as_slice()[0] = 0  # read-only
    assert client.renew(name, None).references == 0
    client.delete(name)


def test_create_fill_seal_get(client: BrokerClient) -> None:
    name = key()
    with client.create(1 << 20, key=name) as blob:
        assert client.renew(name, None).state == "allocated"
        with blob.buffer as view:
            view[:4] = b"head"
            view[-4:] = b"tail"
        blob.write_all(b"middle", offset=500_000)
        blob.seal()
    with client.get(name) as mapped, mapped.as_slice() as view:
        assert len(view) == 1 << 20
        assert (bytes(view[:4]), bytes(view[-4:])) == (b"head", b"tail")
        assert bytes(view[500_000:500_006]) == b"middle"
    client.delete(name)


def test_a_zero_byte_blob(client: BrokerClient) -> None:
    entry = client.put_bytes(b"")
    with client.get(entry.blob_id) as mapped:
        assert len(mapped) == 0
        assert bytes(mapped.as_slice()) == b""
    client.delete(entry.blob_id)


def test_a_get_waits_for_the_seal(broker: Broker) -> None:
    async def scenario() -> None:
        producer = await connect_broker_async(broker.socket_path)
        consumer = await connect_broker_async(broker.socket_path)
        async with producer, consumer:
            blob = await producer.create(4096, key=key())
            with pytest.raises(Timeout, match="not sealed yet"):
                await consumer.get(blob.id, timeout=0)
            waiting = asyncio.create_task(consumer.get(blob.id, timeout=10))
            while (await producer.stats()).waiting_gets == 0:
                await asyncio.sleep(0.005)
            blob.write_all(b"sealed!")
            await blob.seal()
            with await waiting as mapped:
                assert bytes(mapped.as_slice()[:7]) == b"sealed!"
            blob.close()
            await producer.delete(blob.id)

    asyncio.run(scenario())


def test_a_get_with_a_timeout_waits_for_a_key_to_appear(broker: Broker) -> None:
    name = key()

    async def scenario() -> None:
        producer = await connect_broker_async(broker.socket_path)
        consumer = await connect_broker_async(broker.socket_path)
        async with producer, consumer:
            waiting = asyncio.create_task(consumer.get(name, timeout=10))
            while (await producer.stats()).waiting_gets == 0:
                await asyncio.sleep(0.005)
            await producer.put_bytes(b"arrived", key=name)
            with await waiting as mapped:
                assert bytes(mapped.as_slice()) == b"arrived"
            await producer.delete(name)

    asyncio.run(scenario())


def test_get_timeouts_and_missing_keys(client: BrokerClient) -> None:
    with pytest.raises(BlobNotFound, match="no live blob has the key"):
        client.get(key())  # no timeout: a missing key is an error at once
    with pytest.raises(Timeout, match="appeared within"):
        client.get(key(), timeout=0.1)
    with client.create(10) as blob, pytest.raises(Timeout, match="was not sealed within"):
        client.get(blob.id, timeout=0.1)
    assert client.stats().waiting_gets == 0


def test_put_of_a_blob_the_client_sealed_itself(client: BrokerClient) -> None:
    with SharedMemoryBlobs(BlobBackend.MEMFD) as blobs:
        blob = blobs.create(8192)
        blob.write_all(b"mine")
        blob.seal()
        entry = client.put(blob, key=key(), lease_ms=60_000)
        blob.cleanup()  # the broker holds its own fd
    assert entry.lease_ms == 60_000
    assert 0 < (entry.expires_in_ms or 0) <= 60_000
    with client.get(entry.blob_id) as mapped:
        assert bytes(mapped.as_slice()[:4]) == b"mine"
    client.delete(entry.blob_id)


def test_put_refuses_unsealed_and_file_blobs_before_sending(client: BrokerClient) -> None:
    with (
        SharedMemoryBlobs(BlobBackend.MEMFD) as blobs,
        blobs.create(10) as blob,
        pytest.raises(NotSendable, match="not sealed"),
    ):
        client.put(blob)
    with SharedMemoryBlobs(BlobBackend.TEMP_FILE) as files, files.create(10) as blob:
        blob.seal()
        with pytest.raises(NotSendable, match="memfd blobs only"):
            client.put(blob)


def test_delete_withdraws_but_readers_keep_reading(client: BrokerClient) -> None:
    name = key()
    entry = client.put_bytes(b"still here", key=name)
    held = client.get(name)
    client.delete(name)
    with pytest.raises(BlobNotFound):
        client.get(name)
    with pytest.raises(BlobDeleted):
        client.get(entry.blob_id)
    (listed,) = [e for e in client.list(include_deleted=True) if e.id == entry.id]
    assert (listed.state, listed.references, listed.key) == ("deleted", 1, name)
    assert entry.id not in {e.id for e in client.list()}
    assert bytes(held.as_slice()) == b"still here"
    held.close()
    wait_until(
        lambda: entry.id not in {e.id for e in client.list(include_deleted=True)},
        "the deleted blob to be freed with its last reference",
    )
    client.put_bytes(b"the key is free again", key=name)
    client.delete(name)


def test_release_and_its_mistakes(client: BrokerClient) -> None:
    entry = client.put_bytes(b"x", key=key())
    first, second = client.get(entry.blob_id), client.get(entry.blob_id)
    assert client.renew(entry.blob_id, None).references == 2
    client.release(entry.blob_id)
    assert client.renew(entry.blob_id, None).references == 1
    first.close()  # its release is refused quietly: the reference was given back already
    second.close()
    wait_until(lambda: client.renew(entry.blob_id, None).references == 0, "references 0")
    with pytest.raises(NotHolding, match="holds no reference"):
        client.release(entry.blob_id)
    client.delete(entry.blob_id)
    with pytest.raises(BlobNotFound):
        client.release(uuid.uuid4())


def test_keys_are_unique_among_live_blobs(client: BrokerClient) -> None:
    name = key()
    client.put_bytes(b"a", key=name)
    with pytest.raises(KeyInUse, match="already names"):
        client.put_bytes(b"b", key=name)
    with pytest.raises(KeyInUse):
        client.create(1, key=name)
    client.delete(name)
    with pytest.raises(InvalidKey):
        client.put_bytes(b"c", key="\0")
    with pytest.raises(InvalidSize):
        client.put_bytes(b"c", lease_ms=0)


def test_leases_expire_on_the_brokers_timer(broker: Broker, client: BrokerClient) -> None:
    before = client.stats().expirations
    short = client.put_bytes(b"short", key=key(), lease_ms=150)
    kept = client.put_bytes(b"kept", key=key(), lease_ms=150)
    assert client.renew(kept.blob_id, None).expires_in_ms is None
    held = client.put_bytes(b"held", key=key(), lease_ms=150)
    reading = client.get(held.blob_id)
    wait_until(lambda: client.stats().expirations >= before + 2, "two leases to run out")
    live = {e.id: e for e in client.list(include_deleted=True)}
    assert short.id not in live
    assert live[kept.id].state == "sealed"
    assert live[held.id].state == "deleted"  # withdrawn, but its reader keeps it
    with pytest.raises(BlobDeleted):
        client.get(held.blob_id)
    assert bytes(reading.as_slice()) == b"held"
    reading.close()
    client.delete(kept.blob_id)
    assert re.search(rf"event=blob\.evicted blob={short.id} .*reason=lease-expired", broker.log())
    # A blob being filled whose lease runs out is freed, and its seal refused.
    with client.create(10, lease_ms=100) as blob:
        wait_until(lambda: blob.id.uuid not in {e.id for e in client.list()}, "the lease")
        with pytest.raises(BlobNotFound):
            blob.seal()


def test_a_listing_larger_than_a_frame_comes_in_parts(client: BrokerClient) -> None:
    prefix = key()
    names = [f"{prefix}-{index:04d}-" + "x" * 900 for index in range(80)]
    for name in names:
        client.put_bytes(b"", key=name)
    listed = [e.key for e in client.list() if e.key and e.key.startswith(prefix)]
    assert listed == names  # 80 keys of 900+ bytes: two parts at least, in order
    for name in names:
        client.delete(name)


def test_stats(client: BrokerClient, broker: Broker) -> None:
    entry = client.put_bytes(b"12345", key=key())
    with client.get(entry.blob_id):
        stats = client.stats()
        assert stats.pid == broker.pid
        assert stats.clients >= 1
        assert stats.sealed >= 1
        assert stats.references >= 1
        assert stats.bytes >= 5
        assert stats.memory_limit == default_memory_limit()  # never unlimited
        assert stats.open_fds >= len(broker.fds()) - 1
        assert not stats.token_required
    client.delete(entry.blob_id)


def test_a_pooled_slot_comes_back_when_withdrawn_and_released(broker: Broker) -> None:
    with (
        BlobPool(4096, 2) as pool,
        connect_broker(broker.socket_path) as producer,
        connect_broker(broker.socket_path) as consumer,
    ):
        loan = pool.loan()
        loan.write_all(b"frame 1")
        loan.set_length(7)
        entry = producer.put_pooled(loan, key=key())
        loan.close()  # the slot stays out of the pool: the broker publishes it
        assert entry.pooled
        assert entry.size == 7
        assert pool.free_slots == 1
        reader = consumer.get(entry.key or "")
        producer.delete(entry.blob_id)
        assert producer.pump(timeout=0.05) == 0
        assert pool.free_slots == 1
        assert bytes(reader.as_slice()) == b"frame 1"
        reader.close()
        # Both slots: the free one, then the one the broker gives back.
        second = producer.loan(pool, timeout=10)
        third = producer.loan(pool, timeout=10)
        assert {second.slot, third.slot} == {0, 1}
        second.close()
        third.close()


def test_pooled_slots_of_a_producer_that_leaves_are_withdrawn(broker: Broker) -> None:
    with BlobPool(4096, 1) as pool, connect_broker(broker.socket_path) as consumer:
        with connect_broker(broker.socket_path) as producer, pool.loan() as loan:
            loan.write_all(b"bye")
            entry = producer.put_pooled(loan, key=key())
            reader = consumer.get(entry.blob_id)
        wait_until(
            lambda: entry.id not in {e.id for e in consumer.list()}, "the slot to be withdrawn"
        )
        assert bytes(reader.as_slice()[:3]) == b"bye"
        reader.close()
        # The producer left without hearing the slot came back: it stays out of the pool.
        assert pool.free_slots == 0


def test_a_read_token_lets_its_bearer_get_one_blob(broker: Broker, client: BrokerClient) -> None:
    one = client.put_bytes(b"for you", key=key())
    other = client.put_bytes(b"not for you", key=key())
    token = client.mint_read_token(one.key or "", ttl=60)
    with connect_broker(broker.socket_path, token=token) as sandboxed:
        assert sandboxed.welcome.rights == ("get",)
        assert sandboxed.welcome.blob == one.id
        with sandboxed.get(one.blob_id) as mapped:
            assert bytes(mapped.as_slice()) == b"for you"
        with pytest.raises(RightMissing, match="only"):
            sandboxed.get(other.blob_id)
        with pytest.raises(RightMissing):
            sandboxed.list()
        with pytest.raises(RightMissing):
            sandboxed.put_bytes(b"no")
    client.delete(one.blob_id)
    client.delete(other.blob_id)


def test_sigterm_answers_waiting_gets_and_removes_the_socket() -> None:
    with running_broker() as broker:

        async def scenario() -> None:
            consumer = await connect_broker_async(broker.socket_path)
            async with consumer:
                waiting = asyncio.create_task(consumer.get(key(), timeout=30))
                while (await consumer.stats()).waiting_gets == 0:
                    await asyncio.sleep(0.005)
                os.kill(broker.pid, signal.SIGTERM)
                with pytest.raises(BrokerShutdown, match="shutting down"):
                    await waiting

        asyncio.run(scenario())
        assert broker.handle.process.wait(10) == 0
        assert "event=broker.stopped" in broker.log()
