"""The allocator and the two handles: `ProducerBlob` (write, seal) and `MappedRead` (read).

Ownership: a `SharedMemoryBlobs` owns every blob it created until
`cleanup(token)`; a `ProducerBlob` is a handle on one of them (leaving its
`with` block cleans it up); a `MappedRead` owns one read-only mapping.

Views and lifetimes: `ProducerBlob.buffer` and `MappedRead.as_slice()` hand out
memoryviews straight into the mapping. Python's mmap refuses to unmap while
such a view (or a numpy array made from one) is alive, so closing never pulls
memory from under a live view: `MappedRead.close()` and `cleanup()` release
the fd and the name at once and leave the unmap to the last view to go.
`seal()` is the exception: the kernel refuses F_SEAL_WRITE while a writable
mapping exists, so it raises `BlobBusy` until the views of `buffer` are gone.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from blobplane.backends import Allocation, Backend, get_backend, open_for_read
from blobplane.backends.mapping import (
    map_readonly,
    map_writable,
    physical_memory,
    unmap_when_unused,
    write_into,
)
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    BlobNotFound,
    BlobSealed,
    DescriptorMismatch,
    InvalidSize,
    LeaseExpired,
)
from blobplane.types import (
    BlobBackend,
    BlobId,
    BlobToken,
    SharedBlobDescriptor,
    UnixFd,
    _check_size,
    is_int,
)

__all__ = [
    "MappedRead",
    "ProducerBlob",
    "SharedMemoryBlobs",
    "fresh_blobs",
    "map_descriptor",
    "read_blob_contents",
]

Buffer = bytes | bytearray | memoryview | mmap.mmap


class MappedRead:
    """A read-only mapping of a blob. `as_slice()` views it without copying.

    `close()` (or leaving the `with` block) releases it. Views obtained from
    `as_slice()` before that stay valid; the memory is unmapped when the last
    of them is released or collected.
    """

    __slots__ = ("__weakref__", "_closed", "_mapped", "_on_close", "_owned", "_size")

    def __init__(
        self,
        mapped: mmap.mmap | bytes | None,
        size: int,
        on_close: Callable[[], None] | None = None,
        *,
        owned: bool = True,
    ) -> None:
        """*mapped* may be longer than *size*; an *owned* mapping is unmapped on close.

        *mapped* may also be bytes that came inside a control message (see
        `Channel.recv_bytes`): read-only too, with nothing to unmap.
        """
        self._mapped = mapped
        self._size = size
        self._on_close = on_close
        self._owned = owned
        self._closed = False

    def as_slice(self) -> memoryview:
        """A read-only memoryview of exactly `len(self)` bytes, zero copy."""
        if self._closed:
            raise BlobClosed("this MappedRead is closed; map the blob again to read it")
        if self._mapped is None or self._size == 0:
            return memoryview(b"")
        whole = memoryview(self._mapped)
        return whole if len(whole) == self._size else whole[: self._size]

    def __len__(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def owns_mapping(self) -> bool:
        """False for a view of a mapping someone else keeps (a cached pool slot)."""
        return self._owned

    def call_when_unmapped(self, callback: Callable[[], None]) -> None:
        """Run *callback* once the memory is unmapped: after `close()` and the last view."""
        if isinstance(self._mapped, mmap.mmap):
            weakref.finalize(self._mapped, callback)
        else:
            callback()

    def close(self) -> None:
        """Release the mapping (deferred while views are alive); closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        mapped, self._mapped = self._mapped, None
        on_close, self._on_close = self._on_close, None
        if self._owned and isinstance(mapped, mmap.mmap):
            unmap_when_unused(mapped)
        if on_close is not None:
            on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MappedRead {self._size} bytes, {state}>"


@dataclass(slots=True, eq=False)
class _BlobState:
    """One blob's resources, shared by its record in the allocator and its `ProducerBlob`.

    It refers to neither, so the allocator's finalizer can hold every state
    without keeping the allocator alive.
    """

    token: BlobToken
    backend: Backend
    allocation: Allocation
    mapped: mmap.mmap | None
    expires_at: float | None
    sealed: bool = False
    # What a channel needs to hand this blob over, (fd, token), taken once
    # when it is sealed: None until then, for a descriptor that is no fd,
    # and from its release on. Read on every handoff, so a plain field.
    sendable: tuple[int, BlobToken] | None = None

    @property
    def released(self) -> bool:
        return self.allocation.fd < 0

    def release(self) -> None:
        self.sendable = None
        mapped, self.mapped = self.mapped, None
        unmap_when_unused(mapped)
        self.backend.destroy(self.allocation)


def _release_all(states: dict[BlobId, _BlobState]) -> None:
    while states:
        _, state = states.popitem()
        state.release()


