"""The broker protocol: typed requests and replies carried inside the channel's `UserPayload`s.

The channel moves bytes and fds; the broker adds its own tagged union on top,
as the stream protocol does (`blobplane.streams.protocol`). Each request
carries a request id (``rid``) that the client picks, and the reply names it::

    client -> broker   Hello        first, once: protocol version and token (if any)
    broker -> client   Welcome      the grant the connection got
    client -> broker   Create       -> BlobReply + 1 fd: a writable memfd to fill
                       Seal         -> Ok, once the broker sealed the memfd
                       Put          + 1 fd: a sealed memfd of the client's own (pooled:
                                    a slot of its BlobPool; keep: published still
                                    once the client has gone), or no fd and the
                                    bytes themselves (data, small) -> BlobReply
                       Get          -> BlobReply + 1 fd: read-only, sealed; counts a reference
                       Release      -> Ok (or nothing with ack=False)
                       Delete       -> Ok (or nothing with ack=False)
                       Renew        -> BlobReply
                       List         -> ListReply, in as many parts as it takes
                       Stats        -> StatsReply
                       MintToken    -> TokenReply: a token to get one blob and nothing else
    broker -> client   Refused      any request the broker refused: the error's class
                                    name and message (rid 0: the connection, closing)
    broker -> client   SlotFree     unsolicited: a pooled blob is released by everyone
                       ProducerGone unsolicited: a client whose pool slots this one got
                                    has disconnected (drop what you keep of its slots)

Which fds ride with which message is part of the protocol: a `Put` carries
exactly one (none when it carries its bytes), every other request none
(`fds_expected`). Decoding is strict:
unknown fields, wrong types, out-of-range numbers and a blob named both by
id and by key (or by neither) raise `RemoteProtocolError`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, TypeAlias

import msgspec

from blobplane.errors import InvalidKey, RemoteProtocolError
from blobplane.types import MAX_ENCODABLE_SIZE, BlobId, BlobToken

__all__ = [
    "MAX_ACCOUNTS_LISTED",
    "MAX_INLINE_PUT",
    "MAX_KEY_BYTES",
    "MAX_LIST_PART_BYTES",
    "MAX_MILLIS",
    "PROTOCOL_VERSION",
    "AccountEntry",
    "BlobEntry",
    "BlobReply",
    "Create",
    "Delete",
    "Get",
    "Hello",
    "List",
    "ListReply",
    "MintToken",
    "Ok",
    "ProducerGone",
    "Put",
    "Refused",
    "Release",
    "Renew",
    "Reply",
    "Request",
    "Seal",
    "SlotFree",
    "Stats",
    "StatsEntry",
    "StatsReply",
    "TokenReply",
    "Welcome",
    "check_key",
    "decode_reply",
    "decode_request",
    "encode",
    "fds_expected",
    "target_of",
]

# Version 4: `Put.data`, `Put.keep`, `SlotFree.reuse`. Clients and brokers of other
# versions refuse each other at the hello, since both decode with unknown fields forbidden.
PROTOCOL_VERSION = 4
# A ListReply part stays well inside the channel's 64 KiB frame, whatever the keys.
MAX_LIST_PART_BYTES = 48 * 1024
MAX_ACCOUNTS_LISTED = 200
MAX_KEY_CHARS = 1024  # the decoder's bound; `check_key` then checks the UTF-8 length
MAX_KEY_BYTES = 1024
MAX_TOKEN_CHARS = 2048
MAX_TEXT = 4096
MAX_REQUEST_ID = 2**63 - 1

RequestId = Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUEST_ID)]
ReplyTo = Annotated[int, msgspec.Meta(ge=0, le=MAX_REQUEST_ID)]
Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_ENCODABLE_SIZE)]
# Milliseconds (leases, timeouts, ttls): what a double holds exactly.
MAX_MILLIS = 2**53
Millis = Annotated[int, msgspec.Meta(gt=0, le=MAX_MILLIS)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class _Message(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="op"
):
    pass


# -- requests --------------------------------------------------------------------------


class _Request(_Message, frozen=True):
    rid: RequestId


class _Targeted(_Request, frozen=True):
    """A request about one blob, named by its id or by its key (exactly one of them)."""

    id: uuid.UUID | None = None
    key: Key | None = None

    def __post_init__(self) -> None:
        # Runs while decoding too: msgspec turns the ValueError into a validation error.
        if (self.id is None) == (self.key is None):
            raise ValueError("name the blob by id or by key, exactly one of them")


class Hello(_Request, frozen=True, tag="hello"):
    version: Annotated[int, msgspec.Meta(ge=1)] = PROTOCOL_VERSION
    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_CHARS)] | None = None
    name: Annotated[str, msgspec.Meta(max_length=256)] = ""


class Create(_Request, frozen=True, tag="create"):
    size: Size
    key: Key | None = None
    lease_ms: Millis | None = None


class Seal(_Request, frozen=True, tag="seal"):
    id: uuid.UUID


class Put(_Request, frozen=True, tag="put"):
    size: Size
    key: Key | None = None
    lease_ms: Millis | None = None
    pooled: bool = False
    # Pooled, and published still when the producer disconnects: the broker keeps it.
    keep: bool = False
    # The bytes themselves, for a small blob (no fd then): the broker makes the memfd.
    data: bytes | None = None


# The most bytes a put carries inline (`Put.data`): what fits in one message of the
# channel with the longest key, below the frame limit.
MAX_INLINE_PUT = 60 << 10


class Get(_Targeted, frozen=True, tag="get"):
    # None: wait for an unsealed blob without limit, but not for a key nobody has
    # used yet. A number: wait up to that long for both.
    timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None = None


class Release(_Request, frozen=True, tag="release"):
    id: uuid.UUID
    ack: bool = True  # False: no reply at all, not even a refusal (MappedRead.close)


class Delete(_Targeted, frozen=True, tag="delete"):
    ack: bool = True


class Renew(_Targeted, frozen=True, kw_only=True, tag="renew"):
    lease_ms: Millis | None


class List(_Request, frozen=True, tag="list"):
    include_deleted: bool = False


class Stats(_Request, frozen=True, tag="stats"):
    pass


class MintToken(_Targeted, frozen=True, tag="mint"):
    ttl_ms: Millis | None = None


Request: TypeAlias = (
    Hello | Create | Seal | Put | Get | Release | Delete | Renew | List | Stats | MintToken
)


def fds_expected(request: Request) -> int:
    """How many fds must ride with *request*."""
    return 1 if isinstance(request, Put) and request.data is None else 0


def check_key(key: object) -> str:
    """*key* if it is a valid blob key, else `InvalidKey`: the one rule for keys.

    1 to `MAX_KEY_BYTES` bytes of UTF-8 without NUL. A string with a lone
    surrogate is no UTF-8 (and cannot travel in a frame): refused too. The
    clients check before sending, the registry on every request.
    """
    if isinstance(key, str) and key and "\0" not in key:
        try:
            if len(key.encode()) <= MAX_KEY_BYTES:
                return key
        except UnicodeEncodeError:
            pass
    shown = f"{key!r:.80}" if isinstance(key, str) else type(key).__name__
    raise InvalidKey(
        f"a blob key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8 without NUL, got {shown}"
    )


def target_of(request: Get | Delete | Renew | MintToken) -> BlobId | str:
    """The blob a request names: its id, or its key."""
    if request.id is not None:
        return BlobId(request.id)
    assert request.key is not None  # __post_init__ saw to it
    return request.key


# -- what replies carry ------------------------------------------------------------------


class BlobEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One blob as the broker saw it when it replied. Times are relative to that moment."""

    id: uuid.UUID
    key: str | None
    size: Size
    state: str  # allocated, sealed, deleted
    pooled: bool
    lease_ms: Millis | None
    expires_in_ms: int | None
    references: NonNegative
    age_ms: NonNegative
    idle_ms: NonNegative
    account: str
    owner: int | None
    # In the reply to a put or a create: how many idle blobs the broker evicted
    # (with --evict) to make room for this one.
    evicted: NonNegative = 0

    @property
    def blob_id(self) -> BlobId:
        return BlobId(self.id)

    @property
    def token(self) -> BlobToken:
        return BlobToken(BlobId(self.id), self.size, self.lease_ms)


class AccountEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    bytes: NonNegative
    blobs: NonNegative
    max_bytes: NonNegative | None
    clients: NonNegative


class StatsEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The registry's totals, and a little about the broker process."""

    pid: int
    uptime_s: float
    clients: NonNegative
    blobs: NonNegative
    allocated: NonNegative
    sealed: NonNegative
    deleted: NonNegative
    pooled: NonNegative
    bytes: NonNegative
    pooled_bytes: NonNegative
    memory_limit: NonNegative | None
    references: NonNegative
    evictions: NonNegative
    expirations: NonNegative
    waiting_gets: NonNegative
    open_fds: int
    token_required: bool
    evict: bool
    accounts: tuple[AccountEntry, ...] = ()
    accounts_omitted: NonNegative = 0  # past MAX_ACCOUNTS_LISTED, the smallest


# -- replies -----------------------------------------------------------------------------


class Welcome(_Message, frozen=True, tag="welcome"):
    rid: RequestId
    version: int
    client: int
    rights: tuple[str, ...]
    max_bytes: NonNegative | None
    blob: uuid.UUID | None  # a per-blob token: the one blob this connection may get
    token_required: bool


class Ok(_Message, frozen=True, tag="ok"):
    rid: RequestId


class BlobReply(_Message, frozen=True, tag="blob"):
    """Answers Create and Get (with one fd), Put and Renew (without)."""

    rid: RequestId
    blob: BlobEntry


