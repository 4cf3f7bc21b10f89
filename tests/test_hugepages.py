"""Huge pages for blobs where the kernel allows them, and `blobplane doctor`'s report of it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from blobplane import BlobBackend, SharedMemoryBlobs, channel
from blobplane.backends.hugepages import HUGE_PAGE_SIZE, MODE_TTL_S, SHMEM_ENABLED, shmem_thp_mode
from blobplane.backends.mapping import map_readonly
from blobplane.blobs import ProducerBlob
from brokers import cli_ok, run_cli
from children import CHILD_TIMEOUT_S

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(120)]

SIZE = 4 * HUGE_PAGE_SIZE + 4096  # four huge pages and a small tail


def setting() -> str:
    with open(SHMEM_ENABLED) as file:
        text = file.read()
    return text[text.index("[") + 1 : text.index("]")]


def pmd_mapped_kib(pid: int | str = "self") -> int:
    """Shared memory this process maps with huge page table entries."""
    with open(f"/proc/{pid}/smaps_rollup") as smaps:
        return sum(int(line.split()[1]) for line in smaps if line.startswith("ShmemPmdMapped:"))


@pytest.fixture
def shmem_thp(request: pytest.FixtureRequest) -> Iterator[str]:
    """shmem_enabled set to the parameter for the test, then restored."""
    if not os.path.exists(SHMEM_ENABLED):
        pytest.skip("this kernel has no transparent huge pages")
    if not os.access(SHMEM_ENABLED, os.W_OK):
        pytest.skip("changing shmem_enabled needs root")
    before = setting()
    with open(SHMEM_ENABLED, "w") as file:
        file.write(request.param)
    time.sleep(MODE_TTL_S + 0.1)  # past the time a reading of the setting is trusted
    try:
        yield request.param
    finally:
        with open(SHMEM_ENABLED, "w") as file:
            file.write(before)


def test_the_mode_read_is_the_kernels() -> None:
    if not os.path.exists(SHMEM_ENABLED):
        assert shmem_thp_mode() == ""
    else:
        assert shmem_thp_mode() == setting()


def filled_blob(blobs: SharedMemoryBlobs, size: int) -> ProducerBlob:
    blob = blobs.create(size)
    blob.write_all(bytes(range(256)) * (size // 256) + bytes(size % 256))
    blob.seal()
    return blob


@pytest.mark.parametrize("shmem_thp", ["advise"], indirect=True)
def test_a_blob_is_made_of_huge_pages_under_advise_and_the_reader_maps_them_whole(
    shmem_thp: str,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from blobplane import channel\n"
            "with channel.from_socket(int(sys.argv[1])) as ch:\n"
            "    with ch.recv_blob() as blob, blob.as_slice() as view:\n"
            "        total = sum(view[::4096])\n"
            "        kib = sum(int(line.split()[1]) for line in open('/proc/self/smaps_rollup')\n"
            "                  if line.startswith('ShmemPmdMapped:'))\n"
            "        ch.send(f'{kib} {total}'.encode())\n",
            str(theirs.fileno()),
        ],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    blobs = SharedMemoryBlobs(BlobBackend.MEMFD)
    with channel.from_socket(ours) as ch, filled_blob(blobs, SIZE) as blob:
        fd = blob.fileno()
        # Every huge page of the file is allocated whole (st_blocks counts them).
        assert os.fstat(fd).st_blocks * 512 >= 4 * HUGE_PAGE_SIZE
        local = map_readonly(fd, SIZE)
        assert local is not None
        try:
            view = memoryview(local)
            expected = sum(view[::4096])
            view.release()
            assert pmd_mapped_kib() >= 4 * HUGE_PAGE_SIZE // 1024
        finally:
            local.close()
        ch.send_blob(blob)
        message, _ = ch.recv(timeout=CHILD_TIMEOUT_S)
    assert reader.wait(CHILD_TIMEOUT_S) == 0
    kib, total = map(int, message.data.split())  # type: ignore[union-attr]
    assert total == expected
    assert kib >= 4 * HUGE_PAGE_SIZE // 1024, "the reader mapped the huge pages in 4 KiB pieces"


@pytest.mark.parametrize("shmem_thp", ["never"], indirect=True)
def test_under_never_a_blob_is_made_and_read_as_before(shmem_thp: str) -> None:
    blobs = SharedMemoryBlobs(BlobBackend.MEMFD)
    with filled_blob(blobs, SIZE) as blob:
        local = map_readonly(blob.fileno(), SIZE)
        assert local is not None
        try:
            assert local[SIZE - 4096 - 256 : SIZE - 4096] == bytes(range(256))
            assert pmd_mapped_kib() == 0
        finally:
            local.close()


def doctor(*args: str) -> str:
    """`blobplane doctor` in an 80x24 terminal: its output."""
    return cli_ok(run_cli("doctor", *args, env={"COLUMNS": "80", "LINES": "24"}))


def test_doctor_reports_each_setting_with_its_value() -> None:
    findings = {entry["setting"]: entry for entry in json.loads(doctor("--json"))}
    assert set(findings) == {
        "shmem huge pages",
        "reserved huge pages",
        "open files",
        "memory",
        "/dev/shm",
        "kernel",
    }
    huge = findings["shmem huge pages"]
    if os.path.exists(SHMEM_ENABLED):
        assert huge["value"] == setting()
        assert huge["ok"] == (setting() not in ("never", "deny"))
        assert bool(huge["fix"]) == (not huge["ok"])
    soft = os.sysconf("SC_OPEN_MAX")
    assert findings["open files"]["value"].startswith(str(soft))
    assert findings["kernel"]["value"] == os.uname().release


def test_doctor_fits_80_columns_and_prints_its_commands_whole() -> None:
    output = doctor()
    lines = output.splitlines()
    table = [line for line in lines if not line.startswith("to change ")]
    assert table
    assert all(len(line) <= 80 for line in table), "\n".join(table)
    assert "shmem huge pages" in output
    if os.path.exists(SHMEM_ENABLED) and setting() in ("never", "deny"):
        assert f"to change shmem huge pages: echo advise | sudo tee {SHMEM_ENABLED}" in lines
