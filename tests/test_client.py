"""The broker clients: handles, lifetimes, errors, and the asyncio flavour's concurrency."""

from __future__ import annotations

import asyncio
import gc
import os
import select
import uuid
from collections.abc import Iterator

import pytest

from blobplane import BlobPool
from blobplane.broker.protocol import BlobEntry, BlobReply, Create, Get, Refused, Request, SlotFree
from blobplane.client import (
    BrokerClient,
    connect_broker,
    connect_broker_async,
    raise_refusal,
)
from blobplane.client.core import Call, ClientCore
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    BlobError,
    BlobNotFound,
    BlobSealed,
    ConnectionRefused,
    InvalidKey,
    InvalidSize,
    KeyInUse,
    NotSealed,
    OutOfBounds,
    PeerRefused,
    Timeout,
)
from blobplane.slot_cache import SlotCache
from brokers import Broker, broker_folder, running_broker, wait_until
from leaks import blob_mappings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker() as running:
        yield running


@pytest.fixture
def client(broker: Broker, no_leaks: None) -> Iterator[BrokerClient]:
    with connect_broker(broker.socket_path) as connected:
        yield connected
        wait_until(lambda: connected.stats().references == 0, "the test's references to go")
        assert connected.stats().allocated == 0


def key() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def test_no_broker_says_how_to_start_one() -> None:
    with broker_folder() as folder, pytest.raises(ConnectionRefused, match="blobplane serve"):
        connect_broker(os.path.join(folder, "nobody.sock"))


