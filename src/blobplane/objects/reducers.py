"""How objects are reduced so their large buffers leave the pickle stream (protocol 5).

Pickle keeps `bytes` and memoryviews in the stream and numpy keeps some
arrays there (datetime64, strided ones); this pickler sends every buffer of
at least `threshold` bytes out of band, packing a strided array once.
"""

from __future__ import annotations

import io
import pickle
from typing import Any


def _rebuild_memoryview(buffer: memoryview) -> memoryview:
    return memoryview(buffer).toreadonly()


class OutOfBandPickler(pickle.Pickler):
    """Sends memoryviews out of band too, and packs strided arrays once.

    (`bytes` and `bytearray` stay in the stream: the C pickler writes them
    before it asks `reducer_override`.)
    """

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
