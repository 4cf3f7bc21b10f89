"""The restricted unpickler: a sender's pickle may only build what an exact allow-list names.

`loads` runs pickle, and a pickle stream is a program: its GLOBAL and
STACK_GLOBAL opcodes fetch any attribute of any module (following dotted
names, so ``pandas.io.common`` + ``os.system`` reaches `os.system`), REDUCE
calls what it fetched, BUILD sets attributes or calls ``__setstate__``, and
APPEND/SETITEMS call methods of whatever sits below them. With
``restricted=True`` a stream runs under these rules:

* A global must be one of the exact ``(module, qualname)`` pairs of
  `DEFAULT_ALLOW_LIST`; nothing is trusted by prefix, and a dotted name is
  refused unless it is listed as such. After the import, the object found
  must really be what the pair names (its own ``__module__`` and
  ``__qualname__``, or for a constant, its type's), so a name that a module
  merely re-exports cannot stand in for a listed one. Refusing happens
  before any import.
* Each pair says how a stream may use it: *call* it (REDUCE), *instantiate*
  it (NEWOBJ, with no arguments), or only pass it as an argument. Nothing
  else is callable: not a bound method, not a result of another call.
* BUILD (``__setstate__``) only completes an object this stream has just
  made for that purpose, once, before anything else has seen it; that
  object may not be used, nested in a container or returned until it is
  built. So no class, module-level singleton, cached dtype or array already
  in use can be altered. BUILD may not change an object's class, and the
  caches a pandas object arrives with are emptied (pandas trusts them).
* APPEND(S), SETITEM(S) and ADDITEMS only fill plain containers (and
  deques, ordered and default dicts); INST, OBJ, EXT and persistent ids are
  refused: the pickles of the listed types never use them.
* Every listed pair was derived from the pickles of the supported types
  (builtins' data types, datetime, decimal, uuid and collections types,
  numpy arrays, scalars and dtypes, pandas frames, series, indexes, arrays,
  dtypes and scalars, pyarrow arrays, tables, schemas and types; see
  ``tests/hostile/allowlist_probe.py``) and reviewed: none opens files,
  imports, evaluates, unpickles or fetches attributes by name. Functions
  that take a class, a dtype name or a time zone are called through a
  guard that accepts only the classes and values their own pickles use
  (a time zone name never reaches pandas, which would read a file path
  out of ``"dateutil/..."``). ``builtins.getattr`` itself is never handed
  out: the name stands for a guard that answers exactly one question,
  ``ZoneInfo._unpickle``, whose key must name a zone of the time zone
  database; the only files a restricted load may read are that database's
  list of zones and the zone's own file.
* The objects native code trusts are checked before anyone can use them.
  numpy's ``__setstate__`` trusts its input (a malformed dtype state
  crashes it; forged flags, offsets or sizes make it read raw bytes as
  object pointers or past a buffer), so it only ever gets states numpy
  wrote itself: a dtype's state must be exactly the one numpy writes for
  the dtype its parts describe, built by numpy's public constructor, and
  an array's shape, dtype and data must agree. A pandas block manager's
  placements must cover its items exactly (pandas writes through them
  without bounds checks), category and MultiIndex codes must fall inside
  what they index, arrays must match their dtypes and masks, and pyarrow
  arrays, tables and batches pass Arrow's full validation.

Any stream outside these rules raises `UnpicklingRefused`; so does any
error raised while rebuilding. Restricted loads run the pure-Python
unpickler, because these rules need its opcode hooks: it reads a stream
about ten times slower than the C one (some 1 ms for a data frame's stream,
whose columns travel out of band; a third of a second for a million Python
ints in the stream itself). Arrow's full validation reads every offset and
string once (some 2 ms per million short strings); numpy buffers are not
read.

`AllowList.extended` adds classes or functions you trust: they may be
called or instantiated and their fresh objects built, with no further
checks.
"""

from __future__ import annotations

import enum
import functools
import importlib
import io
import pickle
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pickle import _Unpickler  # the pure-Python unpickler: its opcodes can be hooked
from types import MappingProxyType
from typing import Any, ClassVar

from blobplane.errors import BlobError


class UnpicklingRefused(BlobError, pickle.UnpicklingError):
    """A restricted load met a global, an opcode or a value it does not accept, or failed."""


class Use(enum.Enum):
    """How a pickle stream may use an allowed global."""

    CALL = "call"  # REDUCE may call it
    NEW = "new"  # NEWOBJ may instantiate it (with no arguments)
    VALUE = "value"  # it may only be passed as an argument
    TRUSTED = "trusted"  # added by the user: called or instantiated, with no checks


class Build(enum.Enum):
    """Whether BUILD may complete what an allowed call or class makes."""

    NEVER = "never"  # it is complete: BUILD on it is refused
    REQUIRED = "required"  # incomplete until BUILD (an empty array, a bare pandas array)
    CACHES = "caches"  # complete, but its pickle may carry caches: BUILD drops them


@dataclass(frozen=True, slots=True)
class Entry:
    """One allowed global: how it may be used and what guards it.

    *build*: whether what calling or instantiating it makes is then completed
    by BUILD; until then it may not be used. *guard*, for a callable: called
    as ``guard(real, *args)`` instead of ``real(*args)``. *instance_of*: the
    object is a constant, and this is its type's real ``(module, qualname)``.
    """

    use: Use
    build: Build = Build.NEVER
    guard: Callable[..., Any] | None = None
    instance_of: tuple[str, str] | None = None


def _refuse(message: str) -> UnpicklingRefused:
    return UnpicklingRefused(f"restricted unpickling: {message}")


# -- guards: the calls whose arguments decide whether they are safe ---------------------


def _real_name(obj: Any) -> tuple[str, str] | None:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if type(module) is str and type(qualname) is str:
        return module, qualname
    return None


def _is_class(obj: Any, module: str, qualname: str) -> bool:
    return isinstance(obj, type) and _real_name(obj) == (module, qualname)


def _exact_tuple(args: Any, size: int, what: str) -> tuple[Any, ...]:
    if type(args) is not tuple or len(args) != size:
        raise _refuse(f"{what} takes exactly {size} arguments here")
    return args


def _numpy_dtype(real: Any, *args: Any) -> Any:
    # Always a fresh copy (copy=True), so BUILD can never reach numpy's shared dtypes.
    spec, align, copy = _exact_tuple(args, 3, "numpy.dtype")
    if type(spec) is not str or type(align) is not bool or copy is not True:
        raise _refuse("numpy.dtype takes (str, bool, True) here")
    return real(spec, align, copy)


def _numpy_reconstruct(real: Any, *args: Any) -> Any:
    import numpy as np

    subtype, shape, code = _exact_tuple(args, 3, "numpy _reconstruct")
    if subtype is not np.ndarray or shape != (0,) or code != b"b":
        raise _refuse("numpy's _reconstruct only makes an empty plain ndarray here")
    return real(subtype, shape, code)


