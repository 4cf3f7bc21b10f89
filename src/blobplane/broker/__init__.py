"""The broker: a pure core (registry, rights, tokens, protocol) and the daemon around it.

`registry`, `rights`, `tokens` and `protocol` do no I/O beyond reading and
writing the secret key file; they are what this package exports. `server`
(`blobplane serve`) drives `BlobRegistry` and carries out the actions it
returns, with `session` (one connection), `memory` (the broker's memfds),
`logs` and `address` (where the socket and the key live). Import those
modules directly; clients are in `blobplane.client`.
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
    Restore,
    Spill,
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
    "Restore",
    "Right",
    "Spill",
    "WakeWaiters",
    "parse_rights",
]
