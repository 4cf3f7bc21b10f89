"""blobplane: large binary payloads between processes on one host, through shared memory."""

from blobplane import channel
from blobplane.auto_pool import AutoPool, default_auto_pool
from blobplane.blobs import (
    MappedRead,
    ProducerBlob,
    SharedMemoryBlobs,
    map_descriptor,
    read_blob_contents,
)
from blobplane.client import connect_broker, connect_broker_async
from blobplane.errors import BlobError
from blobplane.pool import BlobPool, PoolLoan
from blobplane.types import (
    BlobBackend,
    BlobId,
    BlobToken,
    FilePath,
    Named,
    SharedBlobDescriptor,
    UnixFd,
    WindowsHandle,
    decode_descriptor,
)

__all__ = [
    "AutoPool",
    "BlobBackend",
    "BlobError",
    "BlobId",
    "BlobPool",
    "BlobToken",
    "FilePath",
    "MappedRead",
    "Named",
    "PoolLoan",
    "ProducerBlob",
    "SharedBlobDescriptor",
    "SharedMemoryBlobs",
    "UnixFd",
    "WindowsHandle",
    "channel",
    "connect_broker",
    "connect_broker_async",
    "decode_descriptor",
    "default_auto_pool",
    "map_descriptor",
    "read_blob_contents",
]

__version__ = "0.1.0"