def _zoneinfo_attribute(real: Any, *args: Any) -> Any:
    import zoneinfo

    owner, name = _exact_tuple(args, 2, "getattr")
    if owner is not zoneinfo.ZoneInfo or name != "_unpickle":
        raise _refuse("getattr is only answered for ZoneInfo._unpickle")
    return _zoneinfo_from_key


@functools.cache
def _available_zones() -> frozenset[str]:
    import zoneinfo

    return frozenset(zoneinfo.available_timezones())


def _zoneinfo_from_key(key: Any, from_cache: Any) -> Any:
    import zoneinfo

    if type(key) is not str or from_cache not in (0, 1) or type(from_cache) not in (int, bool):
        raise _refuse("ZoneInfo._unpickle takes (str, 0 or 1)")
    if key not in _available_zones():
        raise _refuse(f"{key!r} names no zone of this system's time zone database")
    return zoneinfo.ZoneInfo(key) if from_cache else zoneinfo.ZoneInfo.no_cache(key)


_DEFAULT_DICT_FACTORIES = frozenset([list, dict, set, int])


def _defaultdict(real: Any, *args: Any) -> Any:
    if len(args) > 1 or (args and args[0] is not None and args[0] not in _DEFAULT_DICT_FACTORIES):
        raise _refuse("a defaultdict may only default to list, dict, set or int")
    return real(*args)


_ARROW_TZ = re.compile(r"[+-]\d\d:\d\d|[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*")


def _arrow_timestamp(real: Any, *args: Any) -> Any:
    # pandas resolves an Arrow zone name by itself, and reads any path after "dateutil/".
    if not 1 <= len(args) <= 2:
        raise _refuse("pyarrow.timestamp takes (unit, tz)")
    tz = args[1] if len(args) == 2 else None
    if tz is not None and (
        type(tz) is not str or not _ARROW_TZ.fullmatch(tz) or tz.startswith(("dateutil", "pytz"))
    ):
        raise _refuse(f"{tz!r} is not a time zone name or offset")
    return real(*args)


def _arrow_validated(real: Any, *args: Any) -> Any:
    # Arrow trusts lengths, offsets and buffer sizes it did not make: check them all.
    result = real(*args)
    result.validate(full=True)
    return result


_UNITS = frozenset([7, 8, 9, 10])  # numpy's codes for s, ms, us and ns: what pandas supports


def _unpickle_timestamp(real: Any, *args: Any) -> Any:
    from datetime import tzinfo

    value, freq, tz, unit = _exact_tuple(args, 4, "_unpickle_timestamp")
    if type(value) is not int or freq is not None or unit not in _UNITS:
        raise _refuse("a Timestamp is (int, None, tz, unit)")
    if tz is not None and not isinstance(tz, tzinfo):
        raise _refuse("a Timestamp's time zone must be a tzinfo object, never a name")
    return real(value, freq, tz, unit)


def _timedelta_unpickle(real: Any, *args: Any) -> Any:
    value, unit = _exact_tuple(args, 2, "_timedelta_unpickle")
    if type(value) is not int or unit not in _UNITS:
        raise _refuse("a Timedelta is (int, unit)")
    return real(value, unit)


def _nat_unpickle(real: Any, *args: Any) -> Any:
    if args != (None,):
        raise _refuse("NaT is unpickled from (None,)")
    return real(None)


def _exactly(count: int) -> Callable[..., Any]:
    def guard(real: Any, *args: Any) -> Any:
        return real(*_exact_tuple(args, count, _name(real)))

    return guard


def _name(obj: Any) -> str:
    name = _real_name(obj)
    return f"{name[0]}.{name[1]}" if name else repr(obj)


def _pandas_class(obj: Any, names: Iterable[str]) -> Any:
    for name in names:
        if _is_class(obj, "pandas", name) or _is_class(obj, "pandas.arrays", name):
            return obj
    raise _refuse(f"{obj!r} is not one of the pandas classes {sorted(names)}")


def _pyx_unpickle(classes: tuple[str, ...]) -> Callable[..., Any]:
    """Cython's unpickler for *classes*, without state: BUILD then sets it (and is checked)."""

    def guard(real: Any, *args: Any) -> Any:
        cls, checksum, state = _exact_tuple(args, 3, _name(real))
        _pandas_class(cls, classes)
        if type(checksum) is not int or state is not None:
            raise _refuse(f"{_name(real)} takes (class, int, None) here")
        return real(cls, checksum, None)

    return guard


def _index_arguments(d: Any, keys: frozenset[str]) -> dict[str, Any]:
    """The keyword arguments of an index reconstructor: only the keys its own pickles use."""
    if type(d) is not dict or not set(d) <= keys:
        raise _refuse(f"an index is rebuilt from a dict of {sorted(keys)} only")
    return d


def _array_like(value: Any, what: str) -> None:
    import numpy as np
    from pandas.api.extensions import ExtensionArray

    if not isinstance(value, np.ndarray | ExtensionArray):
        raise _refuse(f"{what} must be an array")


_INDEX_KEYS = {
    "Index": frozenset(["data", "name"]),
    "RangeIndex": frozenset(["name", "start", "stop", "step"]),
    "MultiIndex": frozenset(["levels", "codes", "sortorder", "names"]),
    "CategoricalIndex": frozenset(["data", "name"]),
    "PeriodIndex": frozenset(["data", "name"]),
}


def _new_index(real: Any, *args: Any) -> Any:
    cls, d = _exact_tuple(args, 2, "_new_Index")
    name = next((n for n in _INDEX_KEYS if _is_class(cls, "pandas", n)), None)
    if name is None:
        raise _refuse(f"_new_Index does not build {cls!r}")
    d = _index_arguments(d, _INDEX_KEYS[name])
    if "data" in d:
        _array_like(d["data"], "an index's data")
    if name == "PeriodIndex":
        from pandas.arrays import PeriodArray

        if type(d.get("data")) is not PeriodArray:
            raise _refuse("a PeriodIndex is rebuilt from a PeriodArray")
    if name == "MultiIndex":
        _check_multiindex(d)
    return real(cls, d)


def _check_multiindex(d: dict[str, Any]) -> None:
    """Codes inside their levels: _new_Index skips pandas' own check, and pandas indexes by them."""
    import numpy as np

    levels, codes = d.get("levels"), d.get("codes")
    if type(levels) is not list or type(codes) is not list or len(levels) != len(codes):
        raise _refuse("a MultiIndex has a list of levels and a list of codes, one per level")
    lengths = set()
    for level, level_codes in zip(levels, codes, strict=True):
        _index(level, "a MultiIndex level")
        if type(level_codes) is not np.ndarray or level_codes.dtype.kind != "i":
            raise _refuse("a MultiIndex's codes are integer arrays")
        if level_codes.ndim != 1 or (
            level_codes.size and (level_codes.min() < -1 or level_codes.max() >= len(level))
        ):
            raise _refuse("a MultiIndex's codes must fall inside their levels")
        lengths.add(len(level_codes))
    if len(lengths) > 1:
        raise _refuse("a MultiIndex's codes are all as long")
    # A claimed sort order would let pandas skip sorting; it recomputes it when needed.
    d["sortorder"] = None


