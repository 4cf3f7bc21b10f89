"""Whatever a caller passes to `write_all`, the error is a `BlobError`, never a bare TypeError.

A caller that catches `BlobError` around blobplane calls (a server handling
a client's request, say) must not be taken down by a str or a None where
bytes were expected.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterator

import pytest

from blobplane import BlobBackend, BlobPool, SharedMemoryBlobs
from blobplane.errors import BlobError, NotBytesLike

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


def _released() -> memoryview:
    view = memoryview(b"gone")
    view.release()
    return view


NOT_BYTES: list[tuple[str, Callable[[], object]]] = [
    ("str", lambda: "text has no one byte form"),
    ("int", lambda: 42),
    ("none", lambda: None),
    ("list", lambda: [1, 2, 3]),
    ("dict", lambda: {"a": 1}),
    ("released-memoryview", _released),
]


@pytest.fixture(params=["memfd", "posix_shm", "temp_file", "pool"])
def write_all(request: pytest.FixtureRequest) -> Iterator[Callable[[object], None]]:
    if request.param == "pool":
        with BlobPool(64, 1) as pool, pool.loan() as loan:
            yield loan.write_all
        return
    with SharedMemoryBlobs(BlobBackend(request.param)) as blobs, blobs.create(64) as blob:
        yield blob.write_all


@pytest.mark.parametrize(("label", "make"), NOT_BYTES, ids=[label for label, _ in NOT_BYTES])
def test_write_all_refuses_what_is_not_bytes_like(
    write_all: Callable[[object], None], label: str, make: Callable[[], object]
) -> None:
    with pytest.raises(NotBytesLike, match="bytes-like") as refused:
        write_all(make())
    assert isinstance(refused.value, BlobError)
    assert isinstance(refused.value, TypeError)  # what callers caught before still works


def test_every_kind_of_buffer_is_still_written(write_all: Callable[[object], None]) -> None:
    for data in (b"bytes", bytearray(b"array"), memoryview(b"view"), array.array("d", [1.5])):
        write_all(data)