class ProducerBlob:
    """A blob being produced: write it through `buffer` or `write_all`, then `seal()`.

    The allocator that created it owns it, and this handle keeps that
    allocator alive; `with blobs.create(n) as blob:` cleans it up when the
    block ends.
    """

    __slots__ = ("__weakref__", "_owner", "_state")

    def __init__(self, owner: SharedMemoryBlobs, state: _BlobState) -> None:
        self._owner = owner
        self._state = state

    @property
    def token(self) -> BlobToken:
        return self._state.token

    @property
    def id(self) -> BlobId:
        return self._state.token.id

    @property
    def size(self) -> int:
        return self._state.token.size

    @property
    def descriptor(self) -> SharedBlobDescriptor:
        return self._state.allocation.descriptor

    @property
    def sealed(self) -> bool:
        return self._state.sealed

    @property
    def closed(self) -> bool:
        return self._state.released

    @property
    def sendable(self) -> tuple[int, BlobToken] | None:
        """``(fileno(), token)`` of a sealed, live blob whose descriptor is an fd, else None.

        One read for a channel's handoff instead of a property per part;
        None sends it through the checks that say what is wrong.
        """
        return self._state.sendable

    def fileno(self) -> int:
        """The fd behind the blob, owned by the allocator (send it; never close it)."""
        self._check_open()
        return self._state.allocation.fd

    @property
    def buffer(self) -> memoryview:
        """A writable memoryview of the whole blob, zero copy. Release it before `seal()`."""
        self._check_writable()
        if self._state.mapped is None:
            return memoryview(bytearray())
        whole = memoryview(self._state.mapped)  # longer in a file of huge pages (`map_length`)
        return whole if len(whole) == self.size else whole[: self.size]

    def write_all(self, data: Buffer | object, offset: int = 0) -> None:
        """Copy *data* (any buffer) into the blob at *offset*, bounds-checked."""
        self._check_writable()
        write_into(self._state.mapped, self.size, data, offset, "blob")

    def seal(self) -> None:
        """Make the contents final. For memfd the kernel enforces it for every process.

        Drops the writable mapping first (the kernel refuses F_SEAL_WRITE while
        one exists), so every view of `buffer` must be released by now.
        Sealing twice is fine.
        """
        state = self._state
        if state.sealed:
            return
        self._check_open()
        if state.mapped is not None:
            try:
                state.mapped.close()
            except BufferError:
                raise BlobBusy(
                    "cannot seal while views of blob.buffer (or arrays made from it) are "
                    "alive; release them first (view.release(), del array)"
                ) from None
            state.mapped = None
        state.backend.seal(state.allocation)
        state.sealed = True
        if type(state.allocation.descriptor) is UnixFd:
            state.sendable = (state.allocation.fd, state.token)

    def cleanup(self) -> None:
        """Free the blob: same as `blobs.cleanup(blob.token)`."""
        self._owner.cleanup(self.token)

    def _check_open(self) -> None:
        if self._state.released:
            raise BlobClosed(f"blob {self.id} was cleaned up; create a new one")

    def _check_writable(self) -> None:
        self._check_open()
        if self._state.sealed:
            raise BlobSealed(f"blob {self.id} is sealed; its contents can no longer change")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("sealed" if self.sealed else "writable")
        return f"<ProducerBlob {self.id} {self.size} bytes {self.descriptor!r} {state}>"


