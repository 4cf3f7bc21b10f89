from __future__ import annotations

import pytest

from blobplane import BlobId, BlobToken, FilePath, Named, UnixFd, WindowsHandle
from blobplane.errors import InvalidSize, MalformedMetadata
from blobplane.types import Format, SharedBlobDescriptor, decode_descriptor

FORMATS: list[Format] = ["json", "msgpack"]
DESCRIPTORS: list[SharedBlobDescriptor] = [
    UnixFd(7),
    FilePath("/run/user/1000/blobplane/x"),
    Named("123-abc"),
    WindowsHandle(0x1F4),
]


def _encode(value: BlobToken | SharedBlobDescriptor, fmt: Format) -> bytes:
    return value.to_json() if fmt == "json" else value.to_msgpack()


def test_blob_ids_are_random_version_4_uuids() -> None:
    first, second = BlobId.new(), BlobId.new()
    assert first != second
    assert first.uuid.version == 4


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lease_ms", [None, 1, 30_000])
def test_token_round_trips(fmt: Format, lease_ms: int | None) -> None:
    token = BlobToken(BlobId.new(), 4096, lease_ms)
    encoded = _encode(token, fmt)
    decoded = BlobToken.from_json(encoded) if fmt == "json" else BlobToken.from_msgpack(encoded)
    assert decoded == token


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("descriptor", DESCRIPTORS, ids=lambda d: type(d).__name__)
def test_descriptor_round_trips_with_its_kind(
    fmt: Format, descriptor: SharedBlobDescriptor
) -> None:
    assert decode_descriptor(_encode(descriptor, fmt), fmt) == descriptor


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"[]",
        b"not json",
        b'{"id": {"uuid": "nope"}, "size": 1}',
        b'{"id": {"uuid": "4a3c2c1e-0f5e-4d0b-9a53-93f3d7c5e8a1"}, "size": -1}',
        b'{"id": {"uuid": "4a3c2c1e-0f5e-4d0b-9a53-93f3d7c5e8a1"}, "size": 1.5}',
        b'{"id": {"uuid": "4a3c2c1e-0f5e-4d0b-9a53-93f3d7c5e8a1"}, "size": 1, "lease_ms": 0}',
        b'{"id": {"uuid": "4a3c2c1e-0f5e-4d0b-9a53-93f3d7c5e8a1"}, "size": 1, "extra": 1}',
        b'{"size": 1}',
    ],
)
def test_malformed_tokens_are_refused(text: bytes) -> None:
    with pytest.raises(MalformedMetadata, match="cannot decode BlobToken"):
        BlobToken.from_json(text)


@pytest.mark.parametrize(
    "text",
    [
        b'{"type": "UnixFd", "fd": -1}',
        b'{"type": "UnixFd", "fd": "3"}',
        b'{"type": "Pipe", "fd": 3}',
        b'{"fd": 3}',
        b'{"type": "Named", "name": "../../etc/passwd"}',
        b'{"type": "Named", "name": ""}',
        b'{"type": "FilePath", "path": ""}',
    ],
)
def test_malformed_descriptors_are_refused(text: bytes) -> None:
    with pytest.raises(MalformedMetadata):
        decode_descriptor(text)


def test_tokens_validate_when_built_in_python() -> None:
    with pytest.raises(InvalidSize, match="negative"):
        BlobToken(BlobId.new(), -1)
    with pytest.raises(InvalidSize, match="lease_ms"):
        BlobToken(BlobId.new(), 1, 0)
    with pytest.raises(MalformedMetadata):
        UnixFd(-3)
