"""Python objects through shared memory: pickle protocol 5 with out-of-band buffers.

`dumps` pickles an object; every buffer of at least `threshold` bytes (numpy
arrays, pandas blocks, Arrow buffers, bytearrays, large bytes and
memoryviews) is left out of the pickle stream and copied once into a single
blob, each at a page-aligned offset; the rest stays in the stream. The result
is a small `ObjectHeader` (the stream and the buffer offsets) and the blob.
`loads` rebuilds the object with read-only views into the mapping: numpy
arrays come back with ``writeable=False``, sharing memory with the blob.
`bytes` and `bytearray` are copied out on load, since those types own their
memory; a `memoryview` comes back as a read-only view.

Lifetime: the mapping lives as long as anything rebuilt from it; the
`on_unmapped` callback of `loads` runs when the last such object is gone.

Safety: `loads` runs pickle, which executes code chosen by whoever wrote the
stream. Only load objects from peers you trust, or pass ``restricted=True``
(or an `AllowList`) to refuse every class outside an allow-list.
"""

from __future__ import annotations

import io
import mmap
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, overload

import msgspec

from blobplane.blobs import MappedRead, ProducerBlob, SharedMemoryBlobs
from blobplane.errors import BlobError, InvalidSize, MalformedMetadata
from blobplane.pool import BlobPool, PoolLoan

__all__ = [
    "DEFAULT_ALLOW_LIST",
    "DEFAULT_THRESHOLD",
    "AllowList",
    "ObjectHeader",
    "UnpicklingRefused",
    "dumps",
    "loads",
]

DEFAULT_THRESHOLD = 64 * 1024
_ALIGN = mmap.PAGESIZE


class UnpicklingRefused(BlobError, pickle.UnpicklingError):
    """The restricted unpickler met a class outside its allow-list."""


class ObjectHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What travels beside the blob: the pickle stream and where each buffer lies in the blob."""

    stream: bytes
    offsets: list[int]
    lengths: list[int]
    size: int

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


def _rebuild_bytes(buffer: memoryview) -> bytes:
    return bytes(buffer)


def _rebuild_memoryview(buffer: memoryview) -> memoryview:
    return memoryview(buffer).toreadonly()


class _Pickler(pickle.Pickler):
    """Sends large bytes and memoryviews out of band too, and packs strided arrays once."""

    def __init__(self, file: io.BytesIO, threshold: int, buffers: list[pickle.PickleBuffer]):
        super().__init__(file, protocol=5, buffer_callback=self._take)
        self._threshold = threshold
        self._buffers = buffers

    def _take(self, buffer: pickle.PickleBuffer) -> bool:
        with buffer.raw() as raw:
            if raw.nbytes < self._threshold:
                return True  # small: stays in the stream
        self._buffers.append(buffer)
        return False

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is bytes and len(obj) >= self._threshold:
            return _rebuild_bytes, (pickle.PickleBuffer(obj),)
        if type(obj) is memoryview:
            return _rebuild_memoryview, (pickle.PickleBuffer(_contiguous_bytes(obj)),)
        if type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
            return _reduce_array(obj, self._threshold)
        return NotImplemented


def _contiguous_bytes(view: memoryview) -> memoryview:
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def _reduce_array(array: Any, threshold: int) -> Any:
    """Large numpy arrays of any dtype and layout go out of band as raw bytes.

    numpy's own protocol-5 reduction keeps some dtypes (datetime64) and every
    strided array in the stream; this sends them all out of band, packing a
    strided array contiguous once.
    """
    if array.dtype.hasobject or array.nbytes < threshold:
        return NotImplemented
    import numpy as np

    if array.flags.c_contiguous or array.flags.f_contiguous:
        order = "C" if array.flags.c_contiguous else "F"
    else:
        array, order = np.ascontiguousarray(array), "C"
    raw = array.ravel(order="K").view(np.uint8)
    return _rebuild_array, (pickle.PickleBuffer(raw), array.dtype, array.shape, order)


def _rebuild_array(buffer: memoryview, dtype: Any, shape: tuple[int, ...], order: str) -> Any:
    import numpy as np

    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)  # type: ignore[call-overload]


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
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, threshold, buffers).dump(obj)
    offsets, lengths, size = _layout(buffers)
    header = ObjectHeader(stream.getvalue(), offsets, lengths, size)
    if isinstance(target, BlobPool):
        if size > target.slot_size:
            raise InvalidSize(
                f"this object's buffers need {size} bytes, more than the pool's "
                f"{target.slot_size}-byte slots; use a fresh blob or a pool of larger slots"
            )
        loan = target.loan(timeout)
        try:
            _copy_into(loan.buffer, buffers, offsets)
            loan.set_length(size)
        except BaseException:
            loan.close()
            raise
        return header, loan
    blob = target.create(size)
    try:
        if size:
            with blob.buffer as view:
                _copy_into(view, buffers, offsets)
        blob.seal()
    except BaseException:
        blob.cleanup()
        raise
    return header, blob


def _copy_into(view: memoryview, buffers: list[pickle.PickleBuffer], offsets: list[int]) -> None:
    for buffer, offset in zip(buffers, offsets, strict=True):
        with buffer.raw() as raw:
            view[offset : offset + raw.nbytes] = raw


@dataclass(frozen=True)
class AllowList:
    """Classes a restricted `loads` may build: exact ``module.name`` or whole module prefixes."""

    names: frozenset[str] = field(default_factory=frozenset)
    module_prefixes: tuple[str, ...] = ()

    def allows(self, module: str, name: str) -> bool:
        if f"{module}.{name}" in self.names:
            return True
        return any(module == p or module.startswith(p + ".") for p in self.module_prefixes)

    def extended(self, names: Iterable[str] = (), module_prefixes: Iterable[str] = ()) -> AllowList:
        return AllowList(
            self.names | frozenset(names), self.module_prefixes + tuple(module_prefixes)
        )


_SAFE_BUILTINS = [
    "bool",
    "bytearray",
    "bytes",
    "complex",
    "dict",
    "float",
    "frozenset",
    "int",
    "list",
    "object",
    "range",
    "set",
    "slice",
    "str",
    "tuple",
]

_NUMPY_DTYPES = [
    "Bool",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "Float16",
    "Float32",
    "Float64",
    "LongDouble",
    "Complex64",
    "Complex128",
    "CLongDouble",
    "Bytes",
    "Str",
    "Void",
    "Object",
    "DateTime64",
    "TimeDelta64",
    "Long",
    "ULong",
    "LongLong",
    "ULongLong",
    "Short",
    "UShort",
    "Byte",
    "UByte",
    "Int",
    "UInt",
]

DEFAULT_ALLOW_LIST = AllowList(
    names=frozenset(
        [f"builtins.{name}" for name in _SAFE_BUILTINS]
        + [f"numpy.dtypes.{kind}DType" for kind in _NUMPY_DTYPES]
        + [
            "blobplane.objects._rebuild_array",
            "blobplane.objects._rebuild_bytes",
            "blobplane.objects._rebuild_memoryview",
            "collections.OrderedDict",
            "collections.defaultdict",
            "collections.deque",
            "copyreg._reconstructor",
            "datetime.date",
            "datetime.datetime",
            "datetime.time",
            "datetime.timedelta",
            "datetime.timezone",
            "decimal.Decimal",
            "uuid.UUID",
            "numpy.dtype",
            "numpy.ndarray",
            "numpy._core.multiarray._reconstruct",
            "numpy._core.multiarray.scalar",
            "numpy._core.numeric._frombuffer",
            "numpy.core.multiarray._reconstruct",
            "numpy.core.multiarray.scalar",
            "numpy.core.numeric._frombuffer",
        ]
    ),
    # pandas and pyarrow rebuild through many private helpers that change
    # between releases; their packages as a whole are trusted.
    module_prefixes=("pandas", "pyarrow"),
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, buffers: list[memoryview], allow: AllowList) -> None:
        super().__init__(file, buffers=buffers)
        self._allow = allow

    def find_class(self, module: str, name: str) -> Any:
        if not self._allow.allows(module, name):
            raise UnpicklingRefused(
                f"refusing to load {module}.{name}: it is not on the allow-list; "
                "extend it with AllowList.extended() if you trust that class"
            )
        return super().find_class(module, name)


def loads(
    header: ObjectHeader,
    mapped: MappedRead,
    *,
    restricted: bool | AllowList = False,
    on_unmapped: Callable[[], None] | None = None,
) -> Any:
    """Rebuild the object; its buffers are read-only views into *mapped*.

    Takes ownership of *mapped*: it is closed here, and its memory stays
    mapped while any rebuilt object uses it. *on_unmapped* runs once the last
    of them is gone (at once if none kept a view).
    """
    try:
        if len(mapped) < header.size:
            raise MalformedMetadata(
                f"the header describes {header.size} bytes of buffers, the blob has {len(mapped)}"
            )
        with mapped.as_slice() as whole:
            views = []
            for offset, length in zip(header.offsets, header.lengths, strict=True):
                if offset < 0 or length < 0 or offset + length > header.size:
                    raise MalformedMetadata(
                        f"buffer at {offset}+{length} lies outside the {header.size}-byte blob"
                    )
                views.append(whole[offset : offset + length])
        allow = DEFAULT_ALLOW_LIST if restricted is True else restricted or None
        stream = io.BytesIO(header.stream)
        if allow is None:
            obj = pickle.Unpickler(stream, buffers=views).load()
        else:
            obj = _RestrictedUnpickler(stream, views, allow).load()
    except ValueError as exc:
        if isinstance(exc, BlobError):
            raise
        raise MalformedMetadata(f"inconsistent object header: {exc}") from exc
    finally:
        if on_unmapped is not None:
            mapped.call_when_unmapped(on_unmapped)
        mapped.close()
    return obj
