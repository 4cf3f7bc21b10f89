"""Load: 64 concurrent clients doing put/get/release cycles leave the broker as they found it."""

from __future__ import annotations

import time

import pytest

from blobplane.client import connect_broker
from brokers import DEADLINE_S, running_broker, spawn, wait_until

PROCESSES = 4
CLIENTS_PER_PROCESS = 16
CYCLES = 100

WORKER = """
import asyncio, sys
from blobplane.client import connect_broker_async

async def client(path: str, name: str, cycles: int) -> int:
    broker = await connect_broker_async(path, name=name)
    async with broker:
        for cycle in range(cycles):
            payload = f"{name}:{cycle}:".encode().ljust(4096, b".")
            entry = await broker.put_bytes(payload, key=f"{name}-{cycle}")
            mine = await broker.get(entry.key)
            shared = await broker.get("shared")
            if bytes(mine.as_slice()) != payload or len(shared) != 65536:
                raise SystemExit(f"{name}: wrong contents in cycle {cycle}")
            mine.close()
            shared.close()
            await broker.delete(entry.blob_id)
    return cycles

async def main() -> None:
    path, process, clients, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    done = await asyncio.gather(
        *(client(path, f"p{process}c{index}", cycles) for index in range(clients))
    )
    print(sum(done), flush=True)

asyncio.run(main())
"""


@pytest.mark.timeout(120)
def test_64_clients_leave_no_reference_fd_or_memory_behind() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as watcher:
        fds = broker.fds()
        shared = watcher.put_bytes(bytes(65536), key="shared")
        # Warm up once, so that what the interpreter allocates for good is in the baseline.
        warm = spawn(WORKER, broker.socket_path, "warm", "4", "10")
        assert warm.communicate(timeout=DEADLINE_S)[0].strip() == "40"
        wait_until(lambda: watcher.stats().clients == 1, "the warm-up clients to go")
        rss = broker.rss_kib()

        started = time.monotonic()
        workers = [
            spawn(WORKER, broker.socket_path, str(index), str(CLIENTS_PER_PROCESS), str(CYCLES))
            for index in range(PROCESSES)
        ]
        for worker in workers:
            out, err = worker.communicate(timeout=90)
            assert worker.returncode == 0, err
            assert int(out) == CLIENTS_PER_PROCESS * CYCLES
        elapsed = time.monotonic() - started

        wait_until(lambda: watcher.stats().clients == 1, "the 64 clients to go")
        stats = watcher.stats()
        assert stats.references == 0
        assert (stats.blobs, stats.bytes) == (1, 65536)
        watcher.delete(shared.blob_id)
        stats = watcher.stats()
        assert (stats.blobs, stats.bytes, stats.waiting_gets) == (0, 0, 0)
        assert broker.fds() == fds
        assert broker.memfds() == 0
        assert broker.rss_kib() < rss + 32 * 1024, (rss, broker.rss_kib())
        cycles = PROCESSES * CLIENTS_PER_PROCESS * CYCLES
        print(f"{cycles} cycles ({cycles * 5} requests) in {elapsed:.1f} s")
