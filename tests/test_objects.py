"""Python objects with out-of-band buffers through shared memory."""

from __future__ import annotations

import gc
import pickle
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from blobplane import BlobPool, SharedMemoryBlobs, map_descriptor
from blobplane.blobs import ProducerBlob
from blobplane.errors import InvalidSize, MalformedMetadata
from blobplane.objects import DEFAULT_THRESHOLD, ObjectHeader, UnpicklingRefused, dumps, loads
from blobplane.pool import PoolLoan
from children import run_python
from leaks import blob_mappings

pytestmark = pytest.mark.usefixtures("no_leaks")


def _round_trip(obj: object, **kwargs: Any) -> Any:
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps(obj, blobs)
        assert isinstance(blob, ProducerBlob)
        header = ObjectHeader.from_msgpack(header.to_msgpack())
        return loads(header, map_descriptor(blob.descriptor, blob.size), **kwargs)


def _address_range(mapped_base: memoryview) -> tuple[int, int]:
    base = np.frombuffer(mapped_base, dtype=np.uint8).ctypes.data
    return base, base + mapped_base.nbytes


def test_numpy_arrays_come_back_read_only_and_in_the_blob() -> None:
    array = np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024)
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps({"a": array, "small": np.arange(3)}, blobs)
        assert isinstance(blob, ProducerBlob)
        assert len(header.offsets) == 1  # the small array stayed in the stream
        mapped = map_descriptor(blob.descriptor, blob.size)
        with mapped.as_slice() as whole:
            low, high = _address_range(whole)
        result = loads(header, mapped)
        assert not mapped.closed  # the arrays use it
    rebuilt = result["a"]
    np.testing.assert_array_equal(rebuilt, array)
    assert rebuilt.dtype == array.dtype
    assert rebuilt.shape == array.shape
    assert rebuilt.strides == array.strides
    assert not rebuilt.flags.writeable
    assert low <= rebuilt.ctypes.data < high
    assert rebuilt.ctypes.data % 4096 == 0
    np.testing.assert_array_equal(result["small"], np.arange(3))
    del result, rebuilt
    gc.collect()
    assert mapped.closed


@pytest.mark.parametrize(
    "array",
    [
        np.arange(100_000, dtype=np.int8),
        np.arange(100_000, dtype=np.complex128),
        np.ones((300, 300), dtype=np.float32, order="F"),
        np.arange(400_000, dtype=np.int64).reshape(400, 1000)[::3, ::2],
        np.zeros(70_000, dtype=[("x", "<f8"), ("y", "<i4")]),
        np.arange(100_000).astype("datetime64[s]"),
    ],
    ids=["int8", "complex", "fortran", "strided", "structured", "datetime"],
)
def test_any_dtype_and_layout(array: Any) -> None:
    rebuilt = _round_trip(array)
    np.testing.assert_array_equal(rebuilt, array)
    assert rebuilt.dtype == array.dtype
    assert not rebuilt.flags.writeable


def test_bytes_bytearray_memoryview_and_nesting() -> None:
    big = bytes(range(256)) * 1024
    obj = {
        "bytes": big,
        "bytearray": bytearray(big),
        "view": memoryview(big),
        "nested": [(big[:10], {"deep": np.arange(DEFAULT_THRESHOLD)})],
    }
    rebuilt = _round_trip(obj)
    assert rebuilt["bytes"] == big
    assert type(rebuilt["bytes"]) is bytes
    assert rebuilt["bytearray"] == bytearray(big)
    assert type(rebuilt["bytearray"]) is bytearray
    assert rebuilt["view"] == big
    assert rebuilt["view"].readonly
    assert rebuilt["nested"][0][0] == big[:10]
    np.testing.assert_array_equal(rebuilt["nested"][0][1]["deep"], np.arange(DEFAULT_THRESHOLD))


def test_pandas_and_arrow() -> None:
    frame = pd.DataFrame(
        {"x": np.arange(200_000), "y": np.random.default_rng(1).random(200_000), "s": "abc"}
    )
    table = pa.table({"n": pa.array(np.arange(100_000)), "f": pa.array(np.ones(100_000))})
    rebuilt = _round_trip({"frame": frame, "table": table, "array": table.column("n")})
    pd.testing.assert_frame_equal(rebuilt["frame"], frame)
    assert rebuilt["table"].equals(table)
    assert rebuilt["array"].equals(table.column("n"))