class SharedMemoryBlobs:
    """Allocates blobs, keeps their records (by id, O(1)) and maps them for reading.

    Blobs live until `cleanup(token)`, their lease runs out and
    `collect_expired()` runs, or the allocator is closed, or collected once
    neither it nor any of its `ProducerBlob` handles is referenced. Files
    and shm names are unlinked at interpreter exit at the latest; the files
    of a process killed outright are swept by the next process that uses the
    same private folder.

    *reserved_huge_pages* (memfd only): a blob of one huge page or more is
    made of the host's reserved huge pages (``MFD_HUGETLB``, ``vm.nr_hugepages``)
    while enough of them are free, else of the usual pages. Its memfd is
    rounded up to whole huge pages; the broker takes such a blob only if
    its size is a multiple of the huge page size.
    """

    def __init__(
        self,
        backend: BlobBackend = BlobBackend.PLATFORM_DEFAULT,
        *,
        max_blob_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        reserved_huge_pages: bool = False,
    ) -> None:
        self._backend: Backend = get_backend(backend, reserved_huge_pages=reserved_huge_pages)
        self._max_size = physical_memory() if max_blob_size is None else max_blob_size
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[BlobId, _BlobState] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, _release_all, self._records)

    @property
    def backend(self) -> BlobBackend:
        """The concrete backend (PLATFORM_DEFAULT resolved)."""
        return self._backend.kind

    @property
    def kernel_sealed(self) -> bool:
        """Whether `seal()` is enforced by the kernel for every process (memfd only)."""
        return self._backend.kernel_sealed

    def create(self, size: int, lease_ms: int | None = None) -> ProducerBlob:
        """Allocate a zero-filled blob of *size* bytes, optionally with a lease."""
        if self._closed:
            raise BlobClosed("this SharedMemoryBlobs is closed")
        _check_size(size)
        if size > self._max_size:
            raise InvalidSize(
                f"a blob of {size} bytes is larger than this host's {self._max_size} bytes "
                "of memory; pass max_blob_size= to SharedMemoryBlobs to allow it"
            )
        token = BlobToken(BlobId.new(), size, lease_ms)
        allocation = self._backend.create(size, token.id)
        try:
            mapped = map_writable(allocation.fd, size, prefault=self._backend.prefault)
        except BaseException:
            self._backend.destroy(allocation)
            raise
        expires_at = None if lease_ms is None else self._clock() + lease_ms / 1000
        state = _BlobState(token, self._backend, allocation, mapped, expires_at)
        with self._lock:
            self._records[token.id] = state
        return ProducerBlob(self, state)

    def cleanup(self, token: BlobToken) -> None:
        """Free the blob: close its fd, unlink its name, unmap (deferred past live views).

        Idempotent: an unknown or already cleaned-up token is ignored.
        """
        with self._lock:
            record = self._records.get(token.id)
            if record is None or record.token != token:
                return
            del self._records[token.id]
        record.release()

    def map_read(self, token: BlobToken, descriptor: SharedBlobDescriptor) -> MappedRead:
        """Map a blob this allocator created, read-only. Sealed or not: it is ours."""
        record = self._lookup(token)
        if record.allocation.descriptor != descriptor:
            raise DescriptorMismatch(
                f"descriptor {descriptor!r} does not belong to blob {token.id} "
                f"(it was created with {record.allocation.descriptor!r})"
            )
        if record.expires_at is not None and self._clock() >= record.expires_at:
            raise LeaseExpired(
                f"the {token.lease_ms} ms lease of blob {token.id} has run out; "
                "renew leases before they end, or create the blob again"
            )
        return MappedRead(map_readonly(record.allocation.fd, token.size), token.size)

    def renew(self, token: BlobToken, lease_ms: int) -> None:
        """Extend a live blob's lease to *lease_ms* from now."""
        if not is_int(lease_ms) or lease_ms <= 0:
            raise InvalidSize(f"lease_ms must be a positive int, got {lease_ms!r}")
        record = self._lookup(token)
        with self._lock:
            record.expires_at = self._clock() + lease_ms / 1000

    def collect_expired(self) -> list[BlobToken]:
        """Reclaim every blob whose lease has run out; return their tokens."""
        now = self._clock()
        with self._lock:
            expired = [
                record
                for record in self._records.values()
                if record.expires_at is not None and now >= record.expires_at
            ]
            for record in expired:
                del self._records[record.token.id]
        for record in expired:
            record.release()
        return [record.token for record in expired]

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, token: object) -> bool:
        if not isinstance(token, BlobToken):
            return False
        record = self._records.get(token.id)
        return record is not None and record.token == token

    def close(self) -> None:
        """Clean up every blob still held; closing twice is fine."""
        self._closed = True
        with self._lock:
            records = dict(self._records)
            self._records.clear()
        _release_all(records)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _lookup(self, token: BlobToken) -> _BlobState:
        with self._lock:
            record = self._records.get(token.id)
        if record is None:
            raise BlobNotFound(
                f"no blob {token.id} here: it was never created by this allocator, "
                "or it was cleaned up"
            )
        if record.token != token:
            raise DescriptorMismatch(
                f"token {token!r} does not match the one blob {token.id} was created with "
                f"({record.token!r})"
            )
        return record


_fresh: SharedMemoryBlobs | None = None
_fresh_lock = threading.Lock()


def fresh_blobs() -> SharedMemoryBlobs:
    """A process-wide memfd allocator for blobs that live only while they travel."""
    global _fresh
    with _fresh_lock:
        if _fresh is None:
            _fresh = SharedMemoryBlobs(BlobBackend.MEMFD)
        return _fresh


def map_descriptor(
    descriptor: SharedBlobDescriptor,
    size: int,
    *,
    allow_sparse: bool = False,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None = None,
) -> MappedRead:
    """Map a blob from another process read-only, after checking it is safe to.

    An fd (`UnixFd`) is borrowed, never closed: the mapping keeps a duplicate.
    It must be a memfd sealed against shrinking and growing (`backends.checks`),
    with every page allocated: reading a hole would allocate the page here and
    charge it to this process (`SparseBlob`; *allow_sparse* accepts it).

    A `Named` is a name inside this user's shm folder; a `FilePath` must be a
    file directly inside the temp-file folder, or inside one of
    *allowed_dirs* when given (`UnsafePath` otherwise). Either is opened
    without following a symbolic link or waiting, and must be a regular file.
    """
    _check_size(size)
    with open_for_read(
        descriptor, size, allow_sparse=allow_sparse, allowed_dirs=allowed_dirs
    ) as fd:
        return MappedRead(map_readonly(fd, size), size)


def read_blob_contents(
    descriptor: SharedBlobDescriptor,
    size: int,
    *,
    allow_sparse: bool = False,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None = None,
) -> bytes:
    """Copy a blob's *size* bytes out, for a process that has no allocator records.

    The same checks as `map_descriptor`, with the same keywords.
    """
    with (
        map_descriptor(
            descriptor, size, allow_sparse=allow_sparse, allowed_dirs=allowed_dirs
        ) as mapped,
        mapped.as_slice() as view,
    ):
        return view.tobytes()
