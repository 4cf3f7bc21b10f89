"""The object codec: one blob holding an object's out-of-band buffers (and maybe its header).

`dumps`/`loads` keep the header (the pickle stream and the buffer offsets)
beside the blob; `pack`/`unpack` put it inside, behind a fixed trailer, so the
blob alone describes the object: that is what travels over channels and
through the broker.
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import msgspec

from blobplane.backends.copying import copy_bytes
from blobplane.blobs import MappedRead, ProducerBlob, SharedMemoryBlobs
from blobplane.errors import BlobError, InvalidSize, MalformedMetadata
from blobplane.objects.allowlist import DEFAULT_ALLOW_LIST, AllowList, RestrictedUnpickler
from blobplane.objects.reducers import OutOfBandPickler
from blobplane.pool import BlobPool, PoolLoan

DEFAULT_THRESHOLD = 64 * 1024
_ALIGN = mmap.PAGESIZE


class ObjectHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where each buffer lies in the blob, and the pickle stream (inline or in the blob too)."""

    stream: bytes
    offsets: list[int]
    lengths: list[int]
    size: int  # where the buffers end
    stream_offset: int = 0  # with stream_length > 0: the stream lies in the blob here
    stream_length: int = 0

    def to_msgpack(self) -> bytes:
        return _HEADER_ENCODER.encode(self)

    @classmethod
    def from_msgpack(cls, data: bytes) -> ObjectHeader:
        try:
            return _HEADER_DECODER.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MalformedMetadata(f"cannot decode an ObjectHeader: {exc}") from exc


_HEADER_ENCODER = msgspec.msgpack.Encoder()
_HEADER_DECODER = msgspec.msgpack.Decoder(ObjectHeader)


