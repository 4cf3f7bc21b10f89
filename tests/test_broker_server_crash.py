"""Crash cleanup: clients killed with SIGKILL at the worst moment, and a broker killed outright."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import uuid

import pytest

from blobplane import BlobPool
from blobplane.backends.private_dir import SHM_ROOT, shm_root, temp_root
from blobplane.broker.tokens import TokenAuthority, load_key
from blobplane.client import BrokerClient, connect_broker, connect_broker_async
from blobplane.errors import BlobError, BlobNotFound, ConnectionClosed
from brokers import DEADLINE_S, broker_folder, read_line, running_broker, spawn, start, wait_until
from leaks import blob_mappings

pytestmark = pytest.mark.timeout(60)


def _shm_and_private_files() -> set[str]:
    """What blobplane could have left behind on disk or in /dev/shm."""
    found = set()
    for folder in (SHM_ROOT, shm_root(), temp_root()):
        try:
            found |= {f"{folder}/{name}" for name in os.listdir(folder)}
        except FileNotFoundError:
            continue
    return {name for name in found if "blobplane" in name}


def test_a_producer_killed_after_create_before_seal() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as watcher:
        memfds = broker.memfds()
        producer = spawn(
            """
            import sys, time
            from blobplane.client import connect_broker
            broker = connect_broker(sys.argv[1])
            blob = broker.create(1 << 20, key="doomed")
            blob.buffer[:5] = b"half-"
            print(blob.id, flush=True)
            time.sleep(600)
            """,
            broker.socket_path,
        )
        blob_id = uuid.UUID(read_line(producer))
        stats = watcher.stats()
        assert stats.allocated == 1
        assert stats.bytes == 1 << 20
        assert broker.memfds() == memfds + 1
        outcome: list[BaseException] = []

        def consume() -> None:
            with connect_broker(broker.socket_path) as consumer:
                try:
                    consumer.get(blob_id, timeout=DEADLINE_S)
                except BlobError as exc:
                    outcome.append(exc)

        waiting = threading.Thread(target=consume)
        waiting.start()
        wait_until(lambda: watcher.stats().waiting_gets == 1, "the consumer's get to wait")
        producer.send_signal(signal.SIGKILL)
        producer.communicate(timeout=DEADLINE_S)
        waiting.join(DEADLINE_S)
        assert len(outcome) == 1
        assert isinstance(outcome[0], BlobNotFound)  # woken at once, not at its timeout
        stats = watcher.stats()
        assert (stats.allocated, stats.blobs, stats.bytes) == (0, 0, 0)
        assert broker.memfds() == memfds
        assert re.search(
            rf"event=blob\.evicted blob={blob_id} key=doomed .*reason=abandoned", broker.log()
        )
        with pytest.raises(BlobNotFound):
            watcher.get("doomed")


def test_a_consumer_killed_while_holding_references() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as producer:
        keys = [f"held-{index}" for index in range(3)]
        for name in keys:
            producer.put_bytes(os.urandom(4096), key=name)
        consumer = spawn(
            """
            import sys, time
            from blobplane.client import connect_broker
            broker = connect_broker(sys.argv[1])
            held = [broker.get(key) for key in sys.argv[2:]]
            held.append(broker.get(sys.argv[2]))  # two references to one blob
            print("holding", flush=True)
            time.sleep(600)
            """,
            broker.socket_path,
            *keys,
        )
        assert read_line(consumer) == "holding"
        assert producer.stats().references == 4
        producer.delete(keys[0])  # withdrawn, but held: it stays until the consumer lets go
        assert producer.stats().deleted == 1
        consumer.send_signal(signal.SIGKILL)
        consumer.communicate(timeout=DEADLINE_S)
        wait_until(lambda: producer.stats().references == 0, "the dead consumer's references")
        stats = producer.stats()
        assert (stats.deleted, stats.sealed, stats.blobs) == (0, 2, 2)
        for name in keys[1:]:
            producer.delete(name)
        assert broker.memfds() == 0


def test_a_broker_killed_and_restarted_leaves_nothing_behind() -> None:
    before = _shm_and_private_files()
    with broker_folder() as folder:
        broker = start(folder, "--require-token")
        token = TokenAuthority(load_key(broker.key_path)).mint("all", ttl=600)
        with connect_broker(broker.socket_path, token=token) as client:
            for index in range(3):
                client.put_bytes(os.urandom(1 << 20), key=f"blob-{index}")
            unfinished = client.create(1 << 20, key="unfinished")
            reading = client.get("blob-0")
            broker.handle.process.send_signal(signal.SIGKILL)
            assert broker.handle.process.wait(DEADLINE_S) == -signal.SIGKILL
            with pytest.raises(ConnectionClosed):
                client.stats()
            # What this process mapped before the crash stays readable: memfd semantics.
            assert len(reading.as_slice()) == 1 << 20
            reading.close()  # its release goes nowhere, quietly
            unfinished.close()
        assert os.path.exists(broker.socket_path)  # stale: nobody listens there any more
        assert _shm_and_private_files() == before

        again = start(folder, "--require-token")  # clears the stale socket
        try:
            with connect_broker(again.socket_path, token=token) as client:  # the key outlives it
                assert client.list() == []
                assert client.stats().bytes == 0
        finally:
            assert again.stop() == 0
        assert not os.path.exists(again.socket_path)
        assert sorted(os.listdir(folder)) == ["b.sock.key", "b.sock.log"]
    assert _shm_and_private_files() == before


def test_a_client_waiting_on_a_broker_that_dies_is_told() -> None:
    with broker_folder() as folder:
        broker = start(folder)
        outcome: list[BaseException] = []

        def wait_for_nothing() -> None:
            with connect_broker(broker.socket_path) as client:
                try:
                    client.get("never published", timeout=DEADLINE_S)
                except BlobError as exc:
                    outcome.append(exc)

        try:
            waiting = threading.Thread(target=wait_for_nothing)
            with connect_broker(broker.socket_path) as watcher:
                waiting.start()
                wait_until(lambda: watcher.stats().waiting_gets == 1, "the get to wait")
            broker.handle.process.kill()
            waiting.join(DEADLINE_S)
            assert len(outcome) == 1
            assert isinstance(outcome[0], ConnectionClosed)
        finally:
            broker.stop()


def test_a_killed_producer_s_slots_leave_the_readers_caches() -> None:
    """Readers keep pool slots mapped for later gets; a producer that dies takes them along."""
    with (
        running_broker() as broker,
        connect_broker(broker.socket_path) as reader,
        connect_broker(broker.socket_path) as bystander,
    ):
        mapped_before = blob_mappings()
        producer = spawn(
            """
            import sys, time
            from blobplane import BlobPool
            from blobplane.client import connect_broker
            broker = connect_broker(sys.argv[1])
            pool = BlobPool(64 * 1024, 2)
            for index in range(2):
                loan = broker.loan(pool, timeout=10)
                loan.write_all(b"slot %d" % index)
                broker.put_pooled(loan, key=f"slot-{index}")
            print("published", flush=True)
            time.sleep(600)
            """,
            broker.socket_path,
        )
        assert read_line(producer) == "published"
        for index in range(2):
            with reader.get(f"slot-{index}") as read:
                assert bytes(read.as_slice()[:6]) == b"slot %d" % index
        assert len(reader._core.slots) == 2
        assert blob_mappings() == mapped_before + 2  # kept for the next get of each slot
        producer.send_signal(signal.SIGKILL)
        producer.communicate(timeout=DEADLINE_S)
        wait_until(lambda: reader.pump(0.05) > 0 and not reader._core.slots, "ProducerGone")
        assert blob_mappings() == mapped_before
        assert bystander.pump(0.2) == 0  # told only if it got the producer's slots
        assert broker.memfds() == 0


def test_an_async_reader_keeps_no_slot_of_a_producer_gone_while_it_got_it() -> None:
    """The asyncio client's reader may take in `ProducerGone` before the task of a get it
    answered maps the slot: that slot is used once, not kept."""

    async def scenario(path: str, watcher: BrokerClient) -> None:
        reader = await connect_broker_async(path)
        try:
            with BlobPool(64 * 1024, 1) as pool:
                with connect_broker(path) as producer:
                    with producer.loan(pool, timeout=DEADLINE_S) as loan:
                        loan.write_all(b"slot")
                        producer.put_pooled(loan, key="slot")
                    mapped_before = blob_mappings()
                    got = asyncio.create_task(reader.get("slot"))
                    await asyncio.sleep(0)  # the get goes out; its task awaits the reply
                    # The loop is held from here on, so the reply and the notice both wait
                    # in the reader's socket and its reader takes them in one turn.
                    wait_until(lambda: watcher.stats().references == 1, "the get's answer")
                wait_until(lambda: watcher.stats().clients == 2, "the producer's end")
                with await got as read:
                    assert bytes(read.as_slice()[:4]) == b"slot"
                assert len(reader._core.slots) == 0
                assert blob_mappings() == mapped_before
        finally:
            await reader.aclose()

    with running_broker() as broker, connect_broker(broker.socket_path) as watcher:
        asyncio.run(scenario(broker.socket_path, watcher))