def _index(value: Any, what: str) -> None:
    from pandas import Index

    if not isinstance(value, Index):
        raise _refuse(f"{what} must be an Index")


def _offset_or_none(value: Any) -> None:
    from pandas.tseries.offsets import BaseOffset

    if value is not None and not isinstance(value, BaseOffset):
        raise _refuse("a frequency must be an offset object")


def _new_datetimelike_index(index: str, array: str) -> Callable[..., Any]:
    def guard(real: Any, *args: Any) -> Any:
        import pandas.arrays

        cls, d = _exact_tuple(args, 2, _name(real))
        if not _is_class(cls, "pandas", index):
            raise _refuse(f"{_name(real)} only builds a {index}")
        d = _index_arguments(d, frozenset(["data", "name", "freq"]))
        if type(d.get("data")) is not getattr(pandas.arrays, array):
            raise _refuse(f"a {index} is rebuilt from a {array}")
        _offset_or_none(d.get("freq"))
        return real(cls, d)

    return guard


def _new_interval_index(real: Any, *args: Any) -> Any:
    cls, d = _exact_tuple(args, 2, "_new_IntervalIndex")
    if not _is_class(cls, "pandas", "IntervalIndex"):
        raise _refuse("_new_IntervalIndex only builds an IntervalIndex")
    d = _index_arguments(d, frozenset(["left", "right", "closed", "name"]))
    _index(d.get("left"), "an interval's left side")
    _index(d.get("right"), "an interval's right side")
    return real(cls, d)


def _unpickle_block(real: Any, *args: Any) -> Any:
    import numpy as np
    from pandas._libs.internals import BlockPlacement

    values, placement, ndim = _exact_tuple(args, 3, "_unpickle_block")
    _array_like(values, "a block's values")
    if ndim not in (1, 2) or type(ndim) is not int:
        raise _refuse("a block has 1 or 2 dimensions")
    if not isinstance(placement, slice | BlockPlacement) and not (
        type(placement) is np.ndarray and placement.dtype.kind == "i" and placement.ndim == 1
    ):
        raise _refuse("a block's placement is a slice or an array of integers")
    return real(values, placement, ndim)


def _block_manager(real: Any, *args: Any) -> Any:
    # pandas writes through the placements without bounds checks (_rebuild_blknos_and_blklocs).
    import numpy as np
    from pandas import Index
    from pandas.core.internals.blocks import Block

    blocks, axes = _exact_tuple(args, 2, "BlockManager")
    if type(blocks) is not tuple or type(axes) is not list or len(axes) != 2:
        raise _refuse("a BlockManager is (tuple of blocks, [items, index])")
    if not all(isinstance(axis, Index) for axis in axes):
        raise _refuse("a BlockManager's axes are indexes")
    items, rows = len(axes[0]), len(axes[1])
    seen = np.zeros(items, dtype=bool)
    for block in blocks:
        if not isinstance(block, Block) or block.ndim != 2:
            raise _refuse("a BlockManager holds two-dimensional blocks")
        if len(block.mgr_locs) > items:
            raise _refuse("a block claims more items than its manager has")
        locs = block.mgr_locs.as_array
        if len(locs) and (locs.min() < 0 or locs.max() >= items or seen[locs].any()):
            raise _refuse("a block's placement leaves its manager's items or repeats one")
        if len(np.unique(locs)) != len(locs):
            raise _refuse("a block's placement repeats an item")
        seen[locs] = True
        values = block.values
        if isinstance(values, np.ndarray) and values.ndim != 2:
            raise _refuse("a block of a BlockManager holds a two-dimensional ndarray")
        shape = values.shape if values.ndim == 2 else (1, len(values))
        if shape != (len(locs), rows):
            raise _refuse("a block's values do not match its placement and its manager's rows")
    if not seen.all():
        raise _refuse("a BlockManager's blocks leave some of its items out")
    return real(blocks, axes)


# -- checks of what BUILD completed --------------------------------------------------------------


# numpy's own __setstate__ trusts its input: a state whose names and fields disagree
# crashes it, and one with forged flags, offsets or sizes makes it read raw bytes as
# object pointers or past a buffer. So numpy only ever sees states it wrote itself.

_DATETIME_UNITS = frozenset(
    ["Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as", "generic"]
)
_ALIGNED_STRUCT = 0x80  # numpy's NPY_ALIGNED_STRUCT flag


def _dtype_state(dtype: Any, state: Any) -> tuple[Any, Any]:
    """The dtype *state* describes, built by numpy's public constructor, and numpy's state for it.

    *dtype* is what ``numpy.dtype(spec, align, True)`` just made; the state must be
    exactly the one numpy writes for the dtype it describes.
    """
    import numpy as np

    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise _refuse("a dtype's state is numpy's tuple of 8 or 9")
    order, subarray, names, fields, size, _, flags = state[1:8]
    if order not in ("<", ">", "|", "=") or type(size) is not int or type(flags) is not int:
        raise _refuse("a dtype's state is malformed")
    if subarray is not None or names is not None:
        if dtype.kind != "V":
            raise _refuse("only a void dtype has fields or a subarray")
        reference = _void_dtype(subarray, names, fields, size, flags)
    elif dtype.kind in "mM":
        meta = state[8] if len(state) == 9 else None
        if type(meta) is not tuple or len(meta) != 2 or meta[0] is not None:
            raise _refuse("a datetime dtype's state carries its unit")
        unit = meta[1]
        if (
            type(unit) is not tuple
            or len(unit) != 4
            or type(unit[0]) is not bytes
            or unit[0].decode("ascii", "replace") not in _DATETIME_UNITS
            or type(unit[1]) is not int
            or not 1 <= unit[1] < 1 << 31
            or unit[2:] != (1, 1)
        ):
            raise _refuse("a datetime dtype's unit is malformed")
        name = unit[0].decode()
        reference = np.dtype(
            f"{dtype.char}8" if name == "generic" else f"{dtype.char}8[{unit[1]}{name}]"
        )
    elif dtype.kind in "SUV":
        chars = size // 4 if dtype.kind == "U" else size
        if size < 0 or (dtype.kind == "U" and size % 4):
            raise _refuse("a flexible dtype's size is malformed")
        reference = np.dtype(f"{dtype.char}{chars}")
    else:
        reference = np.dtype(dtype.char)
    if order in "<>":
        reference = reference.newbyteorder(order)
    expected = reference.__reduce__()[2]
    try:
        same = type(reference) is type(dtype) and bool(expected == state)
    except Exception:
        same = False
    if not same:
        raise _refuse(f"a dtype's state is not numpy's own for {reference}")
    return reference, expected


