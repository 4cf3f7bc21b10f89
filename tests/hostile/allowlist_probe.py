"""What the pickles of the types restricted loads support reference, derived by pickling them.

`samples()` holds one or more objects of every supported type (builtins'
data types, datetime, decimal, uuid and collections types; numpy arrays of
every dtype and layout, scalars and dtypes; pandas frames, series, indexes,
arrays, dtypes, offsets and scalars; pyarrow arrays, tables, batches,
schemas, fields, types and scalars). `probe()` pickles each the way
`blobplane.objects` does (protocol 5, large buffers out of band, and with
every buffer out of band), loads it back with the plain unpickler while
recording each global the stream names and how the stream uses it: called
(REDUCE), instantiated (NEWOBJ), or only passed along; and whether what it
made was then completed by BUILD. The restricted allow-list must be exactly
this: run ``python tests/hostile/allowlist_probe.py`` to print it for the
installed numpy, pandas and pyarrow.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import decimal
import io
import math
import pickle
import sys
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa

from blobplane.objects import DEFAULT_THRESHOLD
from blobplane.objects.reducers import OutOfBandPickler

Pair = tuple[str, str]

_DTYPES: list[Any] = [
    "?",
    "i1",
    "i2",
    "i4",
    "i8",
    "u1",
    "u2",
    "u4",
    "u8",
    "f2",
    "f4",
    "f8",
    "g",
    "c8",
    "c16",
    "G",
    "M8[ns]",
    "M8[s]",
    "M8[D]",
    "m8[ns]",
    "m8[s]",
    "U5",
    "S5",
    "V4",
    ">i4",
    ">f8",
    "O",
    [("x", "<f8"), ("y", "<i4")],
    [("a", "i1", (2, 3)), ("b", [("c", "<u2")])],
    {"names": ["p", "q"], "formats": ["<i4", "<f8"], "offsets": [0, 8], "itemsize": 24},
    ("<i4", (2,)),
]


def _numpy_samples() -> Iterator[tuple[str, Any]]:
    for spec in [*_DTYPES, np.dtype([("x", "<i4"), ("y", "<f8")], align=True)]:
        dtype = np.dtype(spec)
        yield f"dtype {dtype}", dtype
        yield f"array {dtype}", np.zeros(7, dtype=dtype)
        if not dtype.hasobject:
            yield f"big array {dtype}", np.zeros(70_000, dtype=dtype)
        yield f"scalar {dtype}", np.zeros(1, dtype=dtype)[0]
    yield "object array", np.array([1, "a", None, 2.5, b"x"], dtype=object)
    yield "F order", np.asfortranarray(np.arange(12.0).reshape(3, 4))
    yield "big F order", np.asfortranarray(np.ones((300, 300)))
    yield "strided", np.arange(40)[::3]
    yield "big strided", np.arange(400_000).reshape(400, 1000)[::3, ::2]
    yield "0-d", np.array(5.0)
    yield "empty", np.empty((0, 3))
    yield "scalars", [np.float64(1.5), np.int8(-3), np.bool_(True), np.datetime64("2020-01-01")]


def _masked_dtypes() -> Iterator[Any]:
    names = ["BooleanDtype", "Float32Dtype", "Float64Dtype"]
    names += [f"{kind}{bits}Dtype" for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)]
    for name in names:
        dtype = getattr(pd, name)()
        yield dtype
        # Once used, its pickle carries the caches it filled.
        used = getattr(pd, name)()
        _ = used.numpy_dtype, used.kind, used.itemsize
        yield used


def _index_samples() -> Iterator[tuple[str, Any]]:
    yield "RangeIndex", pd.RangeIndex(2, 20, 3, name="r")
    yield "Index of ints", pd.Index([3, 1, 2])
    yield "Index of strings", pd.Index(["a", "b"])
    yield "Index of objects", pd.Index(["a", 1], dtype=object)
    yield "Index of floats", pd.Index([1.5, 2.5])
    yield "Index of bools", pd.Index([True, False])
    yield "DatetimeIndex", pd.date_range("2020", periods=3)
    yield "DatetimeIndex without freq", pd.DatetimeIndex(["2020-01-03", "2020-01-01"])
    yield "DatetimeIndex with a zone", pd.date_range("2020", periods=3, tz="America/New_York")
    yield "DatetimeIndex in UTC", pd.date_range("2020", periods=3, tz="UTC", freq="min")
    yield (
        "DatetimeIndex at a fixed offset",
        pd.date_range("2020", periods=3, tz=datetime.timezone(datetime.timedelta(hours=2))),
    )
    yield "TimedeltaIndex", pd.timedelta_range("1D", periods=3)
    yield "MultiIndex", pd.MultiIndex.from_product([[1, 2], ["a", "b"]], names=["n", None])
    yield "CategoricalIndex", pd.CategoricalIndex(["a", "b", "a"], ordered=True)
    yield "IntervalIndex", pd.interval_range(0, 5, closed="left")
    yield "IntervalIndex of times", pd.interval_range(pd.Timestamp("2020"), periods=3)
    for freq in ["M", "D", "Q"]:
        yield f"PeriodIndex {freq}", pd.period_range("2020", periods=3, freq=freq)


def _pandas_samples() -> Iterator[tuple[str, Any]]:
    yield (
        "frame of every column kind",
        pd.DataFrame(
            {
                "int": np.arange(5),
                "float": np.linspace(0, 1, 5),
                "bool": [True, False, True, False, True],
                "str": list("abcde"),
                "object": pd.Series([1, "x", None, 2.0, b"y"], dtype=object),
                "datetime": pd.date_range("2020", periods=5),
                "datetime tz": pd.date_range("2020", periods=5, tz="Europe/Paris"),
                "datetime utc": pd.date_range("2020", periods=5, tz="UTC"),
                "timedelta": pd.timedelta_range("1D", periods=5),
                "category": pd.Categorical(list("abaca")),
                "Int64": pd.array([1, None, 3, 4, 5], dtype="Int64"),
                "boolean": pd.array([True, None, False, True, True], dtype="boolean"),
                "Float64": pd.array([1.5, None, 3, 4, 5], dtype="Float64"),
                "string": pd.array(["a", None, "c", "d", "e"], dtype="string"),
                "string python": pd.array(["a", None, "c", "d", "e"], dtype="string[python]"),
                "period": pd.period_range("2020", periods=5, freq="M"),
                "interval": pd.interval_range(0, 5),
                "sparse": pd.arrays.SparseArray([0, 0, 1, 0, 2]),
                "arrow": pd.array([1, 2, None, 4, 5], dtype="int64[pyarrow]"),
            }
        ),
    )
    yield (
        "big frame",
        pd.DataFrame({"x": np.arange(200_000), "y": np.ones(200_000), "s": "abc"}),
    )
    yield (
        "frame with MultiIndex axes",
        pd.DataFrame(
            np.ones((4, 2)),
            index=pd.MultiIndex.from_product([[1, 2], ["a", "b"]], names=["n", "l"]),
            columns=pd.MultiIndex.from_tuples([("x", 1), ("y", 2)]),
        ),
    )
    yield "empty frames", [pd.DataFrame(), pd.DataFrame(index=[1, 2]), pd.DataFrame(columns=["a"])]
    yield "empty and missing", [pd.Series([], dtype="Int64"), pd.Categorical([])]
    yield "strings all missing", pd.array([None, None], dtype="string[python]")
    yield "series", pd.Series([1.0, 2.0, 3.0], name="s", index=list("abc"))
    yield "series of datetimes", pd.Series(pd.date_range("2020", periods=3, freq="h"))
    yield from _index_samples()
    yield "Categorical", pd.Categorical(["a", "b", None], categories=["b", "a"], ordered=True)
    yield "Categorical of ints", pd.Categorical([1, 2, 1])
    for name in ["Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]:
        yield f"{name} array", pd.array([1, None], dtype=name)
    yield "Float32 array", pd.array([1.0, None], dtype="Float32")
    yield "boolean array", pd.array([True, None], dtype="boolean")
    yield "string array", pd.array(["a", None], dtype="string")
    yield "string array in python", pd.array(["a", None], dtype="string[python]")
    yield "string array in arrow", pd.array(["x", None], dtype="string[pyarrow]")
    yield (
        "str array in python",
        pd.array(["a", None], dtype=pd.StringDtype("python", na_value=np.nan)),
    )
    yield "datetime array with a zone", pd.array(pd.date_range("2020", periods=2, tz="Asia/Tokyo"))
    yield "period array", pd.array(pd.period_range("2020", periods=2, freq="Y"))
    yield "interval array", pd.arrays.IntervalArray.from_breaks([0, 1, 2])
    yield "sparse array", pd.arrays.SparseArray([0, 0, 1.5], fill_value=0)
    yield "sparse array in blocks", pd.arrays.SparseArray([0, 0, 1, 1, 0], kind="block")
    yield "arrow array", pd.array([1, 2], dtype="int64[pyarrow]")
    yield "Timestamp", pd.Timestamp("2020-01-01 12:00")
    yield "Timestamp in seconds", pd.Timestamp("2020-01-01").as_unit("s")
    yield "Timestamp with a zone", pd.Timestamp("2020-01-01", tz="Europe/Paris")
    yield "Timestamp in UTC", pd.Timestamp("2020-01-01", tz="UTC")
    yield "Timedelta", pd.Timedelta("1D")
    yield "Timedelta in microseconds", pd.Timedelta("1D").as_unit("us")
    yield "Period", pd.Period("2020-01", freq="M")
    yield "Interval", pd.Interval(0, 1, closed="both")
    yield "NaT", pd.NaT
    yield "NA", pd.NA
    yield (
        "dtypes",
        [
            pd.CategoricalDtype(["a"]),
            pd.StringDtype(),
            pd.DatetimeTZDtype("ns", "UTC"),
            pd.PeriodDtype("D"),
            pd.IntervalDtype("int64"),
            pd.SparseDtype("float64", 0.0),
            pd.ArrowDtype(pa.int32()),
            *_masked_dtypes(),
        ],
    )
    offsets = ["D", "h", "min", "s", "ms", "us", "ns", "W", "ME", "MS", "QE", "QS", "YE", "YS"]
    offsets += ["B", "BME", "BMS", "SME", "SMS"]
    yield "offsets", [pd.tseries.frequencies.to_offset(alias) for alias in offsets]


def _arrow_samples() -> Iterator[tuple[str, Any]]:
    yield (
        "arrow types",
        [
            pa.null(),
            pa.bool_(),
            pa.int8(),
            pa.int16(),
            pa.int32(),
            pa.int64(),
            pa.uint8(),
            pa.uint16(),
            pa.uint32(),
            pa.uint64(),
            pa.float16(),
            pa.float32(),
            pa.float64(),
            pa.decimal32(5, 2),
            pa.decimal64(12, 2),
            pa.decimal128(10, 2),
            pa.decimal256(40, 2),
            pa.date32(),
            pa.date64(),
            pa.time32("s"),
            pa.time64("ns"),
            pa.timestamp("ms"),
            pa.timestamp("us", tz="Europe/Paris"),
            pa.timestamp("s", tz="+02:00"),
            pa.duration("s"),
            pa.month_day_nano_interval(),
            pa.binary(),
            pa.string(),
            pa.large_binary(),
            pa.large_string(),
            pa.binary(4),
            pa.string_view(),
            pa.binary_view(),
            pa.list_(pa.int32()),
            pa.large_list(pa.int8()),
            pa.list_(pa.int16(), 2),
            pa.list_view(pa.int32()),
            pa.large_list_view(pa.int32()),
            pa.map_(pa.string(), pa.int64()),
            pa.struct([("a", pa.int8()), ("b", pa.string())]),
            pa.dictionary(pa.int32(), pa.string()),
            pa.run_end_encoded(pa.int32(), pa.string()),
            pa.dense_union([pa.field("a", pa.int8())]),
            pa.sparse_union([pa.field("a", pa.int8())]),
        ],
    )
    yield "arrow field", pa.field("a", pa.int64(), nullable=False, metadata={"k": "v"})
    yield "arrow schema", pa.schema([("a", pa.int64())], metadata={b"k": b"v"})
    yield (
        "arrow arrays",
        [
            pa.array([1, 2, None]),
            pa.array(["a", None]),
            pa.array([b"x"]),
            pa.array([1.5]),
            pa.array([True, None]),
            pa.array([[1, 2], None]),
            pa.array([{"x": 1, "y": "s"}]),
            pa.array(["a", "b", "a"]).dictionary_encode(),
            pa.array([1], type=pa.timestamp("s", tz="UTC")),
            pa.array([decimal.Decimal("1.25")]),
            pa.array([datetime.date(2020, 1, 1)]),
            pa.array([[("k", 1)]], type=pa.map_(pa.string(), pa.int64())),
            pa.array([None, None]),
            pa.array(["x", "y"], type=pa.string_view()),
            pa.array([1, 2, 3])[1:],
            pa.RunEndEncodedArray.from_arrays([2, 3], [1, 2]),
            pa.UnionArray.from_sparse(pa.array([0, 0], type=pa.int8()), [pa.array([1, 2])]),
        ],
    )
    yield "big arrow arrays", [pa.array(np.arange(100_000)), pa.array(["s"] * 40_000)]
    yield "chunked array", pa.chunked_array([[1, 2], [3]])
    yield "table", pa.table({"a": [1, 2], "b": ["x", "y"], "c": [[1], None]})
    yield "table from pandas", pa.Table.from_pandas(pd.DataFrame({"a": [1, 2]}))
    yield "record batch", pa.record_batch({"a": [1, 2]})
    yield (
        "arrow scalars",
        [
            pa.scalar(1),
            pa.scalar("s"),
            pa.scalar(None),
            pa.scalar([1, 2]),
            pa.scalar(1.5, pa.float32()),
        ],
    )


def _python_samples() -> Iterator[tuple[str, Any]]:
    yield (
        "builtins",
        [
            1,
            2**80,
            2.0,
            1j,
            "s",
            b"b",
            bytearray(b"x"),
            {1},
            frozenset([1]),
            slice(1, 2),
            range(3),
            None,
            True,
            (1,),
            {"a": 1},
            memoryview(b"abc"),
        ],
    )
    yield "big buffers", [bytes(100_000), bytearray(100_000), memoryview(bytes(100_000))]
    yield (
        "stdlib",
        [
            datetime.date(2020, 1, 1),
            datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
            datetime.datetime(2020, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
            datetime.time(1, tzinfo=datetime.timezone(datetime.timedelta(hours=-3), "X")),
            datetime.timedelta(1),
            decimal.Decimal("1.5"),
            uuid.UUID(int=5),
            collections.OrderedDict(a=1),
            collections.deque([1], maxlen=3),
            collections.defaultdict(list, a=[1]),
            collections.defaultdict(int),
            collections.defaultdict(dict),
            collections.defaultdict(set),
        ],
    )


def samples() -> dict[str, Any]:
    """Objects of every type a restricted load supports, by name."""
    return dict([*_python_samples(), *_numpy_samples(), *_pandas_samples(), *_arrow_samples()])


def pickled(obj: Any, threshold: int = DEFAULT_THRESHOLD) -> tuple[bytes, list[memoryview]]:
    """*obj* pickled as `blobplane.objects` does: the stream, and the out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    OutOfBandPickler(stream, threshold, buffers).dump(obj)
    return stream.getvalue(), [memoryview(b).toreadonly() for b in buffers]


