"""The restricted unpickler: only classes on an allow-list may be built.

`loads` runs pickle, which executes code chosen by whoever wrote the stream;
with ``restricted=True`` every global outside `DEFAULT_ALLOW_LIST` is refused.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from blobplane.errors import BlobError


class UnpicklingRefused(BlobError, pickle.UnpicklingError):
    """The restricted unpickler met a class outside its allow-list."""


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
            "blobplane.objects.reducers._rebuild_array",
            "blobplane.objects.reducers._rebuild_bytes",
            "blobplane.objects.reducers._rebuild_memoryview",
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


class RestrictedUnpickler(pickle.Unpickler):
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