def _void_dtype(subarray: Any, names: Any, fields: Any, size: int, flags: int) -> Any:
    import numpy as np

    if subarray is not None:
        if names is not None or type(subarray) is not tuple or len(subarray) != 2:
            raise _refuse("a subarray dtype's state is malformed")
        base, shape = subarray
        if not isinstance(base, np.dtype) or type(shape) is not tuple:
            raise _refuse("a subarray is a dtype and a shape")
        if not all(type(n) is int and 0 <= n < 1 << 31 for n in shape):
            raise _refuse("a subarray's shape is malformed")
        return np.dtype((base, shape))
    if (
        type(names) is not tuple
        or type(fields) is not dict
        or not all(type(n) is str for n in names)
    ):
        raise _refuse("a structured dtype has a tuple of names and a dict of fields")
    formats, offsets, titles = [], [], []
    for name in names:
        field = fields.get(name)
        if (
            type(field) is not tuple
            or len(field) not in (2, 3)
            or not isinstance(field[0], np.dtype)
            or type(field[1]) is not int
        ):
            raise _refuse("a field is a dtype, an offset and maybe a title")
        formats.append(field[0])
        offsets.append(field[1])
        titles.append(field[2] if len(field) == 3 else None)
    spec: Any = {"names": list(names), "formats": formats, "offsets": offsets, "itemsize": size}
    if any(title is not None for title in titles):
        spec["titles"] = titles
    return np.dtype(spec, align=bool(flags & _ALIGNED_STRUCT))


def _same_dtype(reference: Any) -> Callable[[Any], None]:
    def check(dtype: Any) -> None:
        same = (
            reference == dtype
            and reference.flags == dtype.flags
            and reference.itemsize == dtype.itemsize
            and reference.alignment == dtype.alignment
            and reference.isalignedstruct == dtype.isalignedstruct
            and reference.str == dtype.str
        )
        if not same:
            raise _refuse(f"numpy did not rebuild the dtype {reference}")

    return check


def _ndarray_state(array: Any, state: Any) -> Any:
    """ndarray.__setstate__'s input, checked: sizes numpy would otherwise trust."""
    import math

    import numpy as np

    if type(state) is not tuple or len(state) != 5 or state[0] != 1:
        raise _refuse("an array's state is numpy's tuple of 5")
    _, shape, dtype, fortran, data = state
    if type(shape) is not tuple or not all(type(n) is int and 0 <= n < 1 << 62 for n in shape):
        raise _refuse("an array's shape is malformed")
    if not isinstance(dtype, np.dtype) or type(fortran) is not bool:
        raise _refuse("an array's state holds a dtype and a bool")
    count = math.prod(shape)
    if dtype.hasobject:
        if type(data) is not list or len(data) != count:
            raise _refuse("an array of objects is rebuilt from a list of its items")
    elif type(data) not in (bytes, bytearray) or len(data) != count * dtype.itemsize:
        raise _refuse("an array's data must be as long as its shape and dtype say")
    return state


def _check_ndarray(array: Any) -> None:
    import numpy as np

    if type(array) is not np.ndarray:
        raise _refuse("only plain ndarrays are rebuilt")


def _empty_caches(state: Any) -> None:
    # pandas trusts what its caches hold (a dtype, an index's engine): it recomputes them.
    parts = state if type(state) is tuple else (state,)
    for part in parts:
        if type(part) is dict and "_cache" in part:
            part["_cache"] = {}


def _check_frame(frame: Any) -> None:
    from pandas.core.internals.managers import BlockManager

    if type(frame.__dict__.get("_mgr")) is not BlockManager:
        raise _refuse("a DataFrame holds a BlockManager")


def _check_series(series: Any) -> None:
    from pandas.core.internals.managers import SingleBlockManager

    if type(series.__dict__.get("_mgr")) is not SingleBlockManager:
        raise _refuse("a Series holds a SingleBlockManager")


def _check_single_block_manager(manager: Any) -> None:
    import numpy as np
    from pandas import Index

    if len(manager.axes) != 1 or len(manager.blocks) != 1:
        raise _refuse("a SingleBlockManager has one axis and one block")
    (axis,), (block,) = manager.axes, manager.blocks
    if not isinstance(axis, Index) or block.values.ndim != 1 or len(block.values) != len(axis):
        raise _refuse("a SingleBlockManager's block must match its index")
    if not np.array_equal(block.mgr_locs.as_array, np.arange(len(axis))):
        raise _refuse("a SingleBlockManager's block covers its whole index")


def _ndarray_of(obj: Any, attribute: str, kinds: str, ndims: tuple[int, ...] = (1,)) -> Any:
    import numpy as np

    value = obj.__dict__.get(attribute) if attribute in obj.__dict__ else getattr(obj, attribute)
    if type(value) is not np.ndarray or value.dtype.kind not in kinds or value.ndim not in ndims:
        raise _refuse(f"{type(obj).__name__}.{attribute} must be an ndarray of kind {kinds!r}")
    return value


def _check_masked(kinds: str) -> Callable[[Any], None]:
    def check(array: Any) -> None:
        data = _ndarray_of(array, "_data", kinds)
        mask = _ndarray_of(array, "_mask", "b")
        if mask.shape != data.shape:
            raise _refuse("a masked array's mask must match its data")
        if array.dtype.numpy_dtype != data.dtype:
            raise _refuse("a masked array's dtype must match its data")

    return check


def _check_datetimelike(kind: str) -> Callable[[Any], None]:
    def check(array: Any) -> None:
        import numpy as np

        values = _ndarray_of(array, "_ndarray", kind, (1, 2))
        dtype = array.dtype
        expected = dtype if isinstance(dtype, np.dtype) else getattr(dtype, "base", None)
        if expected != values.dtype:
            raise _refuse("a datetime-like array's values must match its dtype")
        if kind == "M" and not isinstance(dtype, np.dtype):
            _check_datetime_tz_dtype(dtype)
        _offset_or_none(array.__dict__.get("_freq"))

    return check


def _check_period_array(array: Any) -> None:
    import numpy as np
    from pandas import PeriodDtype

    values = _ndarray_of(array, "_ndarray", "i", (1, 2))
    if values.dtype != np.int64 or type(array.dtype) is not PeriodDtype:
        raise _refuse("a PeriodArray holds int64 ordinals and a PeriodDtype")
    _offset_or_none(array.__dict__.get("_freq"))


