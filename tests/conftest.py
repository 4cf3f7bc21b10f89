from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from blobplane.backends.private_dir import shm_root, temp_root
from leaks import Snapshot

# Private folders of this test session alone (inherited by the children it
# starts), so that blobs of other processes on the machine cannot make the
# leak counts flicker.
_SESSION_DIR = tempfile.mkdtemp(prefix="blobplane-tests-")
os.environ["BLOBPLANE_DIR"] = os.path.join(_SESSION_DIR, "temp")
os.environ["BLOBPLANE_SHM_DIR"] = f"/dev/shm/blobplane-tests-{os.getpid()}"
shm_root()
temp_root()
# What the CLI prints (rich tables, wrapped lines) must not depend on the terminal
# the tests run in: every child process sees the same width, and no colours.
os.environ["COLUMNS"] = "120"
os.environ["LINES"] = "40"
os.environ["NO_COLOR"] = "1"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    shutil.rmtree(os.environ["BLOBPLANE_SHM_DIR"], ignore_errors=True)


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves an fd, a blob mapping or a shm/temp file behind."""
    gc.collect()
    before = Snapshot.take()
    yield
    gc.collect()
    leaks = Snapshot.take().leaks_since(before)
    assert not leaks, "; ".join(leaks)
