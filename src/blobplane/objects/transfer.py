"""Objects over channels (`send_obj`, `recv_obj`) and the broker (`put_object`, `get_object`).

Each object travels as one packed blob (see `codec.pack`): a fresh sealed
memfd by default, or a slot of a `BlobPool`. The receiver's rebuilt object
keeps the memory mapped; a pool slot goes back to the sender once every
buffer of the rebuilt object is collected.
"""

from __future__ import annotations

import threading
from typing import Any

from blobplane.blobs import SharedMemoryBlobs
from blobplane.broker.protocol import BlobEntry
from blobplane.channel.aio import AsyncChannel
from blobplane.channel.sync import Channel
from blobplane.client import AsyncBrokerClient, BrokerClient
from blobplane.objects.allowlist import AllowList
from blobplane.objects.codec import DEFAULT_THRESHOLD, pack, unpack
from blobplane.pool import BlobPool
from blobplane.types import BlobBackend

__all__ = [
    "get_object",
    "get_object_async",
    "put_object",
    "put_object_async",
    "recv_obj",
    "recv_obj_async",
    "send_obj",
    "send_obj_async",
]

_allocator: SharedMemoryBlobs | None = None
_allocator_lock = threading.Lock()


def _blobs() -> SharedMemoryBlobs:
    """A process-wide memfd allocator for fresh object blobs (each lives only while it travels)."""
    global _allocator
    with _allocator_lock:
        if _allocator is None:
            _allocator = SharedMemoryBlobs(BlobBackend.MEMFD)
        return _allocator


def send_obj(
    channel: Channel,
    obj: object,
    *,
    pool: BlobPool | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float | None = 30.0,
) -> None:
    """Send *obj*; returns once the peer mapped it (fresh blob) or it is under way (pool slot)."""
    if pool is not None:
        with channel.loan(pool, timeout=timeout) as loan:
            pack(obj, loan, threshold=threshold)
            channel.send_blob(loan, wait=False, timeout=timeout)
        return
    blob = pack(obj, _blobs(), threshold=threshold)
    try:
        channel.send_blob(blob, timeout=timeout)
    finally:
        blob.cleanup()


def recv_obj(
    channel: Channel, *, restricted: bool | AllowList = False, timeout: float | None = 30.0
) -> Any:
    """The next object; see `blobplane.objects.loads` for what *restricted* refuses."""
    return unpack(channel.recv_blob(timeout=timeout), restricted=restricted)


async def send_obj_async(
    channel: AsyncChannel,
    obj: object,
    *,
    pool: BlobPool | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float | None = 30.0,
) -> None:
    """`send_obj` for an asyncio channel (the pickling itself runs in the event loop)."""
    if pool is not None:
        with await channel.loan(pool, timeout=timeout) as loan:
            pack(obj, loan, threshold=threshold)
            await channel.send_blob(loan, wait=False, timeout=timeout)
        return
    blob = pack(obj, _blobs(), threshold=threshold)
    try:
        await channel.send_blob(blob, timeout=timeout)
    finally:
        blob.cleanup()


async def recv_obj_async(
    channel: AsyncChannel, *, restricted: bool | AllowList = False, timeout: float | None = 30.0
) -> Any:
    """`recv_obj` for an asyncio channel."""
    return unpack(await channel.recv_blob(timeout=timeout), restricted=restricted)


# -- through the broker --------------------------------------------------------------------


def put_object(
    client: BrokerClient,
    key: str,
    obj: object,
    *,
    pool: BlobPool | None = None,
    lease_ms: int | None = None,
    threshold: int = DEFAULT_THRESHOLD,
) -> BlobEntry:
    """Publish *obj* under *key*: packed into a fresh memfd, or into a slot of *pool*."""
    if pool is not None:
        with client.loan(pool) as loan:
            pack(obj, loan, threshold=threshold)
            return client.put_pooled(loan, key=key, lease_ms=lease_ms)
    blob = pack(obj, _blobs(), threshold=threshold)
    try:
        return client.put(blob, key=key, lease_ms=lease_ms)
    finally:
        blob.cleanup()  # the broker holds its own fd now


def get_object(
    client: BrokerClient,
    key: str,
    *,
    timeout: float | None = None,
    restricted: bool | AllowList = False,
) -> Any:
    """The object published under *key*; the broker reference is released with its last buffer."""
    return unpack(client.get(key, timeout=timeout), restricted=restricted)


async def put_object_async(
    client: AsyncBrokerClient,
    key: str,
    obj: object,
    *,
    pool: BlobPool | None = None,
    lease_ms: int | None = None,
    threshold: int = DEFAULT_THRESHOLD,
) -> BlobEntry:
    """`put_object` for an asyncio broker client."""
    if pool is not None:
        with await client.loan(pool) as loan:
            pack(obj, loan, threshold=threshold)
            return await client.put_pooled(loan, key=key, lease_ms=lease_ms)
    blob = pack(obj, _blobs(), threshold=threshold)
    try:
        return await client.put(blob, key=key, lease_ms=lease_ms)
    finally:
        blob.cleanup()


async def get_object_async(
    client: AsyncBrokerClient,
    key: str,
    *,
    timeout: float | None = None,
    restricted: bool | AllowList = False,
) -> Any:
    """`get_object` for an asyncio broker client."""
    return unpack(await client.get(key, timeout=timeout), restricted=restricted)