def _check_categorical(array: Any) -> None:
    from pandas import CategoricalDtype

    codes = _ndarray_of(array, "_ndarray", "i", (1, 2))
    dtype = array.dtype
    if type(dtype) is not CategoricalDtype or dtype.categories is None:
        raise _refuse("a Categorical holds a CategoricalDtype with categories")
    if codes.size and (codes.min() < -1 or codes.max() >= len(dtype.categories)):
        raise _refuse("a Categorical's codes must fall inside its categories")


def _check_string_array(array: Any) -> None:
    from pandas import StringDtype
    from pandas._libs import lib

    values = _ndarray_of(array, "_ndarray", "O", (1, 2))
    dtype = array.dtype
    if type(dtype) is not StringDtype or dtype.storage != "python":
        raise _refuse("a StringArray holds a python-backed StringDtype")
    if values.size and not lib.is_string_array(values.ravel(), skipna=True):
        raise _refuse("a StringArray holds strings and missing values only")


def _check_interval_array(array: Any) -> None:
    from pandas import IntervalDtype

    left, right, dtype = array.__dict__.get("_left"), array.__dict__.get("_right"), array.dtype
    _array_like(left, "an interval array's left side")
    _array_like(right, "an interval array's right side")
    if type(left) is not type(right) or left.shape != right.shape or left.ndim != 1:
        raise _refuse("an interval array's sides must match")
    if type(dtype) is not IntervalDtype or dtype.subtype != left.dtype:
        raise _refuse("an interval array's dtype must match its sides")
    _check_interval_dtype(dtype)


def _check_sparse_array(array: Any) -> None:
    from pandas import SparseDtype
    from pandas._libs.sparse import BlockIndex, IntIndex

    values = _ndarray_of(array, "_sparse_values", "biufcmMOSUV")
    index, dtype = array.__dict__.get("_sparse_index"), array.__dict__.get("_dtype")
    if type(index) not in (IntIndex, BlockIndex) or index.npoints != len(values):
        raise _refuse("a SparseArray's index must match its values")
    if type(dtype) is not SparseDtype or dtype.subtype != values.dtype:
        raise _refuse("a SparseArray's dtype must match its values")


def _check_arrow_array(array: Any) -> None:
    import pyarrow as pa
    from pandas import ArrowDtype, StringDtype

    chunks, dtype = array.__dict__.get("_pa_array"), array.__dict__.get("_dtype")
    if type(chunks) is not pa.ChunkedArray:
        raise _refuse("an Arrow-backed array holds a ChunkedArray")
    if type(dtype) is ArrowDtype:
        matches = dtype.pyarrow_dtype == chunks.type
    else:
        matches = type(dtype) is StringDtype and dtype.storage == "pyarrow"
        matches = matches and chunks.type in (pa.string(), pa.large_string())
    if not matches:
        raise _refuse("an Arrow-backed array's dtype must match its data")


def _check_categorical_dtype(dtype: Any) -> None:
    from pandas import Index

    categories = dtype.__dict__.get("_categories")
    if categories is not None and (not isinstance(categories, Index) or not categories.is_unique):
        raise _refuse("categories are a unique Index")
    if dtype.__dict__.get("_ordered") not in (True, False, None):
        raise _refuse("a CategoricalDtype is ordered or not")


def _check_datetime_tz_dtype(dtype: Any) -> None:
    from datetime import tzinfo

    if not isinstance(dtype.__dict__.get("_tz"), tzinfo):
        raise _refuse("a DatetimeTZDtype's time zone must be a tzinfo object, never a name")
    if dtype.__dict__.get("_unit") not in ("s", "ms", "us", "ns"):
        raise _refuse("a DatetimeTZDtype's unit is s, ms, us or ns")


def _check_interval_dtype(dtype: Any) -> None:
    import numpy as np

    if dtype.__dict__.get("_closed") not in ("left", "right", "both", "neither", None):
        raise _refuse("an interval is closed left, right, both or neither")
    subtype = dtype.__dict__.get("_subtype")
    if subtype is not None and not isinstance(subtype, np.dtype):
        _check_any_dtype(subtype)


def _check_any_dtype(dtype: Any) -> None:
    import numpy as np
    from pandas.api.extensions import ExtensionDtype

    if not isinstance(dtype, np.dtype | ExtensionDtype):
        raise _refuse("a dtype must be a dtype object, never a name")


def _check_sparse_dtype(dtype: Any) -> None:
    import numpy as np

    if not isinstance(dtype.__dict__.get("_dtype"), np.dtype):
        raise _refuse("a SparseDtype's subtype must be a numpy dtype")


def _check_arrow_dtype(dtype: Any) -> None:
    import pyarrow as pa

    if not isinstance(dtype.__dict__.get("pyarrow_dtype"), pa.DataType):
        raise _refuse("an ArrowDtype holds an Arrow type")
    if dtype.__dict__.get("_storage", "pyarrow") != "pyarrow":
        raise _refuse("an ArrowDtype is stored in pyarrow")


def _check_only_caches(dtype: Any) -> None:
    if set(dtype.__dict__) - {"_cache"}:
        raise _refuse(f"a {type(dtype).__name__}'s pickle may only carry its caches")


def _check_uuid(value: Any) -> None:
    number = getattr(value, "int", None)
    if type(number) is not int or not 0 <= number < 1 << 128:
        raise _refuse("a UUID is a 128-bit integer")


_MASKED_DTYPES = [
    "BooleanDtype",
    "Float32Dtype",
    "Float64Dtype",
    "Int16Dtype",
    "Int32Dtype",
    "Int64Dtype",
    "Int8Dtype",
    "UInt16Dtype",
    "UInt32Dtype",
    "UInt64Dtype",
    "UInt8Dtype",
]

# Every type a stream may BUILD, and what must hold once it is built, keyed by the
# type's real name (numpy's dtypes and arrays have their own states: see _prepared).
_BUILT_CHECKS: Mapping[tuple[str, str], Callable[[Any], None]] = MappingProxyType(
    {
        ("pandas", "DataFrame"): _check_frame,
        ("pandas", "Series"): _check_series,
        ("pandas.core.internals.managers", "SingleBlockManager"): _check_single_block_manager,
        ("pandas.arrays", "IntegerArray"): _check_masked("iu"),
        ("pandas.arrays", "FloatingArray"): _check_masked("f"),
        ("pandas.arrays", "BooleanArray"): _check_masked("b"),
        ("pandas.arrays", "DatetimeArray"): _check_datetimelike("M"),
        ("pandas.arrays", "TimedeltaArray"): _check_datetimelike("m"),
        ("pandas.arrays", "PeriodArray"): _check_period_array,
        ("pandas", "Categorical"): _check_categorical,
        ("pandas.arrays", "StringArray"): _check_string_array,
        ("pandas.arrays", "IntervalArray"): _check_interval_array,
        ("pandas.arrays", "SparseArray"): _check_sparse_array,
        ("pandas.arrays", "ArrowExtensionArray"): _check_arrow_array,
        ("pandas.arrays", "ArrowStringArray"): _check_arrow_array,
        ("pandas", "CategoricalDtype"): _check_categorical_dtype,
        ("pandas", "DatetimeTZDtype"): _check_datetime_tz_dtype,
        ("pandas", "IntervalDtype"): _check_interval_dtype,
        ("pandas", "SparseDtype"): _check_sparse_dtype,
        ("pandas", "ArrowDtype"): _check_arrow_dtype,
        ("uuid", "UUID"): _check_uuid,
        **{("pandas", name): _check_only_caches for name in _MASKED_DTYPES},
    }
)


