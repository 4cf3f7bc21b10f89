"""Spilling idle blobs to disk: the registry's decisions, the spill files, and a real broker."""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blobplane.broker import (
    BlobRegistry,
    BlobState,
    Evicted,
    EvictReason,
    FreeBlob,
    Grant,
    Pending,
    Ready,
    Restore,
    Spill,
    WakeWaiters,
)
from blobplane.broker import memory as broker_memory
from blobplane.broker.flight.client import FlightBlobClient
from blobplane.broker.registry import Action
from blobplane.broker.spill import LOCK_NAME, PARALLEL_BYTES, SpillDir, spill_name
from blobplane.client import connect_broker, connect_broker_async
from blobplane.errors import (
    BlobBusy,
    BlobLost,
    BlobNotFound,
    BrokenResource,
    ClientQuotaExceeded,
    MemoryLimitExceeded,
)
from blobplane.types import BlobId
from brokers import Broker, broker_folder, start, wait_until
from flight_brokers import at, cluster

pytestmark = pytest.mark.timeout(90)

PRODUCER, CONSUMER = 1, 2
KiB = 1024
MiB = 1024 * KiB


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registry(
    *, memory_limit: int | None = 300, evict: bool = False, clock: Clock | None = None
) -> BlobRegistry:
    reg = BlobRegistry(memory_limit=memory_limit, evict=evict, spill=True, clock=clock or Clock())
    reg.connect(PRODUCER)
    reg.connect(CONSUMER)
    return reg


def spills(actions: list[Action]) -> list[BlobId]:
    return [a.id for a in actions if isinstance(a, Spill)]


def state(reg: BlobRegistry, blob_id: BlobId) -> BlobState:
    return reg.info(blob_id).state


def restore(reg: BlobRegistry, blob_id: BlobId) -> list[Action]:
    """What the server does for a get that answers `Pending(restore=True)`, up to `restored()`."""
    assert reg.get(CONSUMER, blob_id) == Pending(blob_id, restore=True)
    actions = reg.restore(blob_id)
    assert actions[-1] == Restore(blob_id, reg.info(blob_id).size)
    assert reg.restored(blob_id) == [WakeWaiters(blob_id)]
    return actions


# -- the registry's decisions --------------------------------------------------------------


def test_room_is_made_by_spilling_the_least_recently_used_idle_blobs() -> None:
    reg = registry()
    a, b, c = (reg.put(PRODUCER, 100).id for _ in range(3))
    held = reg.get(CONSUMER, a)  # a is used last, and held: never a candidate
    assert isinstance(held, Ready)
    placed = reg.put(PRODUCER, 150)
    assert placed.actions == [Spill(b, 100), Spill(c, 100)]
    assert [state(reg, x) for x in (a, b, c)] == [
        BlobState.SEALED,
        BlobState.SPILLED,
        BlobState.SPILLED,
    ]
    stats = reg.stats()
    assert (stats.bytes, stats.spilled, stats.spilled_bytes, stats.spills) == (250, 2, 200, 2)
    assert stats.sealed == 4  # spilled blobs are sealed blobs
    # Only as many as needed, oldest first: 50 more bytes spill nothing, 51 the oldest.
    assert reg.put(PRODUCER, 50).actions == []
    assert spills(reg.put(PRODUCER, 1).actions) == [placed.id]


def test_spilled_bytes_leave_the_memory_limit_but_stay_in_the_quota() -> None:
    reg = BlobRegistry(memory_limit=200, spill=True, clock=Clock())
    reg.connect(PRODUCER, Grant(account="tenant", max_bytes=300))
    first = reg.put(PRODUCER, 150).id
    assert spills(reg.put(PRODUCER, 150).actions) == [first]
    usage = {a.name: a for a in reg.stats().accounts}["tenant"]
    assert (usage.bytes, usage.blobs) == (300, 2)
    assert reg.stats().bytes == 150
    # Spilling frees memory, not quota: the third is refused, and nothing is spilled.
    with pytest.raises(ClientQuotaExceeded, match="spilled blobs included"):
        reg.put(PRODUCER, 10)
    assert reg.stats().spilled == 1


