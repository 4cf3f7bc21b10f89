"""What a broker client hands its user: blobs got (`BrokerRead`) and blobs to fill (`BrokerBlob`).

`BrokerRead` is a `MappedRead` whose `close()` releases the reference the
get counted. `BrokerBlob` (and `AsyncBrokerBlob`) is the writable mapping of
a memfd the broker allocated: `seal()` drops the mapping (release your views
of `buffer` first: `BlobBusy` otherwise) and has the broker seal it; closing
one that was never sealed deletes it at the broker. Each is given the
client's calls it needs, and knows nothing else of the client.
"""

from __future__ import annotations

import mmap
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from blobplane.backends.mapping import unmap_when_unused, write_into
from blobplane.blobs import MappedRead
from blobplane.broker.protocol import BlobEntry
from blobplane.errors import BlobBusy, BlobClosed, BlobSealed
from blobplane.types import BlobId, BlobToken

__all__ = ["AsyncBrokerBlob", "BrokerBlob", "BrokerRead"]


class _NamedByEntry:
    """`id`, `key` and `token` of a blob the broker described in `entry`."""

    __slots__ = ()
    entry: BlobEntry

    @property
    def id(self) -> BlobId:
        return self.entry.blob_id

    @property
    def key(self) -> str | None:
        return self.entry.key

    @property
    def token(self) -> BlobToken:
        return self.entry.token


class BrokerRead(_NamedByEntry, MappedRead):
    """A blob got from the broker, mapped read-only; `close()` releases the reference.

    `entry` is the blob as the broker described it (id, key, size, lease...).
    """

    __slots__ = ("entry",)

    def __init__(
        self,
        mapped: mmap.mmap | None,
        entry: BlobEntry,
        on_close: Callable[[], None],
        *,
        owned: bool = True,
    ) -> None:
        super().__init__(mapped, entry.size, on_close, owned=owned)
        self.entry = entry

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<BrokerRead {self.id} key={self.key!r} {len(self)} bytes, {state}>"


class _Writable(_NamedByEntry):
    """The writable mapping of a blob the broker allocated, until it is sealed or closed."""

    __slots__ = ("_closed", "_discard", "_mapped", "_sealed", "entry")

    def __init__(
        self, entry: BlobEntry, mapped: mmap.mmap | None, discard: Callable[[BlobId], None]
    ) -> None:
        self.entry = entry
        self._mapped = mapped
        self._discard = discard  # has the broker drop the blob, without a reply
        self._sealed = False
        self._closed = False

    @property
    def size(self) -> int:
        return self.entry.size

    @property
    def sealed(self) -> bool:
        return self._sealed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffer(self) -> memoryview:
        """A writable memoryview of the whole blob, zero copy. Release it before `seal()`."""
        self._check_writable()
        if self._mapped is None:
            return memoryview(bytearray())
        return memoryview(self._mapped)

    def write_all(self, data: object, offset: int = 0) -> None:
        """Copy *data* (any buffer) into the blob at *offset*, bounds-checked."""
        self._check_writable()
        write_into(self._mapped, self.size, data, offset, "blob")

    def _drop_mapping(self) -> None:
        """Unmap before sealing: the kernel refuses F_SEAL_WRITE while a writable mapping exists."""
        if self._mapped is None:
            return
        try:
            self._mapped.close()
        except BufferError:
            raise BlobBusy(
                "cannot seal while views of blob.buffer (or arrays made from it) are alive; "
                "release them first (view.release(), del array)"
            ) from None
        self._mapped = None

    def close(self) -> None:
        """Drop the mapping; a blob that was never sealed is deleted at the broker."""
        if self._closed:
            return
        self._closed = True
        mapped, self._mapped = self._mapped, None
        unmap_when_unused(mapped)
        if not self._sealed:
            self._discard(self.id)

    def _check_writable(self) -> None:
        if self._closed:
            raise BlobClosed(f"blob {self.id} was closed")
        if self._sealed:
            raise BlobSealed(f"blob {self.id} is sealed; its contents can no longer change")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("sealed" if self._sealed else "writable")
        return f"<{type(self).__name__} {self.id} key={self.key!r} {self.size} bytes {state}>"


class BrokerBlob(_Writable):
    """A blob the broker allocated for this client to fill: write, then `seal()`.

    Leaving the `with` block (or `close()`) of a blob that was never sealed
    deletes it at the broker; a sealed one stays published.
    """

    __slots__ = ("_seal",)

    def __init__(
        self,
        entry: BlobEntry,
        mapped: mmap.mmap | None,
        *,
        seal: Callable[[BlobId], None],
        discard: Callable[[BlobId], None],
    ) -> None:
        super().__init__(entry, mapped, discard)
        self._seal = seal

    def seal(self) -> None:
        """Drop the writable mapping and have the broker seal the blob; sealing twice is fine."""
        if self._sealed:
            return
        self._check_writable()
        self._drop_mapping()
        self._seal(self.id)
        self._sealed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncBrokerBlob(_Writable):
    """`BrokerBlob` for asyncio: ``await blob.seal()``."""

    __slots__ = ("_seal",)

    def __init__(
        self,
        entry: BlobEntry,
        mapped: mmap.mmap | None,
        *,
        seal: Callable[[BlobId], Awaitable[None]],
        discard: Callable[[BlobId], None],
    ) -> None:
        super().__init__(entry, mapped, discard)
        self._seal = seal

    async def seal(self) -> None:
        if self._sealed:
            return
        self._check_writable()
        self._drop_mapping()
        await self._seal(self.id)
        self._sealed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