# -- the list -----------------------------------------------------------------------------------

_CALL = Entry(Use.CALL)
_VALUE = Entry(Use.VALUE)


def _call(guard: Callable[..., Any], build: Build = Build.NEVER) -> Entry:
    return Entry(Use.CALL, build=build, guard=guard)


def _new(build: Build = Build.REQUIRED) -> Entry:
    return Entry(Use.NEW, build=build)


_PANDAS_OFFSETS = [
    "BusinessDay",
    "BusinessMonthBegin",
    "BusinessMonthEnd",
    "Day",
    "Hour",
    "Micro",
    "Milli",
    "Minute",
    "MonthBegin",
    "MonthEnd",
    "Nano",
    "QuarterBegin",
    "QuarterEnd",
    "Second",
    "SemiMonthBegin",
    "SemiMonthEnd",
    "Week",
    "YearBegin",
    "YearEnd",
]

_PYARROW_TYPE_FACTORIES = [
    "binary",
    "decimal128",
    "decimal256",
    "decimal32",
    "decimal64",
    "dictionary",
    "field",
    "large_list",
    "large_list_view",
    "list_",
    "list_view",
    "map_",
    "py_buffer",
    "run_end_encoded",
    "scalar",
    "schema",
    "struct",
    "type_for_alias",
    "union",
]

_DEFAULT_ENTRIES: dict[tuple[str, str], Entry] = {
    # blobplane's own reducers (reducers.py): numpy.frombuffer, bytes(), memoryview()
    ("blobplane.objects.reducers", "_rebuild_array"): _CALL,
    ("blobplane.objects.reducers", "_rebuild_memoryview"): _CALL,
    ("builtins", "complex"): _CALL,
    ("builtins", "range"): _CALL,
    ("builtins", "slice"): _CALL,
    ("builtins", "getattr"): _call(_zoneinfo_attribute),
    # what a defaultdict may default to
    ("builtins", "dict"): _VALUE,
    ("builtins", "int"): _VALUE,
    ("builtins", "list"): _VALUE,
    ("builtins", "set"): _VALUE,
    ("collections", "OrderedDict"): _CALL,
    ("collections", "defaultdict"): _call(_defaultdict),
    ("collections", "deque"): _CALL,
    ("datetime", "date"): _CALL,
    ("datetime", "datetime"): _CALL,
    ("datetime", "time"): _CALL,
    ("datetime", "timedelta"): _CALL,
    ("datetime", "timezone"): _CALL,
    ("decimal", "Decimal"): _CALL,
    ("uuid", "UUID"): _new(),
    ("zoneinfo", "ZoneInfo"): _VALUE,
    # numpy
    ("numpy", "dtype"): _call(_numpy_dtype, Build.REQUIRED),
    ("numpy", "ndarray"): _VALUE,
    ("numpy._core.multiarray", "_reconstruct"): _call(_numpy_reconstruct, Build.REQUIRED),
    ("numpy._core.multiarray", "scalar"): _CALL,
    ("numpy._core.numeric", "_frombuffer"): _CALL,
    # pandas: containers and their managers
    ("pandas", "DataFrame"): _new(),
    ("pandas", "Series"): _new(),
    ("pandas.core.internals.managers", "BlockManager"): _call(_block_manager),
    ("pandas.core.internals.managers", "SingleBlockManager"): _new(),
    ("pandas._libs.internals", "_unpickle_block"): _call(_unpickle_block),
    # pandas: indexes
    ("pandas", "CategoricalIndex"): _VALUE,
    ("pandas", "DatetimeIndex"): _VALUE,
    ("pandas", "Index"): _VALUE,
    ("pandas", "IntervalIndex"): _VALUE,
    ("pandas", "MultiIndex"): _VALUE,
    ("pandas", "PeriodIndex"): _VALUE,
    ("pandas", "RangeIndex"): _VALUE,
    ("pandas", "TimedeltaIndex"): _VALUE,
    ("pandas.core.indexes.base", "_new_Index"): _call(_new_index),
    ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"): _call(
        _new_datetimelike_index("DatetimeIndex", "DatetimeArray")
    ),
    ("pandas.core.indexes.timedeltas", "_new_TimedeltaIndex"): _call(
        _new_datetimelike_index("TimedeltaIndex", "TimedeltaArray")
    ),
    ("pandas.core.indexes.interval", "_new_IntervalIndex"): _call(_new_interval_index),
    # pandas: arrays
    ("pandas", "Categorical"): _VALUE,
    ("pandas.arrays", "DatetimeArray"): _VALUE,
    ("pandas.arrays", "IntervalArray"): _VALUE,
    ("pandas.arrays", "PeriodArray"): _VALUE,
    ("pandas.arrays", "StringArray"): _VALUE,
    ("pandas.arrays", "TimedeltaArray"): _VALUE,
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"): _call(
        _pyx_unpickle(
            ("Categorical", "DatetimeArray", "PeriodArray", "StringArray", "TimedeltaArray")
        ),
        Build.REQUIRED,
    ),
    ("pandas._libs.interval", "__pyx_unpickle_IntervalMixin"): _call(
        _pyx_unpickle(("IntervalArray",)), Build.REQUIRED
    ),
    ("pandas.arrays", "ArrowExtensionArray"): _new(),
    ("pandas.arrays", "ArrowStringArray"): _new(),
    ("pandas.arrays", "BooleanArray"): _new(),
    ("pandas.arrays", "FloatingArray"): _new(),
    ("pandas.arrays", "IntegerArray"): _new(),
    ("pandas.arrays", "SparseArray"): _new(),
    # IntIndex and BlockIndex check their integrity unless told not to
    ("pandas._libs.sparse", "BlockIndex"): _call(_exactly(3)),
    ("pandas._libs.sparse", "IntIndex"): _call(_exactly(2)),
    # pandas: dtypes
    ("pandas", "ArrowDtype"): _new(),
    ("pandas", "CategoricalDtype"): _new(),
    ("pandas", "DatetimeTZDtype"): _new(),
    ("pandas", "IntervalDtype"): _new(),
    ("pandas", "SparseDtype"): _new(),
    **{("pandas", name): _new(Build.CACHES) for name in _MASKED_DTYPES},
    ("pandas", "PeriodDtype"): _CALL,
    ("pandas", "StringDtype"): _CALL,
    # pandas: scalars
    ("pandas", "Interval"): _CALL,
    ("pandas", "NA"): Entry(Use.VALUE, instance_of=("pandas.api.typing", "NAType")),
    ("pandas", "Period"): _CALL,
    ("pandas._libs.tslibs.nattype", "_nat_unpickle"): _call(_nat_unpickle),
    ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"): _call(_timedelta_unpickle),
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"): _call(_unpickle_timestamp),
    **{("pandas._libs.tslibs.offsets", name): _CALL for name in _PANDAS_OFFSETS},
    # pyarrow
    ("pyarrow.lib", "_reconstruct_record_batch"): _call(_arrow_validated),
    ("pyarrow.lib", "_reconstruct_table"): _call(_arrow_validated),
    ("pyarrow.lib", "_restore_array"): _call(_arrow_validated),
    ("pyarrow.lib", "chunked_array"): _call(_arrow_validated),
    ("pyarrow.lib", "timestamp"): _call(_arrow_timestamp),
    **{("pyarrow.lib", name): _CALL for name in _PYARROW_TYPE_FACTORIES},
}


