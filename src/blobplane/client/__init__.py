"""Clients of the broker: `connect_broker()` blocks, `connect_broker_async()` is for asyncio.

::

    with blobplane.connect_broker() as broker:          # $BLOBPLANE_BROKER or the default
        broker.put_bytes(b"hello", key="greeting")
        with broker.create(64 << 20, key="frame-1") as blob:   # the broker allocates it
            camera.read_into(blob.buffer)
            blob.seal()                                 # the broker seals it: immutable now
        with broker.get("frame-1", timeout=5) as mapped:   # waits up to 5 s for the seal
            use(mapped.as_slice())                      # read-only, zero copy
        # leaving the block released the reference

Who owns what
-------------

- `get()` returns a `BrokerRead` (a `MappedRead`) and counts one reference at
  the broker; `close()` releases it. Views taken from it stay valid after
  that, as with any `MappedRead`: the mapping keeps the memory alive even once
  the broker has freed the blob.
- `create()` returns a `BrokerBlob`: a writable mapping of a memfd the broker
  allocated. `seal()` drops the mapping (release your views of `buffer`
  first: `BlobBusy` otherwise) and asks the broker to seal it. Leaving the
  `with` block of a blob that was never sealed deletes it; a sealed blob stays
  published.
- `put(blob)` publishes a `ProducerBlob` you sealed yourself (memfd): the
  broker keeps its own fd, so you may clean yours up at once.
- `put_pooled(loan)` publishes a slot of your `BlobPool`. The slot stays out
  of the pool, whatever you do with the loan, until the broker says the
  blob was withdrawn (deleted, or its lease ran out) and every reader released
  it. The client hears that whenever it reads from the broker; a producer
  that only writes should take its slots with `broker.loan(pool)`, which
  listens while it waits. A slot still published when the client closes
  never goes back to its pool: a reader may still be reading it.
- When the connection ends (close, or the process dies), the broker releases
  every reference it held and frees the blobs it created but never sealed.

A client is used by one thread (or one event loop) at a time. Errors the
broker reports are raised as the same `BlobError` subclass it raised.

The package: `core` (each operation once, no I/O), `handles` (what the user
holds), `sync` and `aio` (the two drivers of `core`).
"""

from blobplane.broker.protocol import BlobEntry, StatsEntry
from blobplane.client.aio import AsyncBrokerClient, connect_broker_async
from blobplane.client.core import DEFAULT_TIMEOUT, raise_refusal
from blobplane.client.handles import AsyncBrokerBlob, BrokerBlob, BrokerRead
from blobplane.client.sync import BrokerClient, connect_broker

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncBrokerBlob",
    "AsyncBrokerClient",
    "BlobEntry",
    "BrokerBlob",
    "BrokerClient",
    "BrokerRead",
    "StatsEntry",
    "connect_broker",
    "connect_broker_async",
    "raise_refusal",
]
