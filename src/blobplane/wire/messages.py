"""The typed control messages and their msgpack codec.

One `msgspec.Struct` per message, tagged by a ``type`` field, in the union
`Message`. Every message carries ``id``, a request id that the sender picks
(1, 2, 3... in send order; 0 in a struct built in Python means "let the
connection assign one"). Replies name the request they answer in
``reply_to``. One encoder and one typed decoder serve every connection.
"""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, Literal, TypeAlias

import msgspec

from blobplane.errors import RemoteProtocolError
from blobplane.types import BlobToken

__all__ = [
    "DECODER",
    "DECODE_ERRORS",
    "MAX_ERROR_TEXT",
    "MAX_META",
    "Ack",
    "BlobHandoff",
    "DescriptorKind",
    "ErrorCode",
    "ErrorReply",
    "Message",
    "SlotRef",
    "UserPayload",
    "decode_error",
    "decode_message",
    "encode_message_into",
]

MAX_REQUEST_ID = 2**63 - 1
MAX_META = 4096
MAX_ERROR_TEXT = 4096
MAX_ERROR_CODE = 64

RequestId = Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUEST_ID)]
ReplyTo = Annotated[int, msgspec.Meta(ge=0, le=MAX_REQUEST_ID)]
FdCount = Annotated[int, msgspec.Meta(ge=1, le=253)]

# How the memory behind a handoff travels. Only memfd for now: the one kind a
# receiver can verify (sealed, sized) before it maps. Each kind says how many
# fds ride with it (FDS_PER_KIND), which the state machine checks.
DescriptorKind: TypeAlias = Literal["memfd"]
FDS_PER_KIND: dict[str, int] = {"memfd": 1}


class ErrorCode(enum.StrEnum):
    """The codes this library puts in an ErrorReply (a peer may send others)."""

    PROTOCOL = "protocol-error"
    WRONG_KIND = "wrong-kind"
    NOT_SEALED = "not-sealed"
    TOO_SHORT = "too-short"
    TOO_MANY_OPEN_FILES = "too-many-open-files"
    CANNOT_MAP = "cannot-map"


class _Message(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="type",
):
    # 0 only before sending: the decoder refuses it (RequestId is >= 1).
    id: RequestId = 0


class SlotRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """Which slot of which of the sender's pools a handoff is, and the slot's generation."""

    pool: uuid.UUID
    index: Annotated[int, msgspec.Meta(ge=0)]
    generation: Annotated[int, msgspec.Meta(ge=1)]


class BlobHandoff(_Message, frozen=True, tag="handoff"):
    """ "Here is a blob": its token, and how its memory travels (the fd rides out of band).

    ``meta`` is a little opaque application data (a checksum, a frame number).
    Answered by exactly one `Ack` or `ErrorReply`: for a plain blob once the
    receiver mapped it; for a pool slot (``slot`` set) once the receiver
    released it, since only then may the sender write into the slot again.
    """

    token: BlobToken
    kind: DescriptorKind = "memfd"
    fds: FdCount = 1
    meta: Annotated[bytes, msgspec.Meta(max_length=MAX_META)] = b""
    slot: SlotRef | None = None


class Ack(_Message, frozen=True, tag="ack"):
    """The handoff `reply_to` was mapped: the sender may release its side of the blob."""

    reply_to: RequestId


class ErrorReply(_Message, frozen=True, tag="error"):
    """Request `reply_to` was refused (0: the connection itself, which is about to close)."""

    reply_to: ReplyTo
    code: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CODE)]
    message: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_TEXT)] = ""


class UserPayload(_Message, frozen=True, tag="payload"):
    """Small opaque application bytes; any fds may ride with it, up to the per-message limit."""

    data: bytes = b""


Message: TypeAlias = BlobHandoff | Ack | ErrorReply | UserPayload

_ENCODER = msgspec.msgpack.Encoder(uuid_format="bytes")
# The typed decoder every connection decodes with (`decode_message` says what
# its errors mean); public for the receive path, which calls it directly.
DECODER = msgspec.msgpack.Decoder(Message)


# encode_message_into(message, buffer, offset): append *message* to *buffer* from
# *offset* on (room before it for the frame header). The encoder's own method:
# every frame sent is encoded with it.
encode_message_into = _ENCODER.encode_into


# What `DECODER.decode` raises for a payload it refuses; `decode_error` says what it means.
DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError)


def decode_error(exc: Exception) -> RemoteProtocolError:
    """What an error decoding a frame's payload (one of `DECODE_ERRORS`) says about it."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        if text.startswith("Invalid value") and text.endswith("`$.type`"):
            return RemoteProtocolError(f"unknown message type: {text}")
        return RemoteProtocolError(f"malformed message: {text}")
    return RemoteProtocolError(f"malformed message: {text}")


def decode_message(payload: bytes | bytearray | memoryview) -> Message:
    """Decode one frame's payload, or raise `RemoteProtocolError` saying what was wrong."""
    try:
        message: Message = DECODER.decode(payload)
    except DECODE_ERRORS as exc:
        raise decode_error(exc) from exc
    return message
