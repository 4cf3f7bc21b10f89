from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from leaks import Snapshot


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves an fd, a blob mapping or a shm/temp file behind."""
    gc.collect()
    before = Snapshot.take()
    yield
    gc.collect()
    leaks = Snapshot.take().leaks_since(before)
    assert not leaks, "; ".join(leaks)