def test_pooled_objects_use_a_slot_and_check_its_size() -> None:
    array = np.arange(10_000, dtype=np.float64)
    with BlobPool(slot_size=1 << 20, slots=1) as pool:
        header, loan = dumps(array, pool)
        assert isinstance(loan, PoolLoan)
        with loan:
            rebuilt = loads(header, map_descriptor(loan.descriptor, loan.length))
            np.testing.assert_array_equal(rebuilt, array)
            del rebuilt
        with pytest.raises(InvalidSize, match="pool of larger slots"):
            dumps(np.zeros(1 << 18), pool)
        assert pool.free_slots == 1


def test_the_mapping_lives_until_the_last_object_is_collected() -> None:
    unmapped = []
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps([np.arange(1 << 16), np.arange(1 << 16)], blobs)
        mapped = map_descriptor(blob.descriptor, blob.size)
        baseline = blob_mappings()
        first, second = loads(header, mapped, on_released=lambda: unmapped.append(True))
        del header, blob
    assert blob_mappings() == baseline  # the allocator is gone, the arrays still read
    assert int(first.sum()) == int(second.sum())
    del first
    gc.collect()
    assert blob_mappings() == baseline
    assert not unmapped
    del second
    gc.collect()
    assert blob_mappings() == baseline - 1
    assert unmapped == [True]


def test_objects_with_no_large_buffers_still_call_back() -> None:
    unmapped = []
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps({"k": 1}, blobs)
        assert header.size == 0
        result = loads(
            header,
            map_descriptor(blob.descriptor, blob.size),
            on_released=lambda: unmapped.append(1),
        )
    assert result == {"k": 1}
    assert unmapped == [1]


class Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return os.system, ("echo pwned",)


def test_restricted_loads_refuses_what_is_not_allowed() -> None:
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps({"x": Exploit()}, blobs)
        with pytest.raises(UnpicklingRefused, match=r"posix\.system|os\.system"):
            loads(header, map_descriptor(blob.descriptor, blob.size), restricted=True)
        allowed = _round_trip({"a": np.arange(5), "t": (1, 2.5, "x")}, restricted=True)
    assert allowed["t"] == (1, 2.5, "x")


def test_inconsistent_headers_are_refused() -> None:
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps(np.arange(100_000), blobs)
        bad = ObjectHeader(header.stream, [header.size], header.lengths, header.size)
        with pytest.raises(MalformedMetadata, match="outside"):
            loads(bad, map_descriptor(blob.descriptor, blob.size))
        huge = ObjectHeader(header.stream, header.offsets, header.lengths, header.size + 1)
        with pytest.raises(MalformedMetadata, match="header describes"):
            loads(huge, map_descriptor(blob.descriptor, blob.size))
        with pytest.raises(MalformedMetadata):
            ObjectHeader.from_msgpack(b"\x93garbage")
        truncated = ObjectHeader(header.stream[:-5], header.offsets, header.lengths, header.size)
        with pytest.raises((pickle.UnpicklingError, EOFError, MalformedMetadata)):
            loads(truncated, map_descriptor(blob.descriptor, blob.size))


def test_another_process_rebuilds_a_dataframe() -> None:
    frame = pd.DataFrame({"x": np.arange(1_000_000, dtype=np.int64)})
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps(frame, blobs)
        assert isinstance(blob, ProducerBlob)
        result = run_python(
            """
            import sys
            from blobplane import UnixFd, map_descriptor
            from blobplane.objects import ObjectHeader, loads
            header = ObjectHeader.from_msgpack(bytes.fromhex(sys.argv[1]))
            frame = loads(header, map_descriptor(UnixFd(int(sys.argv[2])), int(sys.argv[3])),
                          restricted=True)
            print(int(frame["x"].sum()), frame["x"].to_numpy().flags.writeable)
            """,
            header.to_msgpack().hex(),
            str(blob.fileno()),
            str(blob.size),
            pass_fds=(blob.fileno(),),
        )
    assert result.stdout.split() == [str(int(frame["x"].sum())), "False"]