def test_with_evict_a_full_quota_evicts_the_accounts_own_idle_blobs_spilled_ones_too() -> None:
    reg = BlobRegistry(memory_limit=200, evict=True, spill=True, clock=Clock())
    reg.connect(PRODUCER, Grant(account="tenant", max_bytes=300))
    first = reg.put(PRODUCER, 150).id
    second = reg.put(PRODUCER, 150)
    assert spills(second.actions) == [first]  # for memory, spilling beats evicting
    third = reg.put(PRODUCER, 100)
    assert third.actions == [
        Evicted(first, None, 150, EvictReason.MEMORY),  # for the quota
        FreeBlob(first),  # (the server removes its spill file)
        Spill(second.id, 150),  # for the memory limit
    ]
    assert reg.stats().spilled_bytes == 150


def test_what_is_never_spilled_and_what_cannot_make_room() -> None:
    reg = registry(memory_limit=300)
    unsealed = reg.create(PRODUCER, 100).id
    pooled = reg.put(PRODUCER, 100, pooled=True).id
    held = reg.put(PRODUCER, 50).id
    assert isinstance(reg.get(CONSUMER, held), Ready)
    idle = reg.put(PRODUCER, 50).id
    with pytest.raises(MemoryLimitExceeded, match="even after spilling every sealed blob"):
        reg.put(PRODUCER, 100)  # only the 50 idle bytes could go
    assert state(reg, idle) is BlobState.SEALED  # a refusal changes nothing
    assert [state(reg, x) for x in (unsealed, pooled, held)] == [
        BlobState.ALLOCATED,
        BlobState.SEALED,
        BlobState.SEALED,
    ]
    with pytest.raises(MemoryLimitExceeded, match="can never fit"):
        reg.put(PRODUCER, 301)


def test_a_cached_copy_is_evicted_rather_than_spilled() -> None:
    reg = registry(memory_limit=200)
    copy = reg.create(PRODUCER, 100, cached=True).id
    reg.seal(PRODUCER, copy)
    own = reg.put(PRODUCER, 100).id
    actions = reg.put(PRODUCER, 200).actions
    assert actions == [
        Evicted(copy, None, 100, EvictReason.MEMORY),
        FreeBlob(copy),
        Spill(own, 100),
    ]


def test_a_get_of_a_spilled_blob_restores_it_and_makes_room_the_same_way() -> None:
    reg = registry(memory_limit=200)
    a = reg.put(PRODUCER, 100, key="a").id
    b = reg.put(PRODUCER, 100).id
    assert spills(reg.put(PRODUCER, 100).actions) == [a]
    # Every get of it waits for one restore: the first get starts it, the rest park.
    assert reg.get(CONSUMER, "a") == Pending(a, restore=True)
    actions = reg.restore(a)
    assert actions == [Spill(b, 100), Restore(a, 100)]  # room first
    assert state(reg, a) is BlobState.RESTORING
    assert reg.get(PRODUCER, a) == Pending(a, restore=True)
    assert reg.restore(a) == []  # under way already
    assert reg.info(a).references == 0  # a wait counts nothing
    assert reg.stats().bytes == 200  # its memory is reserved
    assert reg.restored(a) == [WakeWaiters(a)]
    got = reg.get(CONSUMER, a)
    assert isinstance(got, Ready)
    assert got.info.state is BlobState.SEALED
    assert reg.stats().restores == 1
    # Released, it is the most recently used: the next spill takes another.
    reg.release(CONSUMER, a)
    assert reg.stats().spilled == 1