@dataclass(frozen=True)
class AllowList:
    """The globals a restricted load may use: exact ``(module, qualname)`` pairs, and how.

    Never by prefix: a module's other names, and whatever they import, stay refused.
    """

    entries: Mapping[tuple[str, str], Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.entries)

    def allows(self, module: str, qualname: str) -> bool:
        return (module, qualname) in self.entries

    def extended(self, pairs: Iterable[tuple[str, str]]) -> AllowList:
        """This list plus classes or functions you trust, each an exact ``(module, qualname)``.

        The stream may call them or instantiate them and set the state of
        what they make, so trust only what is safe with any arguments.
        """
        added: dict[tuple[str, str], Entry] = {}
        for pair in pairs:
            if (
                type(pair) is not tuple
                or len(pair) != 2
                or not all(type(part) is str and part for part in pair)
            ):
                raise TypeError(f"an allow-list entry is a (module, qualname) pair, not {pair!r}")
            added[pair] = self.entries.get(pair, Entry(Use.TRUSTED))
        return AllowList({**self.entries, **added})


DEFAULT_ALLOW_LIST = AllowList(_DEFAULT_ENTRIES)

_CONTAINERS = frozenset(["OrderedDict", "defaultdict", "deque"])


def _is_container(obj: Any) -> bool:
    kind = type(obj)
    if kind in (list, dict, set):
        return True
    return kind.__module__ == "collections" and kind.__qualname__ in _CONTAINERS


class RestrictedUnpickler(_Unpickler):
    """Loads a stream under the rules of this module's docstring."""

    # The pure-Python unpickler's state (typeshed does not declare it).
    stack: list[Any]
    metastack: list[list[Any]]
    memo: dict[int, Any]
    pop_mark: Callable[[], list[Any]]
    read: Callable[[int], bytes]
    append: Callable[[Any], None]

    # Its opcode table, with the opcodes below replaced.
    dispatch: ClassVar[dict[int, Any]] = dict(_Unpickler.dispatch)

    def __init__(self, file: io.BytesIO, buffers: list[Any], allow: AllowList) -> None:
        super().__init__(file, buffers=buffers)
        self._allow = allow
        # id -> (object, entry) for every callable or class this stream was handed
        self._handed: dict[int, tuple[Any, Entry]] = {}
        # id -> object: made by the stream, must be built before any use
        self._unbuilt: dict[int, Any] = {}
        # id -> (object, checked): may be built while nothing else has seen it; checked
        # unless it comes from a trusted user entry
        self._fresh: dict[int, tuple[Any, bool]] = {}

    def load(self) -> Any:
        try:
            return super().load()
        except (UnpicklingRefused, MemoryError):
            raise
        except Exception as exc:
            raise _refuse(f"the stream failed to load: {type(exc).__name__}: {exc}") from exc

    # -- globals -----------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if type(module) is not str or type(name) is not str:
            raise _refuse("a global is named by two strings")
        entry = self._allow.entries.get((module, name))
        if entry is None:
            raise _refuse(
                f"{module}.{name} is not on the allow-list; add the exact (module, qualname) "
                "with AllowList.extended() if you trust it with any arguments"
            )
        sys.audit("pickle.find_class", module, name)
        try:
            found: Any = sys.modules.get(module) or importlib.import_module(module)
            for part in name.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as exc:
            raise _refuse(f"{module}.{name} cannot be found here: {exc}") from exc
        real = _real_name(found) if entry.instance_of is None else _real_name(type(found))
        expected = (module, name) if entry.instance_of is None else entry.instance_of
        if real != expected:
            raise _refuse(f"{module}.{name} is really {real}, not what the allow-list names")
        if entry.use is Use.CALL and entry.guard is not None:
            found = functools.partial(entry.guard, found)
        if entry.use is not Use.VALUE:
            self._handed[id(found)] = (found, entry)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("persistent ids are not accepted")

    def _entry(self, obj: Any, uses: tuple[Use, ...], opcode: str) -> Entry:
        handed = self._handed.get(id(obj))
        if handed is None or handed[0] is not obj or handed[1].use not in uses:
            raise _refuse(f"{opcode} on {_describe(obj)}, which the allow-list does not allow")
        return handed[1]

    # -- what may consume what -----------------------------------------------------------------

    def _consume(self, objs: Iterable[Any]) -> None:
        """*objs* go into a container, a call or a state: none may still await its BUILD."""
        if not self._unbuilt and not self._fresh:
            return
        for obj in objs:
            key = id(obj)
            if key in self._unbuilt:
                raise _refuse(f"{_describe(obj)} is used before it is built")
            self._fresh.pop(key, None)

    def _made(self, obj: Any, entry: Entry) -> None:
        if entry.use is Use.TRUSTED:
            self._fresh[id(obj)] = (obj, False)
        elif entry.build is Build.REQUIRED:
            self._unbuilt[id(obj)] = obj
        elif entry.build is Build.CACHES:
            self._fresh[id(obj)] = (obj, True)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        entry = self._entry(func, (Use.CALL, Use.TRUSTED), "REDUCE")
        if type(args) is not tuple:
            raise _refuse("REDUCE takes a tuple of arguments")
        self._consume((args,))
        _no_range(args)
        result = self._call(func, args)
        self.stack[-1] = result
        self._made(result, entry)
        if result is _zoneinfo_from_key:  # what the getattr guard answers may be called
            self._handed[id(result)] = (result, _CALL)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        try:
            return func(*args, **(kwargs or {}))
        except UnpicklingRefused:
            raise
        except Exception as exc:
            raise _refuse(f"rebuilding with {_describe(func)} failed: {exc!r}") from exc

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._newobj(cls, args, {})

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._newobj(cls, args, kwargs)

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _newobj(self, cls: Any, args: Any, kwargs: Any) -> None:
        entry = self._entry(cls, (Use.NEW, Use.TRUSTED), "NEWOBJ")
        if type(args) is not tuple or type(kwargs) is not dict or not isinstance(cls, type):
            raise _refuse("NEWOBJ takes a class, a tuple and a dict")
        if entry.use is Use.NEW and (args or kwargs):
            raise _refuse(f"{_describe(cls)} is instantiated with no arguments")
        self._consume((args, kwargs))
        _no_range((args, kwargs))
        obj = self._call(cls.__new__, (cls, *args), kwargs)
        self.stack.append(obj)
        self._made(obj, entry)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        key = id(inst)
        fresh = self._fresh.get(key, (None, False))
        if self._unbuilt.get(key) is inst:
            del self._unbuilt[key]
            checked = True
        elif fresh[0] is inst:
            del self._fresh[key]
            checked = fresh[1]
        else:
            raise _refuse(f"BUILD on {_describe(inst)}, which is not a fresh object of this stream")
        self._consume((state,))
        check = None
        if checked:
            state, check = _prepared(inst, state)
        kind = type(inst)
        try:
            _build(inst, state)
            if type(inst) is not kind:  # pandas' __setstate__ sets any attribute, __class__ too
                raise _refuse(f"setting the state of a {kind.__name__} changed its class")
            if check is not None:
                check(inst)
        except UnpicklingRefused:
            raise
        except Exception as exc:
            raise _refuse(f"setting the state of {_describe(inst)} failed: {exc!r}") from exc

    dispatch[pickle.BUILD[0]] = load_build

    def _fill(self, items: list[Any], target: Any) -> None:
        if not _is_container(target):
            raise _refuse(f"only plain containers are filled, not {_describe(target)}")
        self._consume(items)

    def load_append(self) -> None:
        self._fill(self.stack[-1:], self.stack[-2])
        _Unpickler.load_append(self)  # type: ignore[attr-defined]

    dispatch[pickle.APPEND[0]] = load_append

    def load_setitem(self) -> None:
        self._fill(self.stack[-2:], self.stack[-3])
        _Unpickler.load_setitem(self)  # type: ignore[attr-defined]

    dispatch[pickle.SETITEM[0]] = load_setitem

    def _fill_after_mark(self) -> None:
        # After MARK, `stack` holds the items; what they fill tops the stack saved below it.
        if not self.metastack or not self.metastack[-1]:
            raise _refuse("nothing to fill below the mark")
        self._fill(self.stack, self.metastack[-1][-1])

    def load_appends(self) -> None:
        self._fill_after_mark()
        _Unpickler.load_appends(self)  # type: ignore[attr-defined]

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitems(self) -> None:
        self._fill_after_mark()
        _Unpickler.load_setitems(self)  # type: ignore[attr-defined]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        self._fill_after_mark()
        _Unpickler.load_additems(self)  # type: ignore[attr-defined]

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_bytearray8(self) -> None:
        # pickle's own version allocates (and zeroes) the declared size before reading.
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)
        if len(data) != size:
            raise _refuse("a bytearray runs past the end of the stream")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_stop(self) -> None:
        self._consume(self.stack[-1:])
        _Unpickler.load_stop(self)  # type: ignore[attr-defined]

    dispatch[pickle.STOP[0]] = load_stop

    def load_refused(self) -> None:
        raise _refuse("INST, OBJ, EXT and persistent ids are not accepted")