def _layout(buffers: list[pickle.PickleBuffer]) -> tuple[list[int], list[int], int]:
    offsets, lengths, end = [], [], 0
    for buffer in buffers:
        with buffer.raw() as raw:
            length = raw.nbytes
        start = -(-end // _ALIGN) * _ALIGN
        offsets.append(start)
        lengths.append(length)
        end = start + length
    return offsets, lengths, end


@dataclass(slots=True)
class _Pickled:
    stream: bytes
    buffers: list[pickle.PickleBuffer]
    offsets: list[int]
    lengths: list[int]
    size: int  # where the last buffer ends

    def write(self, view: memoryview) -> None:
        for buffer, offset in zip(self.buffers, self.offsets, strict=True):
            with buffer.raw() as raw, view[offset : offset + raw.nbytes] as part:
                copy_bytes(part, raw)


def _pickle(obj: object, threshold: int) -> _Pickled:
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    OutOfBandPickler(stream, threshold, buffers).dump(obj)
    offsets, lengths, size = _layout(buffers)
    return _Pickled(stream.getvalue(), buffers, offsets, lengths, size)


Target = SharedMemoryBlobs | BlobPool | PoolLoan


def _fill(
    target: Target,
    size: int,
    write: Callable[[memoryview], None],
    timeout: float | None,
) -> ProducerBlob | PoolLoan:
    """A sealed blob or a loaned slot of *size* bytes, filled by *write*.

    A `PoolLoan` target is filled as it is (the caller loaned it).
    """
    if isinstance(target, BlobPool | PoolLoan):
        pool = target if isinstance(target, BlobPool) else target.pool
        if size > pool.slot_size:
            raise InvalidSize(
                f"this object needs {size} bytes, more than the pool's "
                f"{pool.slot_size}-byte slots; use a fresh blob or a pool of larger slots"
            )
        loan = target.loan(timeout) if isinstance(target, BlobPool) else target
        try:
            with loan.buffer as view:
                write(view)
            loan.set_length(size)
        except BaseException:
            loan.close()
            raise
        return loan
    blob = target.create(size)
    try:
        if size:
            with blob.buffer as view:
                write(view)
        blob.seal()
    except BaseException:
        blob.cleanup()
        raise
    return blob


@overload
def dumps(
    obj: object, target: SharedMemoryBlobs, *, threshold: int = ..., timeout: float | None = ...
) -> tuple[ObjectHeader, ProducerBlob]: ...


@overload
def dumps(
    obj: object, target: BlobPool, *, threshold: int = ..., timeout: float | None = ...
) -> tuple[ObjectHeader, PoolLoan]: ...


def dumps(
    obj: object,
    target: SharedMemoryBlobs | BlobPool,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float | None = None,
) -> tuple[ObjectHeader, ProducerBlob | PoolLoan]:
    """Pickle *obj*, moving its large buffers into one blob (or pool slot).

    A fresh blob comes back sealed; a pool slot comes back loaned, with its
    length set (hand it over, then close the loan). *timeout* bounds the
    wait for a free pool slot.
    """
    pickled = _pickle(obj, threshold)
    header = ObjectHeader(pickled.stream, pickled.offsets, pickled.lengths, pickled.size)
    return header, _fill(target, pickled.size, pickled.write, timeout)


# A self-describing blob ends with this trailer, after the pickle stream and
# the encoded header: magic, header offset, header length.
_TRAILER = struct.Struct("<8sQQ")
_MAGIC = b"BPOBJ001"


@overload
def pack(
    obj: object, target: SharedMemoryBlobs, *, threshold: int = ..., timeout: float | None = ...
) -> ProducerBlob: ...


@overload
def pack(
    obj: object, target: BlobPool | PoolLoan, *, threshold: int = ..., timeout: float | None = ...
) -> PoolLoan: ...


def pack(
    obj: object,
    target: Target,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float | None = None,
) -> ProducerBlob | PoolLoan:
    """Like `dumps`, but the blob carries its own header: `unpack` needs nothing else.

    Layout: the page-aligned buffers, the pickle stream, the encoded header,
    and a fixed trailer saying where the header is. This is what travels
    over channels (`send_obj`) and through the broker.
    """
    return Packed(obj, threshold).into(target, timeout)


class Packed:
    """*obj* pickled, its large buffers apart: `size` bytes of `pack`'s layout, to `write`.

    For a caller that chooses where the bytes go by their size: a small
    object fits inside a channel's message (`send_obj`).
    """

    def __init__(self, obj: object, threshold: int = DEFAULT_THRESHOLD) -> None:
        self._pickled = pickled = _pickle(obj, threshold)
        self._stream_at = pickled.size
        header = ObjectHeader(
            b"", pickled.offsets, pickled.lengths, pickled.size, pickled.size, len(pickled.stream)
        )
        self._encoded = header.to_msgpack()
        self._header_at = self._stream_at + len(pickled.stream)
        self.size = self._header_at + len(self._encoded) + _TRAILER.size

    def write(self, view: memoryview) -> None:
        """Lay the object out in the first `size` bytes of *view*."""
        pickled, header_at, size = self._pickled, self._header_at, self.size
        pickled.write(view)
        view[self._stream_at : header_at] = pickled.stream
        view[header_at : header_at + len(self._encoded)] = self._encoded
        _TRAILER.pack_into(view, size - _TRAILER.size, _MAGIC, header_at, len(self._encoded))

    def to_bytes(self) -> bytearray:
        buffer = bytearray(self.size)
        with memoryview(buffer) as view:
            self.write(view)
        return buffer

    @overload
    def into(self, target: SharedMemoryBlobs, timeout: float | None = ...) -> ProducerBlob: ...

    @overload
    def into(self, target: BlobPool | PoolLoan, timeout: float | None = ...) -> PoolLoan: ...

    def into(self, target: Target, timeout: float | None = None) -> ProducerBlob | PoolLoan:
        """A sealed blob of *target*, or a slot of it (see `pack`), holding the object."""
        return _fill(target, self.size, self.write, timeout)


def unpack(
    mapped: MappedRead,
    *,
    restricted: bool | AllowList = False,
    on_released: Callable[[], None] | None = None,
) -> Any:
    """Rebuild the object in a blob made by `pack` (see `loads` for ownership)."""
    try:
        with mapped.as_slice() as whole:
            if len(whole) < _TRAILER.size:
                raise MalformedMetadata(f"a {len(whole)}-byte blob holds no packed object")
            trailer_at = len(whole) - _TRAILER.size
            magic, header_at, header_length = _TRAILER.unpack_from(whole, trailer_at)
            end = header_at + header_length
            if magic != _MAGIC or end > trailer_at:
                raise MalformedMetadata("this blob does not hold an object packed by blobplane")
            header = ObjectHeader.from_msgpack(bytes(whole[header_at:end]))
    except BaseException:
        mapped.close()
        raise
    return loads(header, mapped, restricted=restricted, on_released=on_released)


def loads(
    header: ObjectHeader,
    mapped: MappedRead,
    *,
    restricted: bool | AllowList = False,
    on_released: Callable[[], None] | None = None,
) -> Any:
    """Rebuild the object; its buffers are read-only views into *mapped*.

    Takes ownership of *mapped*: it is closed once the last buffer of the
    rebuilt object is collected (at once if nothing kept one), which is when
    *on_released* runs too. For a pool slot received over a channel, closing
    is what gives the slot back to its producer, so it cannot be rewritten
    while an array still shows it. (A consumer that copies a view's buffer
    into a new memoryview and drops the original defeats this tracking.)
    """
    buffers: list[Any] = []
    tracked: Any = None
    try:
        if len(mapped) < header.size:
            raise MalformedMetadata(
                f"the header describes {header.size} bytes of buffers, the blob has {len(mapped)}"
            )
        with mapped.as_slice() as whole:
            for offset, length in zip(header.offsets, header.lengths, strict=True):
                if offset < 0 or length < 0 or offset + length > header.size:
                    raise MalformedMetadata(
                        f"buffer at {offset}+{length} lies outside the {header.size}-byte blob"
                    )
            stream = header.stream
            if header.stream_length:
                stream_end = header.stream_offset + header.stream_length
                if header.stream_offset < 0 or stream_end > len(whole):
                    raise MalformedMetadata("the pickle stream lies outside the blob")
                stream = bytes(whole[header.stream_offset : stream_end])
            tracked, buffers = _exported_buffers(whole, header, owned=mapped.owns_mapping)
        # Only an explicit False loads unrestricted; anything else restricts or is refused.
        if restricted is False:
            obj = pickle.Unpickler(io.BytesIO(stream), buffers=buffers).load()
        else:
            allow = DEFAULT_ALLOW_LIST if restricted is True else restricted
            if not isinstance(allow, AllowList):
                raise TypeError(f"restricted is True, False or an AllowList, not {allow!r}")
            obj = RestrictedUnpickler(io.BytesIO(stream), buffers, allow).load()
    except BaseException as exc:
        buffers.clear()
        tracked = None
        _close_then(mapped, on_released)
        if isinstance(exc, ValueError) and not isinstance(exc, BlobError):
            raise MalformedMetadata(f"inconsistent object header: {exc}") from exc
        raise
    buffers.clear()  # our references must not keep the buffers alive
    if tracked is None:
        _close_then(mapped, on_released)
    else:
        weakref.finalize(tracked, _close_then, mapped, on_released)
    return obj


def _exported_buffers(
    whole: memoryview, header: ObjectHeader, *, owned: bool
) -> tuple[Any, list[Any]]:
    """The buffers to rebuild from, and the one object that lives exactly as long as they do.

    A memoryview slice cannot tell when the arrays made from it are gone
    (numpy wraps it in a memoryview of its own), but an ndarray can: every
    buffer handed out is a slice of one read-only uint8 array, whose
    collection means nothing uses the memory any more. Without numpy an
    owned mapping is tracked through its mmap (via `MappedRead.close()`'s
    deferred unmap); a borrowed one (a pool slot) is copied out, since
    nothing could say when its views are gone.
    """
    spans = list(zip(header.offsets, header.lengths, strict=True))
    try:
        import numpy as np
    except ImportError:
        if owned:
            return None, [whole[o : o + n] for o, n in spans]
        return None, [bytes(whole[o : o + n]) for o, n in spans]
    base = np.frombuffer(whole, dtype=np.uint8) if len(whole) else np.empty(0, np.uint8)
    return base, [base[o : o + n] for o, n in spans]


def _close_then(mapped: MappedRead, callback: Callable[[], None] | None) -> None:
    mapped.close()
    if callback is not None:
        callback()