@dataclass
class Usage:
    """How the streams use one global."""

    called: bool = False  # by REDUCE
    instantiated: bool = False  # by NEWOBJ
    passed: bool = False  # as an argument or part of a state
    built: bool = False  # what it made was then completed by BUILD


@dataclass
class Probe:
    uses: dict[Pair, Usage] = field(default_factory=lambda: collections.defaultdict(Usage))
    built_types: set[Pair] = field(default_factory=set)  # types of the objects BUILD completed


class _Recorder(pickle._Unpickler):
    """The plain pure-Python unpickler, noting each global and what the stream does with it."""

    stack: list[Any]
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream: bytes, buffers: list[memoryview], probe: Probe) -> None:
        super().__init__(io.BytesIO(stream), buffers=buffers)
        self._probe = probe
        self._globals: dict[int, tuple[Pair, Any]] = {}
        self._made: dict[int, tuple[Pair, Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        self._globals[id(obj)] = ((module, name), obj)
        self._probe.uses.setdefault((module, name), Usage())  # named, even if never used
        return obj

    def _global(self, obj: Any) -> Pair | None:
        found = self._globals.get(id(obj))
        return found[0] if found is not None and found[1] is obj else None

    def _passed(self, value: Any, depth: int = 0) -> None:
        pair = self._global(value)
        if pair is not None:
            self._probe.uses[pair].passed = True
        if depth < 8 and type(value) in (list, tuple, set, frozenset):
            for item in value:
                self._passed(item, depth + 1)
        elif depth < 8 and type(value) is dict:
            for key, item in value.items():
                self._passed(key, depth + 1)
                self._passed(item, depth + 1)

    def _note_made(self, pair: Pair | None) -> None:
        if pair is not None:
            result = self.stack[-1]
            self._made[id(result)] = (pair, result)

    def load_reduce(self) -> None:
        args, pair = self.stack[-1], self._global(self.stack[-2])
        if pair is not None:
            self._probe.uses[pair].called = True
        self._passed(args)
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]
        self._note_made(pair)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args, pair = self.stack[-1], self._global(self.stack[-2])
        if pair is not None:
            self._probe.uses[pair].instantiated = True
        self._passed(args)
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]
        self._note_made(pair)

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        made = self._made.get(id(inst))
        if made is not None and made[1] is inst:
            self._probe.uses[made[0]].built = True
        kind = type(inst)
        self._probe.built_types.add((kind.__module__, kind.__qualname__))
        self._passed(state)
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = load_build


