"""The stream protocol: a few messages over the channel, and a ring in shared memory per frame.

The channel carries what happens once (and the fds), inside `UserPayload`s,
as an application protocol rides a transport::

    publisher -> subscriber   Hello   once, with the pool's control block, the
                                      subscriber's ring and release area and
                                      its end of the bell (see `streams.ring`)
    publisher -> subscriber   Slots   right after Hello, up to 16 slot fds each,
                                      until every slot of the pool was sent
    publisher -> subscriber   End     when the publisher closes the stream

Frames never ride the channel: each goes into the subscriber's ring (an
entry naming the slot, its generation, the length and the header) and the
subscriber's release area takes the release back. The channel socket stays
open for the stream's life, so a publisher or subscriber that dies is seen
as a hang-up.
"""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, TypeAlias

import msgspec

from blobplane.errors import RemoteProtocolError

MAX_HEADER = 1024
# One fd per slot travels at Hello time: a bound keeps that (and the ring) small.
MAX_STREAM_SLOTS = 1024
HELLO_FDS = 4  # control block, ring, release area, the subscriber's end of the bell


class Backpressure(enum.StrEnum):
    """What a publisher does when every slot is taken."""

    BLOCK = "block"  # wait (with a timeout) until a subscriber releases one
    DROP_OLDEST = "drop_oldest"  # take back the oldest frame nobody is reading


class _StreamMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


class Hello(_StreamMessage, frozen=True, tag="hello"):
    pool: uuid.UUID
    slot_size: Annotated[int, msgspec.Meta(gt=0)]
    slots: Annotated[int, msgspec.Meta(gt=0, le=MAX_STREAM_SLOTS)]
    policy: Backpressure
    ring_entries: Annotated[int, msgspec.Meta(gt=0, le=4 * MAX_STREAM_SLOTS)]


class Slots(_StreamMessage, frozen=True, tag="slots"):
    """The fds of slots ``first`` .. ``first + len(fds) - 1``, in order."""

    first: Annotated[int, msgspec.Meta(ge=0)]


class End(_StreamMessage, frozen=True, tag="end"):
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


StreamMessage: TypeAlias = Hello | Slots | End


class Frame(msgspec.Struct, frozen=True):
    """One frame as a subscriber took it from its ring (checked there, see `ring`)."""

    seq: int
    slot: int
    generation: int
    length: int
    sent_ns: int
    # Frames the publisher could not even queue for this subscriber since the last one.
    unsent: int = 0
    header: bytes = b""


_ENCODER = msgspec.msgpack.Encoder(uuid_format="bytes")
_DECODER = msgspec.msgpack.Decoder(StreamMessage)


def encode(message: StreamMessage) -> bytes:
    return _ENCODER.encode(message)


def decode(data: bytes) -> StreamMessage:
    try:
        message: StreamMessage = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteProtocolError(f"malformed stream message: {exc}") from exc
    return message
