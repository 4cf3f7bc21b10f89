"""The vocabulary: blob ids, lifecycle tokens, descriptors and backend names.

Tokens and descriptors travel as control-plane metadata, so each one encodes
to and decodes from JSON and msgpack. Decoding is strict: unknown fields,
wrong types, negative sizes or fds and unknown descriptor kinds raise
`MalformedMetadata` naming what was wrong.
"""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, Any, Literal, TypeAlias, TypeGuard, TypeVar, cast

import msgspec

from blobplane.errors import InvalidSize, MalformedMetadata

__all__ = [
    "BlobBackend",
    "BlobId",
    "BlobToken",
    "FilePath",
    "Named",
    "SharedBlobDescriptor",
    "UnixFd",
    "WindowsHandle",
    "decode_descriptor",
    "is_int",
    "is_number",
]

# A blob larger than this cannot be addressed by mmap on any 64-bit host we
# run on; the allocator applies a tighter, host-specific limit on top.
MAX_ENCODABLE_SIZE = 2**62


def is_int(value: object) -> TypeGuard[int]:
    """An int, and not a bool (which Python counts as one): the test behind every count."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float, and not a bool: the test behind every duration."""
    return isinstance(value, int | float) and not isinstance(value, bool)


NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
Format = Literal["json", "msgpack"]


class BlobBackend(enum.StrEnum):
    """Where a blob's memory lives."""

    PLATFORM_DEFAULT = "platform_default"
    MEMFD = "memfd"
    POSIX_SHM = "posix_shm"
    TEMP_FILE = "temp_file"
    WINDOWS = "windows"


class BlobId(msgspec.Struct, frozen=True):
    """A blob's name: a random (version 4) UUID. `BlobId.new()` makes one."""

    uuid: uuid.UUID

    @classmethod
    def new(cls) -> BlobId:
        return cls(uuid.uuid4())

    def __str__(self) -> str:
        return str(self.uuid)


_Self = TypeVar("_Self", bound="_Metadata")


class _Metadata(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Shared JSON/msgpack round trip for everything that travels as metadata."""

    def to_json(self) -> bytes:
        return _JSON_ENCODER.encode(self)

    def to_msgpack(self) -> bytes:
        return _MSGPACK_ENCODER.encode(self)

    @classmethod
    def from_json(cls: type[_Self], data: bytes | str) -> _Self:
        return cast(_Self, _decode(data, cls, "json"))

    @classmethod
    def from_msgpack(cls: type[_Self], data: bytes) -> _Self:
        return cast(_Self, _decode(data, cls, "msgpack"))


class BlobToken(_Metadata, frozen=True):
    """Names and sizes a blob and bounds its life: the lifecycle token.

    `lease_ms` is the lease the blob was created with (None: no lease); the
    allocator keeps the deadline.
    """

    id: BlobId
    size: NonNegative
    lease_ms: Positive | None = None

    def __post_init__(self) -> None:
        # msgspec checks the annotations only while decoding; constructing a
        # token in Python must be just as strict. The usual token first: this
        # runs for every handoff decoded, on the receiver's way to its Ack.
        size = self.size
        if self.lease_ms is None and type(size) is int and 0 <= size <= MAX_ENCODABLE_SIZE:
            return
        _check_size(size)
        if self.lease_ms is not None and not is_int(self.lease_ms):
            raise InvalidSize(f"lease_ms must be a positive int or None, got {self.lease_ms!r}")
        if self.lease_ms is not None and self.lease_ms <= 0:
            raise InvalidSize(f"lease_ms must be positive, got {self.lease_ms}")


class UnixFd(_Metadata, frozen=True, tag=True):
    """A file descriptor number in the receiving process (it travels with SCM_RIGHTS)."""

    fd: NonNegative

    def __post_init__(self) -> None:
        if not is_int(self.fd) or self.fd < 0:
            raise MalformedMetadata(f"UnixFd needs a non-negative int, got {self.fd!r}")


class FilePath(_Metadata, frozen=True, tag=True):
    """A file on disk, for the temp-file fallback: the path as a string."""

    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or "\0" in self.path:
            raise MalformedMetadata(f"FilePath needs a non-empty path, got {self.path!r}")


class Named(_Metadata, frozen=True, tag=True):
    """A POSIX shared-memory segment, by the name it has in this user's private folder."""

    name: str

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name
            or len(self.name) > 200
            or not all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in self.name)
            or self.name.startswith(".")
        ):
            raise MalformedMetadata(
                f"Named needs 1-200 characters of [A-Za-z0-9-_.] not starting with '.', "
                f"got {self.name!r}"
            )


class WindowsHandle(_Metadata, frozen=True, tag=True):
    """A Windows HANDLE value, duplicated into the receiving process."""

    handle: NonNegative


SharedBlobDescriptor: TypeAlias = UnixFd | FilePath | Named | WindowsHandle

_JSON_ENCODER = msgspec.json.Encoder()
_MSGPACK_ENCODER = msgspec.msgpack.Encoder()
_decoders: dict[tuple[Any, str], Any] = {}


def _check_size(size: object) -> None:
    if not is_int(size):
        raise InvalidSize(f"a blob size must be an int, got {type(size).__name__}")
    if size < 0:
        raise InvalidSize(f"a blob size cannot be negative, got {size}")
    if size > MAX_ENCODABLE_SIZE:
        raise InvalidSize(f"a blob size of {size} bytes is beyond any host's address space")


def _decode(data: bytes | str, into: Any, fmt: Format) -> Any:
    decoder = _decoders.get((into, fmt))
    if decoder is None:
        module = msgspec.json if fmt == "json" else msgspec.msgpack
        decoder = _decoders[(into, fmt)] = module.Decoder(into)
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        name = getattr(into, "__name__", "SharedBlobDescriptor")
        raise MalformedMetadata(f"cannot decode {name} from {fmt}: {exc}") from exc


def decode_descriptor(data: bytes | str, fmt: Format = "json") -> SharedBlobDescriptor:
    """Decode any descriptor variant; the encoded form carries its kind as a tag."""
    result: SharedBlobDescriptor = _decode(data, SharedBlobDescriptor, fmt)
    return result