for _opcode in (
    pickle.INST,
    pickle.OBJ,
    pickle.EXT1,
    pickle.EXT2,
    pickle.EXT4,
    pickle.PERSID,
    pickle.BINPERSID,
):
    RestrictedUnpickler.dispatch[_opcode[0]] = RestrictedUnpickler.load_refused


def _consuming(opcode: bytes) -> Callable[[RestrictedUnpickler], None]:
    """The opcode, refusing to put an unbuilt object into the tuple, list, dict or set it makes."""
    original = _Unpickler.dispatch[opcode[0]]
    taken = {pickle.TUPLE1: 1, pickle.TUPLE2: 2, pickle.TUPLE3: 3}.get(opcode)

    def load(self: RestrictedUnpickler) -> None:
        if self._unbuilt or self._fresh:
            # After MARK, `stack` holds exactly the items above the mark.
            self._consume(self.stack[-taken:] if taken else self.stack)
        original(self)  # type: ignore[arg-type]

    return load


for _opcode in (
    pickle.TUPLE,
    pickle.TUPLE1,
    pickle.TUPLE2,
    pickle.TUPLE3,
    pickle.LIST,
    pickle.DICT,
    pickle.FROZENSET,
):
    RestrictedUnpickler.dispatch[_opcode[0]] = _consuming(_opcode)
del _opcode


def _no_range(args: Any) -> None:
    """A range is kept, never handed to a call: a few bytes of it can make a call iterate forever.

    No listed type's pickle passes one; `deque` or pyarrow's converters would consume it.
    """
    pending, seen = [args], set()
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is range:
            raise _refuse("a range may not be passed to a call")
        if kind in (tuple, list, set, frozenset) and id(value) not in seen:
            seen.add(id(value))
            pending.extend(value)
        elif kind is dict and id(value) not in seen:
            seen.add(id(value))
            pending.extend(value.keys())
            pending.extend(value.values())


def _build(inst: Any, state: Any) -> None:
    """What BUILD does (pickle's load_build), on an object this stream just made."""
    setstate = getattr(inst, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return
    slotstate = None
    if type(state) is tuple and len(state) == 2:
        state, slotstate = state
    if state:
        if type(state) is not dict:
            raise _refuse("an object's state is a dict")
        inst.__dict__.update({sys.intern(k) if type(k) is str else k: v for k, v in state.items()})
    if slotstate:
        if type(slotstate) is not dict:
            raise _refuse("an object's slot state is a dict")
        for k, v in slotstate.items():
            setattr(inst, k, v)


def _prepared(inst: Any, state: Any) -> tuple[Any, Callable[[Any], None]]:
    """The state to give *inst*, and what must hold once it has it; refused if not listed."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(inst, numpy.dtype):
        reference, state = _dtype_state(inst, state)
        return state, _same_dtype(reference)
    if numpy is not None and type(inst) is numpy.ndarray:
        return _ndarray_state(inst, state), _check_ndarray
    name = _real_name(type(inst))
    check = _BUILT_CHECKS.get(name) if name else None
    if check is None:
        raise _refuse(f"{_describe(inst)} may not be built")
    _empty_caches(state)
    return state, check


def _describe(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        obj = obj.args[0] if obj.args else obj.func
    name = _real_name(obj) if isinstance(obj, type) or callable(obj) else None
    if name is not None:
        return f"{name[0]}.{name[1]}"
    kind = _real_name(type(obj))
    return f"a {kind[0]}.{kind[1]} object" if kind else "an object"
