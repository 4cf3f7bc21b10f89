"""Objects over channels: `send_obj` and `recv_obj` (the broker clients' `put_object` and
`get_object` pack and unpack the same way).

Each object travels packed (see `codec.pack`) as `send_bytes` carries bytes:
inside the message if it fits, else in a slot of the channel's `AutoPool`
(or, with ``sealed=True``, a fresh sealed memfd), or in a slot of the
caller's `BlobPool`. The receiver's rebuilt object keeps the memory mapped;
a slot goes back to the sender once every buffer of the rebuilt object is
collected.
"""

from __future__ import annotations

from typing import Any

from blobplane.blobs import fresh_blobs
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


def send_obj(
    channel: Channel,
    obj: object,
    *,
    pool: BlobPool | None = None,
    sealed: bool = False,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float | None = 30.0,
) -> None:
    """Send *obj*; returns once it is under way (or, in a fresh sealed blob, mapped by the peer).

    An object whose packed form fits in a message (`Channel.payload_limit`)
    travels inside it, with no memfd; a larger one as `Channel.send_bytes`
    sends bytes (*sealed* included), or in a slot of *pool* if given.
    """
    if pool is not None:
        with channel.loan(pool, timeout=timeout) as loan:
            pack(obj, loan, threshold=threshold)
            channel.send_blob(loan, wait=False, timeout=timeout)
        return
    packed = Packed(obj, threshold)
    channel.send_filled(packed.size, packed.write, sealed=sealed, timeout=timeout)


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
    sealed: bool = False,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float | None = 30.0,
) -> None:
    """`send_obj` for an asyncio channel (the pickling itself runs in the event loop)."""
    if pool is not None:
        with await channel.loan(pool, timeout=timeout) as loan:
            pack(obj, loan, threshold=threshold)
            await channel.send_blob(loan, wait=False, timeout=timeout)
        return
    packed = Packed(obj, threshold)
    await channel.send_filled(packed.size, packed.write, sealed=sealed, timeout=timeout)


async def recv_obj_async(
    channel: AsyncChannel, *, restricted: bool | AllowList = False, timeout: float | None = 30.0
) -> Any:
    """`recv_obj` for an asyncio channel."""
    return unpack(await channel.recv_bytes(timeout=timeout), restricted=restricted)
