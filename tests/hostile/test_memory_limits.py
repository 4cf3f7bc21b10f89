"""Asking for more memory than there is: `OutOfSharedMemory` at once, never the OOM killer.

A memory cgroup does not fail an allocation that goes over its limit: the
OOM killer ends a process in it. So blobplane compares a blob's size with
what is left before it allocates anything. The proof runs a real child in a
memory cgroup of its own, limited to 64 MiB: its 256 MiB blobs are refused
and it lives, a sparse 256 MiB memfd handed to it is refused unread, and the
same allocation made without blobplane gets it killed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from blobplane import BlobBackend, BlobPool, SharedMemoryBlobs
from blobplane.backends import memlimit
from blobplane.backends.mapping import physical_memory
from blobplane.backends.memlimit import (
    CHECK_THRESHOLD,
    available_memory,
    check_can_allocate,
    check_can_store,
    memory_ceiling,
)
from blobplane.backends.private_dir import shm_root
from blobplane.errors import OutOfSharedMemory
from children import CHILD_TIMEOUT_S

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

MIB = 1 << 20
LIMIT = 64 * MIB
ASKED = 256 * MIB


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _remove_cgroup(folder: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            os.rmdir(folder)
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY while a killed member is still being reaped
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def limited_cgroup() -> Iterator[str]:
    """A new memory cgroup under this process's own, limited to `LIMIT`; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    levels = memlimit._cgroups()
    if not levels:
        pytest.skip("no memory cgroup controller is mounted here (cgroup v2 or v1)")
    parent = levels[0].folder
    v1 = levels[0].limit.endswith("memory.limit_in_bytes")
    folder = os.path.join(parent, f"blobplane-test-{secrets.token_hex(4)}")
    try:
        os.mkdir(folder)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {parent} (not writable here): {exc}")
    try:
        limit_file = os.path.join(folder, "memory.limit_in_bytes" if v1 else "memory.max")
        if not os.path.exists(limit_file):
            try:
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
            except OSError as exc:
                pytest.skip(
                    f"cannot enable the memory controller below {parent}: {exc} (cgroup v2 "
                    "lets no cgroup with processes of its own delegate a controller)"
                )
        _write(limit_file, str(LIMIT))
        yield folder
    finally:
        _remove_cgroup(folder)


IN_THE_CGROUP = """
import os, sys
sys.stdin.readline()  # by now the test moved this process into the limited cgroup
from blobplane import BlobBackend, BlobPool, SharedMemoryBlobs, UnixFd, read_blob_contents
from blobplane.backends import memlimit
from blobplane.errors import OutOfSharedMemory, SparseBlob
asked = int(sys.argv[2])
print("cgroup", memlimit._cgroups()[0].folder)
print("ceiling", memlimit.memory_ceiling())
print("available", memlimit.available_memory())
attempts = {
    "memfd": lambda: SharedMemoryBlobs().create(asked),
    "posix_shm": lambda: SharedMemoryBlobs(BlobBackend.POSIX_SHM).create(asked),
    "pool": lambda: BlobPool(asked // 4, 4),
}
for what, attempt in attempts.items():
    try:
        attempt()
        print(what, "allocated")
    except OutOfSharedMemory as exc:
        print(what, "refused", exc)
try:
    read_blob_contents(UnixFd(int(sys.argv[1])), asked)
    print("sparse read")
except SparseBlob:
    print("sparse refused")
print("control", flush=True)
# The control: the same allocation without blobplane's check. The cgroup kills us here.
raw = os.memfd_create("raw")
try:
    os.posix_fallocate(raw, 0, asked)
    print("control allocated", flush=True)
except OSError as exc:
    print("control failed", exc.strerror, flush=True)
"""


def test_a_child_in_a_small_memory_cgroup_is_refused_not_killed(limited_cgroup: str) -> None:
    sparse = os.memfd_create("sparse", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(sparse, ASKED)
        fcntl.fcntl(sparse, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(IN_THE_CGROUP), str(sparse), str(ASKED)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(sparse,),
        )
        _write(os.path.join(limited_cgroup, "cgroup.procs"), str(child.pid))
        stdout, stderr = child.communicate("go\n", timeout=CHILD_TIMEOUT_S)
    finally:
        os.close(sparse)
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert "control" in stdout, f"the child died before its control ({child.returncode}): {stderr}"
    assert lines["cgroup"] == limited_cgroup
    assert int(lines["ceiling"]) == LIMIT
    assert int(lines["available"]) <= LIMIT
    for what in ("memfd", "posix_shm", "pool"):
        assert lines[what].startswith("refused"), lines[what]
        assert limited_cgroup in lines[what]  # the message says where the figure comes from
        assert "256.0 MiB" in lines[what]
    assert lines["sparse"] == "refused"
    # Without the check the same request does not get an error: the process is killed.
    assert child.returncode == -9 or "control failed" in stdout, (child.returncode, stdout)
    assert "control allocated" not in stdout, "the cgroup did not limit the child at all"


# -- in this process: every way to ask for memory asks first -------------------------------


@pytest.fixture
def little_memory(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pretend the host has 8 MiB available, for the checks only (nothing is allocated)."""
    monkeypatch.setattr(memlimit, "_mem_available", lambda: 8 * MIB)
    monkeypatch.setattr(memlimit, "_cgroups", lambda: ())
    return 8 * MIB


@pytest.mark.parametrize("backend", [BlobBackend.MEMFD, BlobBackend.POSIX_SHM])
def test_create_asks_before_it_allocates(backend: BlobBackend, little_memory: int) -> None:
    with SharedMemoryBlobs(backend) as blobs:
        with pytest.raises(OutOfSharedMemory, match="MemAvailable") as refused:
            blobs.create(16 * MIB)
        assert "16.0 MiB" in str(refused.value)
        assert len(blobs) == 0
        with blobs.create(CHECK_THRESHOLD - 1):  # small blobs are not checked (see memlimit)
            pass
        with blobs.create(4 * MIB):
            pass


def test_a_pool_asks_for_all_its_slots_at_once(little_memory: int) -> None:
    with pytest.raises(OutOfSharedMemory, match="a pool of 4 slots"):
        BlobPool(4 * MIB, 4)
    with BlobPool(MIB, 4):
        pass


def test_a_file_blob_needs_room_on_its_filesystem() -> None:
    space = os.statvfs(shm_root())
    if not space.f_blocks:
        pytest.skip("/dev/shm has no size limit here")
    too_big = space.f_bavail * space.f_frsize + MIB
    with pytest.raises(OutOfSharedMemory, match="filesystem has"):
        check_can_store(too_big, shm_root(), "a test blob")


def test_the_figures_hang_together() -> None:
    available, ceiling = available_memory(), memory_ceiling()
    assert 0 < available <= ceiling <= physical_memory()
    with pytest.raises(OutOfSharedMemory, match="does not fit"):
        check_can_allocate(ceiling + MIB, "a blob larger than the ceiling")
    check_can_allocate(0, "nothing")
