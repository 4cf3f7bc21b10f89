"""Random globals from the trusted packages: refused unless listed exactly, and never imported.

Pickle resolves a global by importing its module and following its name,
dots included, so every module of numpy, pandas and pyarrow, and everything
each one imports, is one name away. Hypothesis pairs modules of those
packages (and of the standard library) with names taken from their
namespaces, dotted paths into what they import (``os.system``) and names
that were never there; a restricted load must refuse every pair the
allow-list does not name, before importing anything, and resolve every pair
it does name to exactly the listed object.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from typing import Any

import numpy
import pandas
import pyarrow
import pytest
from allowlist_probe import forbidden_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobplane.objects import DEFAULT_ALLOW_LIST, UnpicklingRefused
from blobplane.objects.allowlist import RestrictedUnpickler, Use

pytestmark = pytest.mark.timeout(120)

_PACKAGES = (numpy, pandas, pyarrow)
_STDLIB = (
    "builtins",
    "os",
    "posix",
    "sys",
    "io",
    "pickle",
    "subprocess",
    "importlib",
    "codecs",
    "operator",
    "functools",
    "copyreg",
    "zoneinfo",
    "datetime",
    "collections",
    "shutil",
)

# Where a module of a trusted package leads: each becomes a dotted name after any module.
_DANGEROUS = [
    "os.system",
    "os.popen",
    "os.execv",
    "subprocess.Popen",
    "subprocess.check_output",
    "sys.modules",
    "builtins.eval",
    "builtins.exec",
    "builtins.getattr",
    "builtins.__import__",
    "pickle.loads",
    "io.open",
    "importlib.import_module",
    "__builtins__",
    "__loader__.load_module",
    "read_pickle",
    "load",
    "eval",
    "compile",
    "_reconstruct.__globals__",
    "DataFrame.to_pickle",
    "Index.__reduce__",
    "lib.os.system",
    "core.frame.sys.modules",
]


@functools.cache
def _modules() -> list[str]:
    """Modules of the trusted packages: those loaded, and the top two levels of the rest."""
    found = {
        name
        for name, module in sys.modules.items()
        if module is not None and name.split(".")[0] in ("numpy", "pandas", "pyarrow")
    }
    for package in _PACKAGES:
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            found.add(info.name)
    found.update(_STDLIB)
    found.update(module for module, _ in DEFAULT_ALLOW_LIST.pairs)
    return sorted(found)


def _names_in(module: str) -> list[str]:
    loaded = sys.modules.get(module)
    return sorted(dir(loaded)) if loaded is not None else []


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[str, str]:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(sorted(DEFAULT_ALLOW_LIST.pairs)))
    module = draw(st.sampled_from(_modules()))
    names = _names_in(module)
    kind = draw(st.integers(0, 3))
    if kind == 0 and names:
        name = draw(st.sampled_from(names))
    elif kind == 1 and names:
        name = f"{draw(st.sampled_from(names))}.{draw(st.sampled_from(_DANGEROUS))}"
    elif kind == 2:
        name = draw(st.sampled_from(_DANGEROUS))
    else:
        name = draw(st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_.ABC"), max_size=20))
    return module, name


def _stack_global(module: str, name: str) -> bytes:
    def unicode(text: str) -> bytes:
        raw = text.encode()
        return b"X" + len(raw).to_bytes(4, "little") + raw

    return b"\x80\x04" + unicode(module) + unicode(name) + b"\x93."


def _resolve(module: str, name: str) -> Any:
    found: Any = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


def _load(data: bytes) -> Any:
    import io

    return RestrictedUnpickler(io.BytesIO(data), [], DEFAULT_ALLOW_LIST).load()


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_pairs())
def test_a_global_is_refused_unless_listed_exactly(pair: tuple[str, str]) -> None:
    module, name = pair
    data = _stack_global(module, name)
    entry = DEFAULT_ALLOW_LIST.entries.get(pair)
    if entry is None:
        before = set(sys.modules)
        with forbidden_events() as events, pytest.raises(UnpicklingRefused, match="allow-list"):
            _load(data)
        assert set(sys.modules) == before
        assert not events, events
        return
    loaded = _load(data)
    real = _resolve(module, name)
    if isinstance(loaded, functools.partial):  # a guarded call: the guard wraps the real one
        assert entry.use is Use.CALL
        assert entry.guard is not None
        assert loaded.func is entry.guard
        assert loaded.args == (real,)
    else:
        assert loaded is real


def test_the_same_pairs_through_global_and_inst_opcodes() -> None:
    """GLOBAL (protocols 0 to 3) goes through the same check; INST is refused outright."""
    for module, name in [("pandas.io.common", "os.system"), ("os", "system")]:
        with pytest.raises(UnpicklingRefused, match="allow-list"):
            _load(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b".")
        with pytest.raises(UnpicklingRefused, match="INST"):
            _load(b"(i" + f"{module}\n{name}\n".encode() + b".")
    assert _load(b"\x80\x02cbuiltins\nslice\n.") is slice