def probe(objects: dict[str, Any] | None = None) -> Probe:
    """Pickle every sample (with large buffers out of band, then all of them) and record."""
    found = Probe()
    for obj in (samples() if objects is None else objects).values():
        for threshold in (DEFAULT_THRESHOLD, 0):
            stream, buffers = pickled(obj, threshold)
            _Recorder(stream, buffers, found).load()
    return found


# -- comparing what came back -----------------------------------------------------------------


def assert_same(expected: Any, actual: Any, where: str = "") -> None:
    """*actual* is a faithful copy of *expected*: same types, values and dtypes."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
        if isinstance(expected, collections.defaultdict):
            assert actual.default_factory is expected.default_factory, where
    elif isinstance(expected, list | tuple | collections.deque):
        assert len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}[{i}]")
        if isinstance(expected, collections.deque):
            assert actual.maxlen == expected.maxlen, where
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape, where
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype, where
        assert actual == expected or (pd.isna(actual) and pd.isna(expected)), where
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(actual, expected, check_freq=True)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(actual, expected, check_freq=True)
    elif isinstance(expected, pd.Index):
        pd.testing.assert_index_equal(actual, expected, exact=True)
        assert getattr(actual, "freq", None) == getattr(expected, "freq", None), where
    elif isinstance(expected, pd.api.extensions.ExtensionArray):
        pd.testing.assert_extension_array_equal(actual, expected)
    elif isinstance(expected, pa.Array | pa.ChunkedArray | pa.Table | pa.RecordBatch):
        assert actual.equals(expected), where
        assert actual.type == expected.type if hasattr(expected, "type") else True, where
    elif isinstance(expected, pa.Schema | pa.Field):
        assert actual.equals(expected, check_metadata=True), where
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    elif isinstance(expected, memoryview):
        assert actual.tobytes() == expected.tobytes(), where
    elif expected is pd.NA or expected is pd.NaT:
        assert actual is expected, where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
        if isinstance(expected, datetime.datetime | datetime.time):
            assert actual.tzinfo == expected.tzinfo, where


# -- watching for side effects ---------------------------------------------------------------

# Audit events (PEP 578) that a restricted load must never cause: files, processes,
# imports, code objects, sockets, native libraries, and changes to classes.
FORBIDDEN_EVENTS = (
    "open",
    "os.",
    "subprocess.",
    "shutil.",
    "glob.",
    "exec",
    "compile",
    "import",
    "marshal.",
    "code.__new__",
    "function.__new__",
    "socket.",
    "ctypes.",
    "object.__setattr__",
    "object.__delattr__",
    "builtins.input",
    "urllib.",
    "webbrowser.",
)

_watchers: list[list[str]] = []
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watchers and event.startswith(FORBIDDEN_EVENTS):
        for seen in _watchers:
            seen.append(f"{event}{args!r}"[:300])


@contextlib.contextmanager
def forbidden_events() -> Iterator[list[str]]:
    """The forbidden audit events raised (by any thread) inside the block."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # for the life of the process; idle when nobody watches
        _hooked = True
    seen: list[str] = []
    _watchers.append(seen)
    try:
        yield seen
    finally:
        _watchers.remove(seen)


def main() -> None:
    found = probe()
    for pair in sorted(found.uses):
        usage = found.uses[pair]
        uses = [n for n in ("called", "instantiated", "passed", "built") if getattr(usage, n)]
        print(f"{pair[0]:45} {pair[1]:32} {' '.join(uses)}")
    print(f"{len(found.uses)} globals; built types:", file=sys.stderr)
    for kind in sorted(found.built_types):
        print(f"  {kind[0]}.{kind[1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
