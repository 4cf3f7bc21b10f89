"""Objects over channels: `send_obj` and `recv_obj` (the broker clients' `put_object` and
`get_object` pack and unpack the same way).

Each object travels as one packed blob (see `codec.pack`): a fresh sealed
memfd by default, or a slot of a `BlobPool`. The receiver's rebuilt object
keeps the memory mapped; a pool slot goes back to the sender once every
buffer of the rebuilt object is collected.
"""

from __future__ import annotations

from typing import Any

from blobplane.blobs import ProducerBlob, fresh_blobs
from blobplane.channel.aio import AsyncChannel
from blobplane.channel.sync import Channel
from blobplane.objects.allowlist import AllowList
from blobplane.objects.codec import DEFAULT_THRESHOLD, Packed, pack, unpack
from blobplane.pool import BlobPool

__all__ = [
    "fresh_blobs",
    "recv_obj",
    "recv_obj_async",
    "send_obj",
    "send_obj_async",
]


def _packed(
    obj: object, threshold: int, limit: int, timeout: float | None
) -> bytearray | ProducerBlob:
    """*obj* packed: bytes to send inside a message if they fit in *limit*, else a sealed blob."""
    packed = Packed(obj, threshold)
    if packed.size <= limit:
        return packed.to_bytes()
    return packed.into(fresh_blobs(), timeout)


def send_obj(
    channel: Channel,
    obj: object,
    *,
    pool: BlobPool | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float | None = 30.0,
) -> None:
    """Send *obj*; returns once the peer mapped it (fresh blob) or it is under way.

    An object whose packed form fits in a message (`Channel.payload_limit`)
    travels inside it, with no memfd; a larger one in a fresh blob, or in a
    slot of *pool* if given.
    """
    if pool is not None:
        with channel.loan(pool, timeout=timeout) as loan:
            pack(obj, loan, threshold=threshold)
            channel.send_blob(loan, wait=False, timeout=timeout)
        return
    packed = _packed(obj, threshold, channel.payload_limit, timeout)
    if isinstance(packed, bytearray):
        channel.send_bytes(packed, timeout=timeout)
        return
    try:
        channel.send_blob(packed, timeout=timeout)
    finally:
        packed.cleanup()


def recv_obj(
    channel: Channel, *, restricted: bool | AllowList = False, timeout: float | None = 30.0
) -> Any:
    """The next object; see `blobplane.objects.loads` for what *restricted* refuses."""
    return unpack(channel.recv_bytes(timeout=timeout), restricted=restricted)


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
    packed = _packed(obj, threshold, channel.payload_limit, timeout)
    if isinstance(packed, bytearray):
        await channel.send_bytes(packed, timeout=timeout)
        return
    try:
        await channel.send_blob(packed, timeout=timeout)
    finally:
        packed.cleanup()


async def recv_obj_async(
    channel: AsyncChannel, *, restricted: bool | AllowList = False, timeout: float | None = 30.0
) -> Any:
    """`recv_obj` for an asyncio channel."""
    return unpack(await channel.recv_bytes(timeout=timeout), restricted=restricted)