def test_a_restore_that_cannot_make_room_is_refused_and_changes_nothing() -> None:
    reg = registry(memory_limit=200)
    a = reg.put(PRODUCER, 100).id
    b = reg.put(PRODUCER, 100).id
    c = reg.put(PRODUCER, 100).id
    assert state(reg, a) is BlobState.SPILLED
    for held in (b, c):
        assert isinstance(reg.get(CONSUMER, held), Ready)
    with pytest.raises(MemoryLimitExceeded, match=f"restoring blob {a} .* from disk"):
        reg.restore(a)
    assert state(reg, a) is BlobState.SPILLED
    reg.release(CONSUMER, b)
    assert spills(restore(reg, a)) == [b]


def test_a_damaged_spill_file_loses_the_blob() -> None:
    reg = registry(memory_limit=100)
    a = reg.put(PRODUCER, 100, key="a").id
    reg.put(PRODUCER, 100)
    assert reg.get(CONSUMER, a) == Pending(a, restore=True)
    reg.restore(a)
    assert reg.restore_failed(a, lost=True) == [
        Evicted(a, "a", 100, EvictReason.LOST),
        WakeWaiters(a),  # any get still parked learns it is gone
        FreeBlob(a),  # and the server removes what is left of the file
    ]
    with pytest.raises(BlobNotFound):
        reg.get(CONSUMER, "a")
    stats = reg.stats()
    assert (stats.blobs, stats.bytes, stats.spilled_bytes) == (1, 0, 100)  # b made room


def test_a_restore_without_memory_leaves_the_blob_spilled() -> None:
    reg = registry(memory_limit=200)
    a = reg.put(PRODUCER, 100).id
    reg.put(PRODUCER, 100)
    reg.put(PRODUCER, 100)
    reg.restore(a)
    assert reg.restore_failed(a, lost=False) == []
    assert state(reg, a) is BlobState.SPILLED
    stats = reg.stats()
    assert (stats.bytes, stats.spilled_bytes) == (100, 200)  # the reservation went back
    restore(reg, a)  # and it can be tried again


def test_a_failed_write_brings_the_blob_back_into_memory() -> None:
    reg = registry(memory_limit=100)
    a = reg.put(PRODUCER, 100).id
    b = reg.put(PRODUCER, 100).id
    assert reg.spill_failed(a) == []
    assert state(reg, a) is BlobState.SEALED
    assert reg.stats().bytes == 200  # over the limit: the memory never went
    # It is the last candidate now: the next spill takes b.
    assert spills(reg.put(PRODUCER, 1).actions) == [b, a]


def test_deleting_or_expiring_a_spilled_or_restoring_blob_frees_it() -> None:
    clock = Clock()
    reg = registry(memory_limit=100, clock=clock)
    a = reg.put(PRODUCER, 100, key="a").id
    b = reg.put(PRODUCER, 100, lease_ms=1000).id
    reg.put(PRODUCER, 100)  # spills b
    assert reg.delete(PRODUCER, "a") == [FreeBlob(a)]
    clock.now += 2
    assert reg.expire() == [Evicted(b, None, 100, EvictReason.LEASE_EXPIRED), FreeBlob(b)]
    c = reg.put(PRODUCER, 100).id
    d = reg.put(PRODUCER, 100).id  # spills c
    assert spills(reg.restore(c)) == [d]
    # Gets parked on a restore are woken to learn the blob is gone.
    assert reg.delete(PRODUCER, c) == [WakeWaiters(c), FreeBlob(c)]
    stats = reg.stats()
    assert (stats.blobs, stats.bytes, stats.spilled_bytes) == (2, 0, 200)


