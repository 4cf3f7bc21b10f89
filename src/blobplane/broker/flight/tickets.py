"""What travels in Flight's own fields: tickets, upload commands, stream metadata, errors.

No pyarrow here. Everything is JSON, so that a stock Flight client can write
a ticket by hand (``{"key": "frame-1"}``) and read what it gets. Everything
that comes from a peer is decoded strictly (unknown fields, wrong types,
out-of-range numbers are refused) after its length is checked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, TypeVar

import msgspec

from blobplane.broker.protocol import MAX_KEY_CHARS, MAX_MILLIS, MAX_TEXT, check_key
from blobplane.errors import InvalidSize, RemoteProtocolError
from blobplane.types import MAX_ENCODABLE_SIZE, BlobId

__all__ = [
    "GET_ACTION",
    "INLINE_GET_BYTES",
    "MAX_ANSWER_BYTES",
    "MAX_TICKET_BYTES",
    "BlobTicket",
    "ErrorInfo",
    "GetAnswer",
    "PutCommand",
    "PutResult",
    "StreamInfo",
    "decode_error",
    "decode_get_answer",
    "decode_put_command",
    "decode_put_result",
    "decode_stream_info",
    "decode_ticket",
    "encode",
    "encode_stream_info",
]

# A ticket, a command or a put's answer: a key of at most 1 KiB and a few numbers.
MAX_TICKET_BYTES = 4096
# A "get" answer: what a ticket holds, and a few fields more.
MAX_ANSWER_BYTES = MAX_TICKET_BYTES + 512
# What a schema's metadata may hold before it is even looked at.
MAX_METADATA_BYTES = 4096

# The DoAction type that gets a blob (its body a ticket) in one answer: its `GetAnswer`,
# then, for a range of at most INLINE_GET_BYTES, the bytes themselves as a second result.
# One call instead of a DoGet's stream: what a peer fetching a small blob waits for.
GET_ACTION = "get"
INLINE_GET_BYTES = 1 << 20

Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_ENCODABLE_SIZE)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
Millis = Annotated[int, msgspec.Meta(gt=0, le=MAX_MILLIS)]
MillisLeft = Annotated[int, msgspec.Meta(ge=0, le=MAX_MILLIS)]
T = TypeVar("T")


class BlobTicket(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A DoGet ticket: a blob by key or by id, and optionally one range of its bytes."""

    key: Key | None = None
    id: uuid.UUID | None = None
    offset: Size = 0
    length: Size | None = None  # None: to the end

    def __post_init__(self) -> None:
        if (self.key is None) == (self.id is None):
            raise ValueError("name the blob by id or by key, exactly one of them")

    @property
    def target(self) -> BlobId | str:
        if self.id is not None:
            return BlobId(self.id)
        assert self.key is not None
        return self.key

    def length_in(self, size: int) -> int:
        """How many bytes of a blob of *size* the ticket asks for; `InvalidSize` unless they
        are inside it."""
        if self.offset > size:
            raise InvalidSize(f"offset {self.offset} is past the end of {size} bytes")
        length = size - self.offset if self.length is None else self.length
        if self.offset + length > size:
            raise InvalidSize(
                f"bytes {self.offset} to {self.offset + length} are not inside a blob of {size}"
            )
        return length


