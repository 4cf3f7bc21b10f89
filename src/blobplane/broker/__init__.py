"""The broker's pure core: a registry of blobs, references, leases and quotas, and its tokens.

Nothing here does I/O beyond reading and writing the secret key file; the
server drives `BlobRegistry` and carries out the actions it returns.
"""

from blobplane.broker.registry import (
    AccountUsage,
    Action,
    BlobInfo,
    BlobRegistry,
    BlobState,
    BrokerStats,
    ClientId,
    Evicted,
    EvictReason,
    FreeBlob,
    GetResult,
    NotifyProducer,
    Pending,
    Placed,
    Ready,
    WakeWaiters,
)
from blobplane.broker.rights import ALL_RIGHTS, Grant, Right, parse_rights

__all__ = [
    "ALL_RIGHTS",
    "AccountUsage",
    "Action",
    "BlobInfo",
    "BlobRegistry",
    "BlobState",
    "BrokerStats",
    "ClientId",
    "EvictReason",
    "Evicted",
    "FreeBlob",
    "GetResult",
    "Grant",
    "NotifyProducer",
    "Pending",
    "Placed",
    "Ready",
    "Right",
    "WakeWaiters",
    "parse_rights",
]
