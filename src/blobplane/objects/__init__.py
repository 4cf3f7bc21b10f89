"""Python objects through shared memory: pickle protocol 5 with out-of-band buffers.

`dumps` pickles an object; every buffer of at least `threshold` bytes (numpy
arrays, pandas blocks, Arrow buffers and memoryviews) is left out of the
pickle stream and copied once into a single blob, each at a page-aligned
offset; the rest stays in the stream. `bytes` and `bytearray` always stay in
the stream (the C pickler writes them before any reducer is asked): wrap a
large one in a `memoryview` to send it out of band. The result is a small
`ObjectHeader` (the stream and the buffer offsets) and the blob. `loads`
rebuilds the object with read-only views into the mapping: numpy arrays come
back with ``writeable=False``, sharing memory with the blob, and a
`memoryview` as a read-only view.

Lifetime: the mapping lives as long as anything rebuilt from it; `loads`
closes it (and runs its `on_released` callback) when the last such object
is gone.

Safety: `loads` runs pickle, which executes code chosen by whoever wrote the
stream. Only load objects from peers you trust, or pass ``restricted=True``
(or an `AllowList`) to refuse every class outside an allow-list.
"""

from blobplane.objects.allowlist import DEFAULT_ALLOW_LIST, AllowList, UnpicklingRefused
from blobplane.objects.codec import (
    DEFAULT_THRESHOLD,
    ObjectHeader,
    dumps,
    loads,
    pack,
    unpack,
)
from blobplane.objects.transfer import (
    recv_obj,
    recv_obj_async,
    send_obj,
    send_obj_async,
)

__all__ = [
    "DEFAULT_ALLOW_LIST",
    "DEFAULT_THRESHOLD",
    "AllowList",
    "ObjectHeader",
    "UnpicklingRefused",
    "dumps",
    "loads",
    "pack",
    "recv_obj",
    "recv_obj_async",
    "send_obj",
    "send_obj_async",
    "unpack",
]