@pytest.mark.parametrize("seed", range(20))
def test_the_accounts_always_add_up(seed: int) -> None:
    """Random puts, gets, releases, deletes, spills and restores: the totals stay true."""
    rng = random.Random(seed)
    limit = 1000
    reg = registry(memory_limit=limit)
    held: list[BlobId] = []
    for _ in range(300):
        live = [i.id for i in reg.list()]
        move = rng.choice(["put", "put", "get", "release", "delete", "restore"])
        try:
            if move == "put":
                reg.put(PRODUCER, rng.randint(0, 400))
            elif move == "get" and live:
                blob_id = rng.choice(live)
                result = reg.get(CONSUMER, blob_id)
                if isinstance(result, Pending):
                    reg.restore(blob_id)
                    if rng.random() < 0.2:
                        reg.restore_failed(blob_id, lost=rng.random() < 0.5)
                    else:
                        reg.restored(blob_id)
                else:
                    held.append(blob_id)
            elif move == "release" and held:
                reg.release(CONSUMER, held.pop(rng.randrange(len(held))))
            elif move == "delete" and live:
                reg.delete(PRODUCER, rng.choice(live))
        except (MemoryLimitExceeded, BlobNotFound):
            pass
        infos = reg.list(include_deleted=True)
        in_memory = sum(i.charge for i in infos if i.state is not BlobState.SPILLED)
        on_disk = sum(i.charge for i in infos if i.state is BlobState.SPILLED)
        stats = reg.stats()
        assert (stats.bytes, stats.spilled_bytes) == (in_memory, on_disk)
        assert stats.bytes <= limit
        account = {a.name: a for a in stats.accounts}[f"client:{PRODUCER}"]
        assert account.bytes == in_memory + on_disk


# -- the spill files -------------------------------------------------------------------------


def sealed_memfd(data: bytes) -> tuple[BlobId, int]:
    blob_id = BlobId.new()
    fd = broker_memory.allocate(len(data), blob_id)
    try:
        if data:
            with mmap.mmap(fd, len(data)) as mapped:
                mapped[:] = data
        broker_memory.seal(fd, blob_id, len(data))
        return blob_id, broker_memory.reopen_readonly(fd)
    finally:
        os.close(fd)


def contents(fd: int, size: int) -> bytes:
    if size == 0:
        return b""
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
        return mapped[:]


@contextmanager
def spill_dir(path: Path) -> Iterator[SpillDir]:
    folder = SpillDir.open(str(path))
    try:
        yield folder
    finally:
        folder.close()
    assert os.listdir(path) == []