class ListReply(_Message, frozen=True, tag="list"):
    rid: RequestId
    blobs: tuple[BlobEntry, ...]
    more: bool  # another part follows


class StatsReply(_Message, frozen=True, tag="stats"):
    rid: RequestId
    stats: StatsEntry


class TokenReply(_Message, frozen=True, tag="token"):
    rid: RequestId
    token: str
    id: uuid.UUID


class Refused(_Message, frozen=True, tag="refused"):
    """The request *rid* was not carried out (0: the whole connection, which the broker closes).

    *error* is the name of a `blobplane.errors` class; the client raises it.
    """

    rid: ReplyTo
    error: Annotated[str, msgspec.Meta(max_length=64)]
    message: Text = ""


class SlotFree(_Message, frozen=True, tag="slot-free"):
    """The pooled blob *id* was withdrawn and released by every reader: its slot is yours.

    *reuse* False: a reader whose right to read may lapse (a token holder)
    was given the slot and may keep its fd, so it must not carry another
    blob: the automatic pool closes it. (A `BlobPool` of your own reuses its
    slots anyway: choosing one is choosing that.)
    """

    id: uuid.UUID
    reuse: bool = True


class ProducerGone(_Message, frozen=True, tag="producer-gone"):
    """The client *client* (a `BlobEntry.owner`) whose pool slots this client got has gone.

    Its slots will not be published again: a client drops the mappings it
    keeps of them (`get` reuses a slot's mapping), so that the memory of a
    pool whose producer exited does not stay mapped in every reader.
    """

    client: NonNegative


Reply: TypeAlias = (
    Welcome
    | Ok
    | BlobReply
    | ListReply
    | StatsReply
    | TokenReply
    | Refused
    | SlotFree
    | ProducerGone
)

_ENCODER = msgspec.msgpack.Encoder(uuid_format="bytes")
_REQUESTS = msgspec.msgpack.Decoder(Request)
_REPLIES = msgspec.msgpack.Decoder(Reply)


def encode(message: Request | Reply | BlobEntry) -> bytes:
    return _ENCODER.encode(message)


def decode_request(data: bytes) -> Request:
    try:
        request: Request = _REQUESTS.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteProtocolError(f"malformed broker request: {exc}") from exc
    return request


def decode_reply(data: bytes) -> Reply:
    try:
        reply: Reply = _REPLIES.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteProtocolError(f"malformed broker reply: {exc}") from exc
    return reply
