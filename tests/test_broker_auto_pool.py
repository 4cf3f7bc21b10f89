"""`put_bytes` and `put_object` through the broker: small payloads inside the request, larger
ones from an automatic pool, whose slot is reused once the blob is freed, and whose blob
outlives a producer that exits or is killed."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blobplane import AutoPool, default_auto_pool
from blobplane.auto_pool import slot_class
from blobplane.broker.protocol import MAX_INLINE_PUT
from blobplane.client import connect_broker, connect_broker_async
from brokers import Broker, read_line, running_broker, spawn, wait_until

pytestmark = pytest.mark.usefixtures("no_leaks")

MIB = 1 << 20

PRODUCER = """
import os, signal, sys
from blobplane.client import connect_broker
path, how = sys.argv[1:3]
client = connect_broker(path)
entry = client.put_bytes(bytes(range(256)) * 8192, key="kept")  # 2 MiB
print(entry.pooled, flush=True)
if how == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "unclosed":
    sys.exit(0)  # the interpreter's exit closes the connection
if how == "forked":
    # A child that lives on after its parent went.
    pid = os.fork()
    if pid == 0:
        os.closerange(1, 65536)  # the connection too: only the mapping stays
        signal.pause()
    print(pid, flush=True)
    os._exit(0)
client.close()
"""


def digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("how", ["exits", "killed", "unclosed"])
def test_a_pooled_put_stays_published_after_its_producer_goes(how: str) -> None:
    expected = digest(bytes(range(256)) * 8192)
    with running_broker() as broker, connect_broker(broker.socket_path) as reader:
        producer = spawn(PRODUCER, broker.socket_path, how)
        assert read_line(producer) == "True"  # it went in a slot of the producer's pool
        producer.wait(timeout=30)
        assert producer.returncode == (-signal.SIGKILL if how == "killed" else 0)
        wait_until(lambda: reader.stats().clients == 1, "the producer's disconnection")
        # The broker took the memory over: a blob like any other, still counted.
        stats = reader.stats()
        assert (stats.blobs, stats.pooled, stats.pooled_bytes) == (1, 0, 0)
        assert stats.bytes >= 2 * MIB
        # And sealed against every write: nobody maps it writable any more.
        (seals,) = memfd_seals(broker)
        assert seals & fcntl.F_SEAL_WRITE
        with reader.get("kept") as read, read.as_slice() as view:
            assert digest(view) == expected
            assert read.entry.pooled is False
        reader.delete("kept")
        wait_until(lambda: reader.stats().blobs == 0, "the blob to be freed")


def test_a_pooled_put_stays_published_after_its_client_is_dropped_unclosed() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as reader:
        producer = connect_broker(broker.socket_path)
        assert producer.put_bytes(bytes(range(256)) * 8192, key="dropped").pooled
        del producer
        gc.collect()  # its slots unmapped, then its connection closed
        wait_until(lambda: reader.stats().clients == 1, "the producer's disconnection")
        (seals,) = memfd_seals(broker)
        assert seals & fcntl.F_SEAL_WRITE
        with reader.get("dropped") as read, read.as_slice() as view:
            assert view == bytes(range(256)) * 8192
        reader.delete("dropped")
        wait_until(lambda: reader.stats().blobs == 0, "the blob to be freed")


def memfd_seals(broker: Broker) -> list[int]:
    """The seals of every memfd the broker holds."""
    seals = []
    for name in os.listdir(f"/proc/{broker.pid}/fd"):
        path = f"/proc/{broker.pid}/fd/{name}"
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(path).startswith("/memfd:"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    seals.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
                finally:
                    os.close(fd)
    return seals


def test_a_child_forked_by_the_producer_does_not_keep_its_slots_from_the_broker() -> None:
    """The producer forked a child that lives on: the slots' mappings were not inherited
    (MADV_DONTFORK), so the broker still seals the blob against writes and keeps it."""
    with running_broker() as broker, connect_broker(broker.socket_path) as reader:
        producer = spawn(PRODUCER, broker.socket_path, "forked")
        assert read_line(producer) == "True"
        child = int(read_line(producer))
        try:
            producer.wait(timeout=30)
            wait_until(lambda: reader.stats().clients == 1, "the producer's disconnection")
            (seals,) = memfd_seals(broker)
            assert seals & fcntl.F_SEAL_WRITE
            with reader.get("kept") as read:
                assert len(read) == 2 * MIB
            reader.delete("kept")
            wait_until(lambda: reader.stats().blobs == 0, "the blob to be freed")
        finally:
            os.kill(child, signal.SIGKILL)


def test_a_slot_is_reused_once_the_broker_frees_its_blob() -> None:
    pool = AutoPool()
    with running_broker() as broker, connect_broker(broker.socket_path) as client:
        client.auto_pool = pool
        with connect_broker(broker.socket_path) as reader:
            for i in range(6):
                data = bytes([i]) * (3 * MIB)
                entry = client.put_bytes(data, key=f"k{i}")
                assert entry.pooled
                with reader.get(f"k{i}") as read, read.as_slice() as view:
                    assert view == data
                client.delete(f"k{i}")
                wait_until(lambda: client.stats().blobs == 0, "the blob to be freed")
        # Each put found the one slot back (SlotFree came before the next put).
        assert pool.slots == 1
    assert pool.slots == 0  # retired with the client: never loaned to anyone else
    pool.close()


def test_sealed_true_and_small_payloads_take_fresh_write_sealed_blobs() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as client:
        with pytest.raises(TypeError):
            client.auto_pool = 1 << 30  # type: ignore[assignment]
        client.auto_pool = pool = AutoPool()
        assert not client.put_bytes(b"x" * MIB, key="sealed", sealed=True).pooled
        assert not client.put_bytes(b"x" * 4096, key="small").pooled
        assert client.put_bytes(b"x" * MIB, key="pooled").pooled
        with client.get("sealed") as read:
            assert len(read) == MIB
        assert pool.slots == 1
    # The client closed with a pooled blob still published: the broker keeps it, and
    # the pool gave the slot away (never to be loaned again here).
    assert pool.slots == 0
    pool.close()


def test_objects_go_pooled_and_come_back_whole() -> None:
    array = np.arange(2_000_000, dtype=np.int64)
    with running_broker() as broker, connect_broker(broker.socket_path) as client:
        client.auto_pool = pool = AutoPool()
        assert client.put_object({"a": array}, key="obj").pooled
        assert not client.put_object({"a": array}, key="obj-sealed", sealed=True).pooled
        for key in ("obj", "obj-sealed"):
            got = client.get_object(key, timeout=10)
            assert int(got["a"].sum()) == int(array.sum())
            del got
        for key in ("obj", "obj-sealed"):
            client.delete(key)
    pool.close()


def test_the_asyncio_client_puts_from_its_pool_too() -> None:
    async def main(path: str) -> None:
        async with await connect_broker_async(path) as client:
            client.auto_pool = pool = AutoPool()
            entry = await client.put_bytes(b"y" * (2 * MIB), key="async")
            assert entry.pooled
            with await client.get("async") as read:
                assert len(read) == 2 * MIB
            await client.delete("async")
        pool.close()

    with running_broker() as broker:
        asyncio.run(main(broker.socket_path))


def test_a_spilled_pooled_blob_gives_its_slot_back_and_reads_back_whole(tmp_path: Path) -> None:
    from test_broker_spill import spilling_broker

    pool = AutoPool()
    payloads = {f"k{i}": bytes([i + 1]) * (4 * MIB) for i in range(3)}
    with (
        spilling_broker(tmp_path / "spill", "10MiB") as broker,
        connect_broker(broker.socket_path) as client,
    ):
        client.auto_pool = pool
        for key, data in payloads.items():
            assert client.put_bytes(data, key=key).pooled
        # The first went to disk to make room for the third; once written out, its
        # slot is the producer's again (SlotFree), and the blob the broker's.
        wait_until(
            lambda: (
                {e.key: e.state for e in client.list()}["k0"] == "spilled"
                and pool.shrink(0) == slot_class(4 * MIB)
            ),
            "the spilled blob's slot to come back",
        )
        for key, data in payloads.items():
            with client.get(key) as read, read.as_slice() as view:
                assert view == data, key
            client.delete(key)
        wait_until(lambda: client.stats().blobs == 0, "the blobs to be freed")
    pool.close()


@pytest.mark.parametrize("size", [0, 1, 4096, MAX_INLINE_PUT, MAX_INLINE_PUT + 1])
def test_a_small_put_carries_its_bytes_and_the_broker_seals_them(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    with running_broker() as broker, connect_broker(broker.socket_path) as client:
        entry = client.put_bytes(data, key="small")
        assert not entry.pooled
        assert entry.size == size
        if size:
            (seals,) = memfd_seals(broker)  # the broker's memfd, sealed against writes
            assert seals & fcntl.F_SEAL_WRITE
        with client.get("small") as read, read.as_slice() as view:
            assert view == data
        client.delete("small")
        wait_until(lambda: client.stats().blobs == 0, "the blob to be freed")
        assert broker.memfds() == 0


def test_a_client_pools_by_default_and_not_when_told_not_to() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as client:
        assert client.auto_pool is default_auto_pool()
        assert client.put_bytes(bytes(MIB), key="pooled").pooled
        client.auto_pool = None
        assert not client.put_bytes(bytes(MIB), key="fresh").pooled


def test_a_slot_a_token_holder_got_is_closed_not_reused() -> None:
    """A reader with a per-blob token may keep the mapping: the slot never carries the next
    blob (with readers for good alone, it would: see the reuse test above)."""
    first, second = b"\x01" * (2 * MIB), b"\x02" * (2 * MIB)
    pool = AutoPool()
    with running_broker() as broker, connect_broker(broker.socket_path) as producer:
        producer.auto_pool = pool
        entry = producer.put_bytes(first, key="first")
        token = producer.mint_read_token("first", ttl=60)
        with connect_broker(broker.socket_path, token=token) as sandbox:
            read = sandbox.get("first")
            kept = read.as_slice()  # released below, but still mapped
            read.close()
            producer.delete(entry.blob_id)
            wait_until(lambda: (producer.pump(), pool.slots)[1] == 0, "the slot to be closed")
            assert producer.put_bytes(second, key="second").pooled  # in a slot made anew
            assert pool.slots == 1
            with producer.get("second") as again, again.as_slice() as view:
                assert view == second
            assert kept == first  # what the token holder kept never changed
            kept.release()
        producer.delete("second")
    pool.close()


def test_a_put_whose_slot_finds_no_room_at_the_broker_goes_in_a_fresh_blob() -> None:
    data = bytes(range(256)) * (MIB // 256) + b"!"  # its slot: a quarter larger
    assert slot_class(len(data)) > 1100 * 1024
    with (
        running_broker("--memory-limit", "1100KiB") as broker,
        connect_broker(broker.socket_path) as client,
    ):
        entry = client.put_bytes(data, key="tight")
        assert not entry.pooled
        with client.get("tight") as read, read.as_slice() as view:
            assert view == data
        client.delete("tight")


def test_a_pooled_put_whose_caller_stopped_waiting_keeps_its_slot_from_the_next_put() -> None:
    """Cancelled after it was sent, the put may be published all the same: its slot is the
    broker's until the answer says otherwise, so the next put takes another slot."""
    first, second = b"\x01" * (2 * MIB), b"\x02" * (2 * MIB)

    async def main(path: str) -> None:
        async with await connect_broker_async(path) as client:
            client.auto_pool = pool = AutoPool()
            putting = asyncio.create_task(client.put_bytes(first, key="first"))
            while not pool.slots:  # the slot is made and filled, the put on its way
                await asyncio.sleep(0)
            putting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await putting
            await client.put_bytes(second, key="second")
            assert pool.slots == 2
            for key, data in (("first", first), ("second", second)):
                with await client.get(key) as read, read.as_slice() as view:
                    assert view == data, key
                await client.delete(key)
            # Both answers were taken in: both slots come back.
            while pool.shrink(0) < 2 * slot_class(2 * MIB) and pool.slots:
                await asyncio.sleep(0.01)
            assert pool.slots == 0
        pool.close()

    with running_broker() as broker:
        asyncio.run(asyncio.wait_for(main(broker.socket_path), 30))