def test_the_environment_names_the_socket(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOBPLANE_BROKER", broker.socket_path)
    with connect_broker() as client:
        assert client.welcome.client > 0
        assert not client.welcome.token_required


def test_a_created_blob_that_is_never_sealed_is_deleted(client: BrokerClient) -> None:
    name = key()
    with client.create(4096, key=name) as blob:
        blob.write_all(b"draft")
    assert blob.closed
    with pytest.raises(BlobNotFound):
        client.get(name)
    with pytest.raises(RuntimeError), client.create(4096, key=name):
        raise RuntimeError("the producer failed half way")
    wait_until(lambda: client.stats().allocated == 0, "the abandoned blob to go")


def test_a_writable_handle(client: BrokerClient) -> None:
    blob = client.create(16, key=key())
    view = blob.buffer
    view[:3] = b"abc"
    with pytest.raises(BlobBusy, match="views"):
        blob.seal()
    view.release()
    with pytest.raises(OutOfBounds):
        blob.write_all(b"x" * 17)
    with pytest.raises(OutOfBounds):
        blob.write_all(b"x", offset=-1)
    blob.seal()
    blob.seal()  # twice is fine
    assert blob.sealed
    with pytest.raises(BlobSealed):
        blob.write_all(b"late")
    with pytest.raises(BlobSealed):
        _ = blob.buffer
    blob.close()
    blob.close()
    with pytest.raises(BlobClosed):
        _ = blob.buffer
    with client.get(blob.id) as mapped:  # a sealed blob stays published after close
        assert bytes(mapped.as_slice()[:3]) == b"abc"
    client.delete(blob.id)


def test_views_outlive_the_read_and_its_reference(client: BrokerClient) -> None:
    entry = client.put_bytes(b"kept alive", key=key())
    mapped = client.get(entry.blob_id)
    view = mapped.as_slice()
    mapped.close()
    mapped.close()
    client.delete(entry.blob_id)
    wait_until(lambda: client.stats().blobs == 0, "the blob to be freed at the broker")
    assert bytes(view) == b"kept alive"  # the mapping keeps the memory
    with pytest.raises(BlobClosed):
        mapped.as_slice()
    view.release()


def test_a_read_dropped_without_close_gives_its_reference_back(client: BrokerClient) -> None:
    entry = client.put_bytes(b"forgotten", key=key())
    client.get(entry.blob_id)  # dropped at once
    gc.collect()
    wait_until(lambda: client.renew(entry.blob_id, None).references == 0, "the release")
    client.delete(entry.blob_id)


def test_argument_errors_are_raised_here_not_by_the_broker(client: BrokerClient) -> None:
    with pytest.raises(InvalidSize):
        client.create(-1)
    with pytest.raises(InvalidSize):
        client.put_bytes(b"x", lease_ms=-5)
    with pytest.raises(InvalidKey):
        client.put_bytes(b"x", key="")
    with pytest.raises(InvalidKey):
        client.get("k" * 2000)
    with pytest.raises(InvalidKey):
        client.get("\ud800")
    with pytest.raises(InvalidSize):
        client.get(key(), timeout=-1)
    with pytest.raises(BlobError, match="name a blob"):
        client.get(42)  # type: ignore[arg-type]
    assert client.stats().clients >= 1  # and the connection is still fine


def test_the_brokers_errors_arrive_as_themselves(client: BrokerClient) -> None:
    name = key()
    client.put_bytes(b"1", key=name)
    with pytest.raises(KeyInUse) as caught:
        client.put_bytes(b"2", key=name)
    assert "already names" in str(caught.value)
    client.delete(name)
    with pytest.raises(PeerRefused, match="NoSuchError") as unknown:
        raise_refusal(Refused(rid=3, error="NoSuchError", message="from a newer broker"))
    assert unknown.value.code == "NoSuchError"


def test_a_closed_client(broker: Broker) -> None:
    client = connect_broker(broker.socket_path)
    client.close()
    client.close()
    with pytest.raises(BlobClosed):
        client.stats()


def test_loan_times_out_when_no_slot_comes_back(client: BrokerClient) -> None:
    with BlobPool(4096, 1) as pool:
        loan = pool.loan()
        entry = client.put_pooled(loan, key=key())
        loan.close()
        with pytest.raises(Timeout, match="no slot"):
            client.loan(pool, timeout=0.05)
        client.delete(entry.blob_id)
        client.loan(pool, timeout=10).close()


def test_late_replies_are_undone() -> None:
    """A reply that comes after its caller gave up must not leak a reference or a blob."""
    posted: list[Request] = []
    core = ClientCore(posted.append)
    entry = BlobEntry(
        id=uuid.uuid4(),
        key=None,
        size=1,
        state="sealed",
        pooled=False,
        lease_ms=None,
        expires_in_ms=None,
        references=1,
        age_ms=0,
        idle_ms=0,
        account="a",
        owner=None,
    )
    read_fd, write_fd = os.pipe()
    core.abandon(Call(Get(rid=7, key="k")))
    core.unsolicited(BlobReply(rid=7, blob=entry), (read_fd,))
    core.abandon(Call(Create(rid=8, size=1)))
    core.unsolicited(BlobReply(rid=8, blob=entry), (write_fd,))
    assert [type(request).__name__ for request in posted] == ["Release", "Delete"]
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(read_fd)  # the late fds were closed
    core.unsolicited(SlotFree(id=uuid.uuid4()), ())  # a slot nobody waits for: ignored
    assert core.abandoned == {}


def test_a_pooled_slot_is_mapped_once_per_client(broker: Broker, no_leaks: None) -> None:
    """Gets of a slot already seen reuse its mapping: no new mmap, the new contents."""
    with (
        BlobPool(64 * 1024, 2) as pool,
        connect_broker(broker.socket_path) as producer,
        connect_broker(broker.socket_path) as consumer,
    ):
        mapped_before = blob_mappings()
        for round_no in range(3):
            # Both slots each round: a loan takes the slot freed last, so one at a
            # time would be the same slot every round.
            entries = []
            for frame in (2 * round_no, 2 * round_no + 1):
                with producer.loan(pool, timeout=10) as loan:
                    loan.write_all(frame.to_bytes(8, "little"))
                    entries.append((frame, producer.put_pooled(loan, key=key())))
            for frame, entry in entries:
                with consumer.get(entry.key or "") as read:
                    assert not read.owns_mapping
                    assert int.from_bytes(read.as_slice()[:8], "little") == frame
                producer.delete(entry.blob_id)
            # One mapping per slot, made the first time each slot came: none since.
            assert blob_mappings() == mapped_before + 2
        assert len(consumer._core.slots) == 2
        fresh_entry = producer.put_bytes(b"fresh")
        with consumer.get(fresh_entry.blob_id) as fresh:
            assert fresh.owns_mapping  # a fresh blob is mapped for this read only
        producer.delete(fresh_entry.blob_id)
        assert len(consumer._core.slots) == 2
        consumer.close()
        assert blob_mappings() == mapped_before  # closing the client unmapped its slots
        producer.pump(0.2)


def test_cached_slots_are_checked_bounded_and_never_unmapped_under_a_reader() -> None:
    with BlobPool(4096, 3) as pool:
        loans = [pool.loan() for _ in range(3)]
        slots = SlotCache(max_slots=2)
        first = slots.mapping(loans[0].fileno(), 4096)
        assert slots.mapping(loans[0].fileno(), 4096) is first  # same memfd: reused
        assert first is not None
        view = memoryview(first)
        slots.mapping(loans[1].fileno(), 4096)
        slots.mapping(loans[2].fileno(), 4096)
        assert len(slots) == 2  # the least recently used slot went
        assert slots.mapping(loans[0].fileno(), 4096) is not first  # mapped anew
        loans[0].write_all(b"still here")
        assert bytes(view[:10]) == b"still here"  # the dropped mapping lives on for its view
        view.release()
        slots.close()
        assert len(slots) == 0
        assert slots.bytes == 0
        for loan in loans:
            loan.close()
    unsealed = os.memfd_create("blobplane-test-unsealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(unsealed, 4096)
        with pytest.raises(NotSealed):
            SlotCache().mapping(unsealed, 4096)  # a slot is checked like recv_blob
    finally:
        os.close(unsealed)


# -- asyncio ------------------------------------------------------------------------------


def test_many_tasks_share_one_async_connection(broker: Broker, no_leaks: None) -> None:
    async def scenario() -> None:
        async with await connect_broker_async(broker.socket_path) as client:
            entries = await asyncio.gather(
                *(client.put_bytes(f"blob {index}".encode(), key=key()) for index in range(50))
            )
            reads = await asyncio.gather(*(client.get(entry.blob_id) for entry in entries))
            for index, mapped in enumerate(reads):
                assert bytes(mapped.as_slice()) == f"blob {index}".encode()
            assert (await client.stats()).references == 50
            for mapped in reads:
                mapped.close()
            listed = {e.id for e in await client.list()}
            assert {e.id for e in entries} <= listed
            await asyncio.gather(*(client.delete(entry.blob_id) for entry in entries))
            assert (await client.stats()).references == 0

    asyncio.run(scenario())


def test_an_async_writable_handle(broker: Broker, no_leaks: None) -> None:
    async def scenario() -> None:
        async with await connect_broker_async(broker.socket_path) as client:
            async with await client.create(8, key=key()) as blob:
                blob.write_all(b"async!")
                await blob.seal()
            with await client.get(blob.id) as mapped:
                assert bytes(mapped.as_slice()[:6]) == b"async!"
            await client.delete(blob.id)
            async with await client.create(8) as abandoned:
                pass
            with pytest.raises(BlobNotFound):
                await client.get(abandoned.id)

    asyncio.run(scenario())


def test_closing_an_async_client_wakes_its_waiting_calls(broker: Broker) -> None:
    async def scenario() -> None:
        client = await connect_broker_async(broker.socket_path)
        waiting = asyncio.create_task(client.get(key(), timeout=30))
        while (await client.stats()).waiting_gets == 0:
            await asyncio.sleep(0.005)
        await client.aclose()
        with pytest.raises(BlobClosed):
            await waiting
        with pytest.raises(BlobClosed):
            await client.stats()

    asyncio.run(scenario())


def test_a_cancelled_async_get_gives_back_what_comes_after_all(
    broker: Broker, no_leaks: None
) -> None:
    """The broker answers a parked get whose caller was cancelled: that reference goes back."""

    async def scenario() -> None:
        async with (
            await connect_broker_async(broker.socket_path) as producer,
            await connect_broker_async(broker.socket_path) as consumer,
        ):
            name = key()
            waiting = asyncio.create_task(consumer.get(name, timeout=30))
            while (await producer.stats()).waiting_gets == 0:
                await asyncio.sleep(0.005)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            entry = await producer.put_bytes(b"late", key=name)  # answers the parked get
            async with asyncio.timeout(10):
                while (await producer.stats()).references != 0:
                    await asyncio.sleep(0.005)
            assert consumer._core.abandoned == {}
            await producer.delete(entry.blob_id)

    asyncio.run(scenario())


def test_an_async_get_cancelled_after_its_reply_came_gives_it_back(
    broker: Broker, no_leaks: None
) -> None:
    """A reply delivered to a get's future, the task cancelled before it ran: the reply's
    fd is closed and its reference released, as for a reply that comes after the cancel."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with await connect_broker_async(broker.socket_path) as client:
            entry = await client.put_bytes(b"answered", key=key())
            waiting = asyncio.create_task(client.get(entry.blob_id, timeout=30))
            await asyncio.sleep(0)  # the get sends its request and awaits the reply
            # Hold the loop until the reply is in the socket, then cancel on the turn
            # after the reader's callback delivers it, before the task runs again.
            assert select.select([client._channel.fileno()], [], [], 10)[0]
            loop.call_soon(lambda: loop.call_soon(waiting.cancel))
            with pytest.raises(asyncio.CancelledError):
                await waiting
            async with asyncio.timeout(10):
                while (await client.stats()).references != 0:
                    await asyncio.sleep(0.005)
            assert client._core.abandoned == {}
            await client.delete(entry.blob_id)

    asyncio.run(scenario())


def test_an_async_producer_waits_for_its_slots(broker: Broker) -> None:
    async def scenario() -> None:
        with BlobPool(4096, 1) as pool:
            async with (
                await connect_broker_async(broker.socket_path) as producer,
                await connect_broker_async(broker.socket_path) as consumer,
            ):
                with pool.loan() as loan:
                    loan.write_all(b"slot")
                    entry = await producer.put_pooled(loan, key=key())
                waiting = asyncio.create_task(producer.loan(pool, timeout=10))
                mapped = await consumer.get(entry.blob_id)
                await producer.delete(entry.blob_id)
                assert not waiting.done()
                mapped.close()
                (await waiting).close()

    asyncio.run(scenario())