@pytest.mark.parametrize("size", [0, 1, 4097, PARALLEL_BYTES + 12345])
def test_a_blob_goes_out_and_comes_back_byte_for_byte(
    tmp_path: Path, size: int, no_leaks: None
) -> None:
    data = random.Random(size).randbytes(size)
    blob_id, fd = sealed_memfd(data)
    with spill_dir(tmp_path / "spill") as folder:
        checksum = folder.write_file(blob_id, fd, size)
        os.close(fd)
        folder.written(blob_id, checksum)
        info = os.stat(tmp_path / "spill" / spill_name(blob_id))
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == size
        restored = folder.read_file(blob_id, size, checksum)
        try:
            assert contents(restored, size) == data
            assert os.fstat(restored).st_size == size
            assert os.get_blocking(restored)
            # What every reader checks before it maps a blob.
            from blobplane.backends.checks import check_allocated, check_received_fd

            check_received_fd(restored, size)
            check_allocated(restored, size, "the restored blob")
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.write(restored, b"x")  # read-only
        finally:
            os.close(restored)
        folder.remove(blob_id)
        assert sorted(os.listdir(tmp_path / "spill")) == [LOCK_NAME]


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing", "symlink"])
def test_a_damaged_spill_file_is_refused_as_lost(
    tmp_path: Path, damage: str, no_leaks: None
) -> None:
    size = PARALLEL_BYTES + 1
    blob_id, fd = sealed_memfd(random.Random(1).randbytes(size))
    path = tmp_path / "spill" / spill_name(blob_id)
    with spill_dir(tmp_path / "spill") as folder:
        checksum = folder.write_file(blob_id, fd, size)
        os.close(fd)
        folder.written(blob_id, checksum)
        if damage == "flipped":
            with open(path, "r+b") as file:
                file.seek(size - 3)
                byte = file.read(1)
                file.seek(size - 3)
                file.write(bytes([byte[0] ^ 1]))
        elif damage == "truncated":
            os.truncate(path, size // 2)
        else:
            path.unlink()
            if damage == "symlink":
                target = tmp_path / "elsewhere"
                target.write_bytes(b"\0" * size)
                path.symlink_to(target)
        with pytest.raises(BlobLost, match=f"blob {blob_id} was spilled to disk.*the blob is gone"):
            folder.read_file(blob_id, size, checksum)
        folder.remove(blob_id)


def test_the_folder_is_private_locked_and_swept_of_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "spill"
    path.mkdir(mode=0o700)
    leftover = path / spill_name(BlobId.new())
    leftover.write_bytes(b"from a broker that was killed")
    unrelated = path / "notes.txt"
    unrelated.write_bytes(b"not ours")
    with spill_dir(path) as folder:
        assert folder.leftovers == 1
        assert sorted(os.listdir(path)) == [LOCK_NAME, "notes.txt"]
        with pytest.raises(BlobBusy, match="another broker uses the spill folder"):
            SpillDir.open(str(path))
        unrelated.unlink()
    os.chmod(path, 0o770)
    with pytest.raises(BrokenResource, match="others may write to it"):
        SpillDir.open(str(path))
    os.chmod(path, 0o755)  # readable by others is allowed: the files are 0600
    SpillDir.open(str(path)).close()
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(BrokenResource, match="symbolic link"):
        SpillDir.open(str(link))
    made = tmp_path / "made"
    SpillDir.open(str(made)).close()
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        with pytest.raises(BrokenResource, match="belongs to uid 65534"):
            SpillDir.open(str(path))


# -- a real broker ---------------------------------------------------------------------------


@contextmanager
def spilling_broker(spill: Path, memory_limit: str, *args: str) -> Iterator[Broker]:
    """A broker spilling to *spill*; stopped and checked (no spill file left) at the end.

    Its log stays readable afterwards, beside *spill*.
    """
    with broker_folder() as folder:
        broker = start(folder, "--memory-limit", memory_limit, "--spill-dir", str(spill), *args)
        try:
            yield broker
        finally:
            status = broker.stop()
            log = broker.log()
            kept = spill.parent / "broker.log"
            kept.write_text(log, encoding="utf-8")
            broker.handle.log_path = str(kept)
        assert status == 0, f"the broker exited with status {status}\n{log}"
        assert "Traceback" not in log, log
        assert os.listdir(spill) == [], "the broker left files in its spill folder"


def files_of(spill: Path) -> list[str]:
    return sorted(name for name in os.listdir(spill) if name != LOCK_NAME)


def key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def test_more_than_fits_is_spilled_and_every_byte_read_back(tmp_path: Path, no_leaks: None) -> None:
    spill = tmp_path / "spill"
    sizes = [0, 1, 4097, 1 * MiB, 20 * MiB, 3 * MiB, 20 * MiB, 7 * MiB, 20 * MiB]
    with spilling_broker(spill, "40MiB") as broker, connect_broker(broker.socket_path) as client:
        payloads = {key(): random.Random(i).randbytes(size) for i, size in enumerate(sizes)}
        for name, data in payloads.items():
            client.put_bytes(data, key=name)
        entries = {e.key: e for e in client.list()}
        spilled = {name for name, e in entries.items() if e.state == "spilled"}
        assert spilled, entries
        stats = client.stats()
        assert stats.bytes <= 40 * MiB
        assert stats.bytes == sum(len(payloads[n]) for n in payloads if n not in spilled)
        assert stats.sealed == len(payloads)
        # One 0600 file per spilled blob, named by its id, in a folder made 0700.
        assert stat.S_IMODE(os.stat(spill).st_mode) == 0o700
        assert files_of(spill) == sorted(spill_name(entries[n].blob_id) for n in spilled)
        for name in files_of(spill):
            assert stat.S_IMODE(os.stat(spill / name).st_mode) == 0o600
        assert broker.memfds() == len(payloads) - len(spilled)
        # Every byte back, twice round (each restore spills others to make room).
        for _ in range(2):
            for name, data in payloads.items():
                with client.get(name) as mapped:
                    assert bytes(mapped.as_slice()) == data, name
        for name in payloads:
            client.delete(name)
        wait_until(lambda: not files_of(spill), "the spill files to go")
        assert broker.memfds() == 0
        assert client.stats().bytes == 0
    log = broker.log()
    assert re.search(r"event=blob\.spilled blob=\S+ size=\d+ seconds=", log)
    assert re.search(r"event=blob\.restored blob=\S+ size=\d+ seconds=", log)
    assert re.search(r"event=broker\.started .*spill_dir=", log)


def test_creates_spill_too_and_deleted_or_expired_blobs_take_their_files(
    tmp_path: Path, no_leaks: None
) -> None:
    spill = tmp_path / "spill"
    with spilling_broker(spill, "1MiB") as broker, connect_broker(broker.socket_path) as client:
        leased = client.put_bytes(b"l" * MiB, lease_ms=1500)
        deleted = client.put_bytes(b"d" * MiB)  # spills the first
        with client.create(MiB) as blob:  # spills the second
            blob.write_all(b"c" * MiB)
            blob.seal()
        assert files_of(spill) == sorted(spill_name(e.blob_id) for e in (leased, deleted))
        client.delete(deleted.blob_id)
        assert files_of(spill) == [spill_name(leased.blob_id)]
        wait_until(lambda: not files_of(spill), "the expired blob's file to go", timeout=10)
        with pytest.raises(BlobNotFound):
            client.get(leased.blob_id)
        client.delete(blob.id)
    assert "reason=lease-expired" in broker.log()


def test_a_damaged_spill_file_is_a_clear_error_and_the_blob_is_gone(
    tmp_path: Path, no_leaks: None
) -> None:
    spill = tmp_path / "spill"
    with spilling_broker(spill, "1MiB") as broker, connect_broker(broker.socket_path) as client:
        name = key()
        damaged = client.put_bytes(b"x" * MiB, key=name)
        other = client.put_bytes(b"y" * MiB)
        # This connection's next request waits until the spill is written out.
        states = {entry.blob_id: entry.state for entry in client.list()}
        assert states[damaged.blob_id] == "spilled", states
        path = spill / spill_name(damaged.blob_id)
        with open(path, "r+b") as file:
            file.write(b"not what was spilled")
        with pytest.raises(BlobLost, match=rf"{damaged.blob_id} was spilled to disk.*CRC-32"):
            client.get(name)
        with pytest.raises(BlobNotFound):
            client.get(name)
        assert not path.exists()
        assert [e.blob_id for e in client.list()] == [other.blob_id]
        client.delete(other.blob_id)
    assert "event=blob.lost" in broker.log()
    assert "reason=lost" in broker.log()


def test_concurrent_gets_of_a_spilled_blob_share_one_restore(
    tmp_path: Path, no_leaks: None
) -> None:
    spill = tmp_path / "spill"
    data = random.Random(7).randbytes(24 * MiB)

    async def readers(socket_path: str, blob_id: BlobId) -> list[bool]:
        clients = [await connect_broker_async(socket_path) for _ in range(6)]
        try:

            async def read(index: int) -> bool:
                # timeout=0 too: a restore is the broker's work, not a wait for a producer.
                timeout = 0 if index == 0 else None
                with await clients[index].get(blob_id, timeout=timeout) as mapped:
                    return bytes(mapped.as_slice()) == data

            return list(await asyncio.gather(*(read(i) for i in range(len(clients)))))
        finally:
            for client in clients:
                await client.aclose()

    with spilling_broker(spill, "30MiB") as broker, connect_broker(broker.socket_path) as client:
        first = client.put_bytes(data)
        second = client.put_bytes(b"z" * (24 * MiB))
        assert client.renew(first.blob_id, None).state == "spilled"
        assert asyncio.run(readers(broker.socket_path, first.blob_id)) == [True] * 6
        assert client.renew(second.blob_id, None).state == "spilled"  # made room for it
        client.delete(first.blob_id)
        client.delete(second.blob_id)
    log = broker.log()
    assert log.count(f"event=blob.restored blob={first.blob_id}") == 1


def test_a_restore_finds_no_room_while_everything_is_held(tmp_path: Path, no_leaks: None) -> None:
    spill = tmp_path / "spill"
    with spilling_broker(spill, "2MiB") as broker, connect_broker(broker.socket_path) as client:
        a, b, c = (client.put_bytes(bytes([i]) * MiB) for i in range(3))
        with (
            client.get(b.blob_id),
            client.get(c.blob_id),
            pytest.raises(MemoryLimitExceeded, match=f"restoring blob {a.blob_id}"),
        ):
            client.get(a.blob_id)
        with client.get(a.blob_id) as mapped:
            assert bytes(mapped.as_slice()) == b"\0" * MiB
        for entry in (a, b, c):
            client.delete(entry.blob_id)


def test_a_killed_brokers_spill_files_are_removed_by_the_next_one(
    tmp_path: Path, no_leaks: None
) -> None:
    spill = tmp_path / "spill"
    with broker_folder() as folder:
        killed = start(folder, "--memory-limit", "1MiB", "--spill-dir", str(spill))
        try:
            with connect_broker(killed.socket_path) as client:
                for index in range(3):
                    client.put_bytes(bytes([index]) * MiB)
            wait_until(lambda: len(files_of(spill)) == 2, "two spill files")
            # A second broker on the same folder is refused while the first lives.
            with pytest.raises(RuntimeError, match="another broker uses the spill folder"):
                start(folder, "--spill-dir", str(spill), name="second.sock")
        finally:
            os.kill(killed.pid, signal.SIGKILL)
            killed.handle.process.wait(10)
            if killed.handle.process.stdout is not None:
                killed.handle.process.stdout.close()
            os.unlink(killed.socket_path)
    assert len(files_of(spill)) == 2  # what a SIGKILL leaves
    with spilling_broker(spill, "1MiB") as broker:
        assert files_of(spill) == []
    assert f"event=spill.cleaned folder={spill} files=2" in broker.log()


def test_serve_refuses_a_spill_folder_others_may_write(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    os.chmod(spill, 0o777)
    serve = [sys.executable, "-m", "blobplane", "serve", "--socket", str(tmp_path / "b.sock")]
    result = subprocess.run(
        [*serve, "--spill-dir", str(spill)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: the spill folder {spill} has mode 0777")
    assert "Traceback" not in result.stderr


def test_many_clients_under_pressure_keep_their_bytes(tmp_path: Path, no_leaks: None) -> None:
    """Puts, gets and deletes from threads at once, with the memory for a few blobs only.

    Room for what the four may hold at once (a blob each, and a put), no more.
    """
    spill = tmp_path / "spill"
    errors: list[BaseException] = []
    with spilling_broker(spill, "10MiB") as broker:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                with connect_broker(broker.socket_path) as client:
                    mine: dict[BlobId, bytes] = {}
                    for _ in range(12):
                        data = rng.randbytes(rng.randint(1, 2 * MiB))
                        mine[client.put_bytes(data).blob_id] = data
                        blob_id = rng.choice(list(mine))
                        with client.get(blob_id) as mapped:
                            assert bytes(mapped.as_slice()) == mine[blob_id]
                        if rng.random() < 0.3:
                            client.delete(blob_id)
                            del mine[blob_id]
                    for blob_id, data in mine.items():
                        with client.get(blob_id) as mapped:
                            assert bytes(mapped.as_slice()) == data
                        client.delete(blob_id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        with connect_broker(broker.socket_path) as client:
            assert client.stats().blobs == 0
        wait_until(lambda: not files_of(spill), "every spill file to go")
        assert broker.memfds() == 0
    assert "event=blob.spilled" in broker.log()
    assert "event=blob.restored" in broker.log()


def test_a_spill_that_cannot_be_written_leaves_the_blob_in_memory(
    tmp_path: Path, no_leaks: None
) -> None:
    spill = tmp_path / "spill"
    with spilling_broker(spill, "1MiB") as broker, connect_broker(broker.socket_path) as client:
        first = client.put_bytes(b"1" * MiB)
        # Where its file would go, something the broker cannot replace.
        (spill / spill_name(first.blob_id)).mkdir()
        second = client.put_bytes(b"2" * MiB)
        wait_until(lambda: "event=blob.spill_failed" in broker.log(), "the failed spill")
        assert client.renew(first.blob_id, None).state == "sealed"
        assert client.stats().bytes == 2 * MiB  # over the limit: the memory never went
        with client.get(first.blob_id) as mapped:
            assert bytes(mapped.as_slice()) == b"1" * MiB
        (spill / spill_name(first.blob_id)).rmdir()
        client.put_bytes(b"3" * MiB)  # the next room is made from the least recent
        assert {e.blob_id: e.state for e in client.list()}[second.blob_id] == "spilled"
        for entry in client.list():
            client.delete(entry.blob_id)
        wait_until(lambda: not files_of(spill), "the spill files to go")


def test_a_get_while_the_blob_is_being_written_out_takes_it_back_from_memory(
    tmp_path: Path, no_leaks: None
) -> None:
    """The get needs no file: the memfd is still whole until the write is over."""
    spill = tmp_path / "spill"
    data = random.Random(3).randbytes(64 * MiB)
    with spilling_broker(spill, "64MiB") as broker:
        with (
            connect_broker(broker.socket_path) as writer,
            connect_broker(broker.socket_path) as reader,
        ):
            for _ in range(5):
                first = writer.put_bytes(data)
                second = writer.put_bytes(b"s" * MiB)  # spills the first, in a thread
                with reader.get(first.blob_id) as mapped:  # most likely while it is written
                    assert bytes(mapped.as_slice()) == data
                writer.delete(first.blob_id)
                writer.delete(second.blob_id)
                if "disk=False" in broker.log():
                    break
            wait_until(lambda: not files_of(spill), "the spill files to go")
        assert "disk=False" in broker.log(), "no get came while a spill was written"


def test_a_spilled_blob_is_served_over_flight_too(tmp_path: Path, no_leaks: None) -> None:
    spill = tmp_path / "spill"
    with cluster((*at(0), "--memory-limit", "8MiB", "--spill-dir", str(spill))) as one:
        broker = one.brokers[0]
        # The small ones, put first, are spilled first: the "get" action answers with
        # their bytes (at most 1 MiB); the larger ones come as streams.
        sizes = [768 << 10] * 4 + [3 * MiB] * 4
        payloads = {key(): random.Random(i).randbytes(size) for i, size in enumerate(sizes)}
        with connect_broker(broker.socket_path) as client:
            for name, data in payloads.items():
                client.put_bytes(data, key=name)
            states = {entry.key: entry.state for entry in client.list() if entry.key}
        spilled = [name for name, state in states.items() if state == "spilled"]
        assert any(len(payloads[name]) < MiB for name in spilled), states
        with FlightBlobClient(one.url(0), one.token("get")) as remote:
            for name in spilled:
                info, inline = remote.get_inline(name, timeout=30)
                assert info.size == len(payloads[name])
                if len(payloads[name]) < MiB:
                    assert inline is not None
                    assert inline.to_pybytes() == payloads[name]
                else:
                    assert inline is None
                assert remote.get_bytes(name, timeout=30) == payloads[name]
        with connect_broker(broker.socket_path) as client:
            for name in payloads:
                client.delete(name)
        wait_until(lambda: not files_of(spill), "the spill files to go")