class PutCommand(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A DoPut's descriptor command: the key, and the exact size the upload will be."""

    key: Key
    size: Size
    lease_ms: Millis | None = None


class PutResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a DoPut answers once the blob is sealed and published."""

    id: uuid.UUID
    key: str
    size: Size


class GetAnswer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The first result of a "get" action: the blob, the range, and whether its bytes follow."""

    size: Size
    id: uuid.UUID
    key: Key | None = None
    offset: Size
    length: Size
    lease_left_ms: MillisLeft | None = None  # what was left of the blob's lease; None: none
    inline: bool  # the bytes are the next result; else, open a DoGet stream for them


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A refusal's `blobplane.errors` class name and message, in a Flight error's extra info."""

    error: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=MAX_TEXT)] = ""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a DoGet stream's schema says of the blob: all of it, and the range that follows."""

    size: int
    id: BlobId
    key: str | None
    offset: int
    length: int
    lease_left_ms: int | None = None  # of the blob's lease as it was served; None: no lease


def encode(value: BlobTicket | PutCommand | PutResult | GetAnswer | ErrorInfo) -> bytes:
    return msgspec.json.encode(value)


def _decode(data: bytes, kind: type[T], what: str, limit: int = MAX_TICKET_BYTES) -> T:
    if len(data) > limit:
        raise RemoteProtocolError(f"a {what} of {len(data)} bytes is longer than any valid one")
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteProtocolError(f"malformed {what}: {exc}") from None


def decode_ticket(data: bytes) -> BlobTicket:
    ticket = _decode(data, BlobTicket, 'ticket (JSON: {"key": ...} or {"id": ...})')
    if ticket.key is not None:
        check_key(ticket.key)
    return ticket


def decode_put_command(data: bytes) -> PutCommand:
    command = _decode(data, PutCommand, 'put command (JSON: {"key": ..., "size": ...})')
    check_key(command.key)
    return command


def decode_put_result(data: bytes) -> PutResult:
    return _decode(data, PutResult, "put result")


def decode_get_answer(data: bytes) -> tuple[StreamInfo, bool]:
    """A "get" action's answer, checked as a stream's metadata is; whether the bytes follow."""
    answer = _decode(data, GetAnswer, "get answer", MAX_ANSWER_BYTES)
    key = None if answer.key is None else check_key(answer.key)
    info = _checked(
        StreamInfo(
            answer.size, BlobId(answer.id), key, answer.offset, answer.length, answer.lease_left_ms
        )
    )
    if answer.inline and info.length > INLINE_GET_BYTES:
        raise RemoteProtocolError(
            f"a get answer may carry at most {INLINE_GET_BYTES} bytes, not {info.length}"
        )
    return info, answer.inline


def decode_error(data: bytes) -> ErrorInfo | None:
    try:
        return _decode(data, ErrorInfo, "error")
    except RemoteProtocolError:
        return None


_SIZE = b"blobplane.size"
_ID = b"blobplane.id"
_KEY = b"blobplane.key"
_OFFSET = b"blobplane.offset"
_LENGTH = b"blobplane.length"
_LEASE_LEFT = b"blobplane.lease_left_ms"


def encode_stream_info(info: StreamInfo) -> dict[bytes, bytes]:
    metadata = {
        _SIZE: str(info.size).encode(),
        _ID: str(info.id.uuid).encode(),
        _OFFSET: str(info.offset).encode(),
        _LENGTH: str(info.length).encode(),
    }
    if info.key is not None:
        metadata[_KEY] = info.key.encode()
    if info.lease_left_ms is not None:
        metadata[_LEASE_LEFT] = str(info.lease_left_ms).encode()
    return metadata


def decode_stream_info(metadata: dict[bytes, bytes] | None) -> StreamInfo:
    """The stream's metadata, checked: numbers in range, the range inside the blob."""
    if not metadata:
        raise RemoteProtocolError("the stream's schema carries no blobplane metadata")
    if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_BYTES:
        raise RemoteProtocolError("the stream's schema metadata is larger than any valid one")
    try:
        size = _number(metadata[_SIZE])
        offset = _number(metadata[_OFFSET])
        length = _number(metadata[_LENGTH])
        blob = BlobId(uuid.UUID(metadata[_ID].decode("ascii")))
        raw_key = metadata.get(_KEY)
        key = None if raw_key is None else check_key(raw_key.decode("utf-8"))
        raw_lease = metadata.get(_LEASE_LEFT)
        lease_left_ms = None if raw_lease is None else _number(raw_lease, MAX_MILLIS)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"malformed stream metadata: {exc}") from None
    return _checked(StreamInfo(size, blob, key, offset, length, lease_left_ms))


def _checked(info: StreamInfo) -> StreamInfo:
    """*info*, unless its range is not inside the blob."""
    end = info.offset + info.length
    if end > info.size:
        raise RemoteProtocolError(
            f"the peer claims bytes {info.offset} to {end} of a blob of {info.size} bytes"
        )
    return info


def _number(raw: bytes, limit: int = MAX_ENCODABLE_SIZE) -> int:
    if not raw.isdigit() or len(raw) > 20:
        raise ValueError(f"{raw[:24]!r} is not a number")
    value = int(raw)
    if value > limit:
        raise ValueError(f"{value} is beyond any valid value (at most {limit})")
    return value
