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


NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@pytest.fixture
def reserved_huge_pages() -> Iterator[int]:
    """Four reserved huge pages free for the test (their size is yielded).

    The host's own if it has them; else, where this process may (root), four
    reserved for the test and given back after it; else the test is skipped.
    """
    from blobplane.backends.hugepages import reserved_huge_pages as reserved

    wanted = 4
    if reserved().free >= wanted:
        yield reserved().page_size
        return
    try:
        with open(NR_HUGEPAGES) as file:
            before = int(file.read())
        with open(NR_HUGEPAGES, "w") as file:
            file.write(str(before + wanted))
    except (OSError, ValueError):
        pytest.skip("no reserved huge pages free, and this process may not reserve them")
    try:
        if reserved().free < wanted:
            pytest.skip("the kernel could not reserve huge pages (memory too fragmented)")
        yield reserved().page_size
    finally:
        with open(NR_HUGEPAGES, "w") as file:
            file.write(str(before))
