"""The stream protocol: four messages carried inside the channel's `UserPayload`s.

The channel moves bytes and fds; a stream adds its own tagged union on top,
as an application protocol rides a transport::

    publisher -> subscriber   Hello   once, with the pool's control block fd
    publisher -> subscriber   Frame   per frame; carries the slot's fd the
                                      first time this subscriber sees the slot
    subscriber -> publisher   Release when the subscriber is done with a frame
    publisher -> subscriber   End     when the publisher closes the stream

A frame names its slot and the slot's generation at publish time; the
subscriber maps each slot once and keeps it.
"""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, TypeAlias

import msgspec

from blobplane.errors import RemoteProtocolError

MAX_HEADER = 1024


class Backpressure(enum.StrEnum):
    """What a publisher does when every slot is taken."""

    BLOCK = "block"  # wait (with a timeout) until a subscriber releases one
    DROP_OLDEST = "drop_oldest"  # take back the oldest frame nobody is reading


class _StreamMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


class Hello(_StreamMessage, frozen=True, tag="hello"):
    pool: uuid.UUID
    slot_size: Annotated[int, msgspec.Meta(gt=0)]
    slots: Annotated[int, msgspec.Meta(gt=0)]
    policy: Backpressure


class Frame(_StreamMessage, frozen=True, tag="frame"):
    seq: Annotated[int, msgspec.Meta(ge=1)]
    slot: Annotated[int, msgspec.Meta(ge=0)]
    generation: Annotated[int, msgspec.Meta(ge=1)]
    length: Annotated[int, msgspec.Meta(ge=0)]
    sent_ns: int
    # Frames the publisher could not even queue for this subscriber since the last one.
    unsent: Annotated[int, msgspec.Meta(ge=0)] = 0
    header: Annotated[bytes, msgspec.Meta(max_length=MAX_HEADER)] = b""


class Release(_StreamMessage, frozen=True, tag="release"):
    seq: Annotated[int, msgspec.Meta(ge=1)]


class End(_StreamMessage, frozen=True, tag="end"):
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


StreamMessage: TypeAlias = Hello | Frame | Release | End

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