def test_a_slot_freed_right_behind_its_put_s_answer_comes_back() -> None:
    """The blob is deleted (by another client) the moment it is published, so the broker's
    SlotFree follows its answer at once, and the asyncio client reads both in one go."""

    def delete_when_there(path: str) -> None:
        with connect_broker(path) as other:
            wait_until(lambda: "k" in {entry.key for entry in other.list()}, "the put")
            other.delete("k")

    async def main(path: str) -> None:
        async with await connect_broker_async(path) as client:
            client.auto_pool = pool = AutoPool()
            deleting = threading.Thread(target=delete_when_there, args=(path,))
            deleting.start()
            putting = asyncio.create_task(client.put_bytes(b"\x01" * (2 * MIB), key="k"))
            while not pool.slots:
                await asyncio.sleep(0)
            for _ in range(3):  # the put goes out
                await asyncio.sleep(0)
            # The loop kept busy meanwhile: the answer and the SlotFree are read together.
            deleting.join(10)
            time.sleep(0.2)
            assert (await putting).pooled
            freed = 0
            for _ in range(500):
                freed = pool.shrink(0)
                if freed:
                    break
                await asyncio.sleep(0.01)
            assert freed == slot_class(2 * MIB)  # the slot came back, free
        pool.close()

    with running_broker() as broker:
        asyncio.run(asyncio.wait_for(main(broker.socket_path), 30))
