"""The restricted allow-list is exactly what the supported types need, and they all load.

The list is derived, not written from memory: `allowlist_probe` pickles an
object of every supported type and records every global the streams name and
how they use it. Any drift (a name numpy, pandas or pyarrow renamed in a new
release, a type that gained a helper) fails here loudly, as does any type
that no longer loads under ``restricted=True``, in this process or in
another one over a channel. Restricted loads of all of them open no file,
import nothing and compile nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from allowlist_probe import assert_same, forbidden_events, pickled, probe, samples

from blobplane import SharedMemoryBlobs, channel, map_descriptor
from blobplane.objects import (
    DEFAULT_ALLOW_LIST,
    DEFAULT_THRESHOLD,
    AllowList,
    ObjectHeader,
    UnpicklingRefused,
    dumps,
    loads,
    recv_obj,
    send_obj,
)
from blobplane.objects.allowlist import _BUILT_CHECKS, Build, RestrictedUnpickler, Use
from children import CHILD_TIMEOUT_S

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaks")]

SAMPLES = samples()


def test_the_list_is_exactly_what_the_supported_types_reference() -> None:
    found = probe(SAMPLES)
    assert set(found.uses) == DEFAULT_ALLOW_LIST.pairs, (
        "names the supported types need but the list lacks: "
        f"{sorted(set(found.uses) - DEFAULT_ALLOW_LIST.pairs)}; "
        f"names on the list nothing needs: {sorted(DEFAULT_ALLOW_LIST.pairs - set(found.uses))}"
    )
    for pair, usage in found.uses.items():
        entry = DEFAULT_ALLOW_LIST.entries[pair]
        assert not (usage.called and usage.instantiated), pair
        expected = Use.CALL if usage.called else Use.NEW if usage.instantiated else Use.VALUE
        assert entry.use is expected, pair
        assert usage.built == (entry.build is not Build.NEVER), pair
        if entry.use is Use.VALUE:
            assert usage.passed, pair
    # Every type a stream completes with BUILD is checked (numpy's dtypes and arrays apart).
    for kind in found.built_types:
        assert kind in _BUILT_CHECKS or kind[0] in ("numpy", "numpy.dtypes"), kind


def test_no_name_is_trusted_by_prefix_or_resolved_through_dots() -> None:
    for module, name in DEFAULT_ALLOW_LIST.pairs:
        assert "." not in name, (module, name)
    assert not DEFAULT_ALLOW_LIST.allows("pandas", "core")
    assert not DEFAULT_ALLOW_LIST.allows("pandas.core.frame", "os")
    assert not DEFAULT_ALLOW_LIST.allows("pyarrow", "lib")
    for module in ("pandas", "pyarrow", "numpy"):
        assert not DEFAULT_ALLOW_LIST.allows(module, "os.system")


def _load_restricted(
    obj: Any, threshold: int, allow: bool | AllowList = True, *, watched: bool = False
) -> Any:
    """*obj* through dumps and loads(restricted=...); *watched*: no forbidden event in loads."""
    with SharedMemoryBlobs() as blobs:
        header, blob = dumps(obj, blobs, threshold=threshold)
        header = ObjectHeader.from_msgpack(header.to_msgpack())
        mapped = map_descriptor(blob.descriptor, blob.size)
        with forbidden_events() as events:
            result = loads(header, mapped, restricted=allow)
    assert not (watched and events), events
    return result


@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_supported_type_round_trips_restricted(name: str) -> None:
    expected = SAMPLES[name]
    for threshold in (DEFAULT_THRESHOLD, 0):
        assert_same(expected, _load_restricted(expected, threshold), name)
        # Loaded once, everything it needs is imported: a second load touches nothing.
        assert_same(expected, _load_restricted(expected, threshold, watched=True), name)


def test_the_unpickler_refuses_what_an_empty_list_does_not_name() -> None:
    stream, buffers = pickled(SAMPLES["frame of every column kind"])
    import io

    with pytest.raises(UnpicklingRefused, match="not on the allow-list"):
        RestrictedUnpickler(io.BytesIO(stream), buffers, AllowList()).load()


def test_extended_trusts_exactly_the_pairs_given() -> None:
    extended = DEFAULT_ALLOW_LIST.extended([("fractions", "Fraction")])
    assert extended.allows("fractions", "Fraction")
    assert not DEFAULT_ALLOW_LIST.allows("fractions", "Fraction")
    assert not extended.allows("fractions", "Decimal")
    from fractions import Fraction

    assert _load_restricted([Fraction(1, 3)], DEFAULT_THRESHOLD, extended) == [Fraction(1, 3)]
    with pytest.raises(UnpicklingRefused, match=r"fractions\.Fraction"):
        _load_restricted([Fraction(1, 3)], DEFAULT_THRESHOLD)
    for bad in ["fractions.Fraction", ("fractions",), ("", "x"), ("a", 1)]:
        with pytest.raises(TypeError):
            DEFAULT_ALLOW_LIST.extended([bad])  # type: ignore[list-item]


ECHO = """
import sys
from blobplane import channel
from blobplane.objects import recv_obj, send_obj
with channel.connect(sys.argv[1]) as ch:
    for _ in range(int(sys.argv[2])):
        send_obj(ch, recv_obj(ch, restricted=True))
"""


@pytest.fixture
def listener() -> Iterator[channel.Listener]:
    with (
        tempfile.TemporaryDirectory() as folder,
        channel.listen(os.path.join(folder, "private", "objects.sock")) as listening,
    ):
        yield listening


def test_every_supported_type_crosses_two_processes_restricted(
    listener: channel.Listener,
) -> None:
    """Out to a child that loads it restricted (recv_obj), and back, loaded restricted again."""
    payloads = [SAMPLES, {"numbers": list(range(1000)), "text": "x" * 100_000}]
    child = subprocess.Popen([sys.executable, "-c", ECHO, listener.path, str(len(payloads))])
    try:
        with listener.accept() as ch:
            for payload in payloads:
                send_obj(ch, payload)
                back = recv_obj(ch, restricted=True)
                assert_same(payload, back, "echoed")
                del back
        assert child.wait(timeout=CHILD_TIMEOUT_S) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_only_an_explicit_false_loads_unrestricted() -> None:
    from fractions import Fraction

    assert _load_restricted(Fraction(1, 3), DEFAULT_THRESHOLD, False) == Fraction(1, 3)
    with pytest.raises(UnpicklingRefused):
        _load_restricted(Fraction(1, 3), DEFAULT_THRESHOLD, AllowList())  # empty: refuses all
    with pytest.raises(TypeError, match="AllowList"):
        _load_restricted(Fraction(1, 3), DEFAULT_THRESHOLD, 1)  # type: ignore[arg-type]
