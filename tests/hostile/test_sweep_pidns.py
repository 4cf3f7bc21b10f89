"""The orphan sweep removes only blob files it can prove abandoned, whoever runs it.

A process in another pid namespace (a container sharing /dev/shm) sees every
pid outside as dead; a sweep that trusted the pid in a file's name would
unlink the live blobs of every process outside. The proof is the creator's
OFD lock instead: a sweeper removes a file only if it can lock it. These
tests run the sweeper with ``unshare --pid --fork`` against the blobs of a
live producer outside, then of a killed one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from blobplane import BlobBackend, Named, map_descriptor
from blobplane.backends.private_dir import new_blob_name, shm_root, sweep_orphans, temp_root
from children import CHILD_TIMEOUT_S, run_python

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

PRODUCE = """
import os, sys
from blobplane import BlobBackend, SharedMemoryBlobs
blob = SharedMemoryBlobs(BlobBackend(sys.argv[1])).create(4096)
blob.write_all(b"alive")
blob.seal()
descriptor = blob.descriptor
name = descriptor.name if hasattr(descriptor, "name") else os.path.basename(descriptor.path)
if len(sys.argv) > 2:  # "fork": the creator goes at once, its child holds the fd
    if os.fork():
        print(name, flush=True)
        os._exit(0)
    sys.stdin.read()
    os._exit(0)  # no cleanup: only the kernel lets go of the blob
print(name, os.getpid(), flush=True)
sys.stdin.read()  # hold the blob until told to stop, or killed
"""

SWEEP = """
import os, sys
from blobplane.backends.private_dir import sweep_orphans
try:
    os.kill(int(sys.argv[2]), 0)
    sees = "sees"
except ProcessLookupError:
    sees = "blind"
print(os.getpid(), sees, " ".join(sweep_orphans(sys.argv[1])) or "-")
"""


def _unshare_command() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed: no way to start a sweeper in a pid namespace")
    command = [unshare, "--pid", "--fork"]
    probe = subprocess.run(
        [*command, sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"cannot make a pid namespace here (needs CAP_SYS_ADMIN): {probe.stderr}")
    return command


def _sweep_in_namespace(command: list[str], folder: str, producer: int) -> tuple[str, list[str]]:
    """Run `sweep_orphans(folder)` as pid 1 of a new pid namespace; (whether it sees *producer*,
    the names it removed)."""
    result = subprocess.run(
        [*command, sys.executable, "-c", textwrap.dedent(SWEEP), folder, str(producer)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pid, sees, removed = result.stdout.split(maxsplit=2)
    assert pid == "1"  # it really ran in a pid namespace of its own
    return sees, [] if removed.strip() == "-" else removed.split()


class Producer:
    """A child process holding one sealed blob of *backend* until it is killed."""

    def __init__(self, backend: BlobBackend) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PRODUCE), backend.value],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        name, pid = self.process.stdout.readline().split()
        self.name = name
        self.pid = int(pid)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=CHILD_TIMEOUT_S)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def producers() -> Iterator[list[Producer]]:
    started: list[Producer] = []
    yield started
    for producer in started:
        producer.kill()
    for folder in (shm_root(), temp_root()):
        sweep_orphans(folder)  # what the killed producers left


FOLDERS = {BlobBackend.POSIX_SHM: shm_root, BlobBackend.TEMP_FILE: temp_root}


@pytest.mark.parametrize("backend", [BlobBackend.POSIX_SHM, BlobBackend.TEMP_FILE])
def test_a_sweeper_in_another_pid_namespace_keeps_live_blobs(
    backend: BlobBackend, producers: list[Producer]
) -> None:
    command = _unshare_command()
    folder = FOLDERS[backend]()
    producer = Producer(backend)
    producers.append(producer)
    sees, removed = _sweep_in_namespace(command, folder, producer.pid)
    assert sees == "blind"  # to that sweeper the producer's pid is dead...
    assert producer.name not in removed  # ...and its blob is kept all the same
    assert producer.name in os.listdir(folder)
    producer.kill()
    sees, removed = _sweep_in_namespace(command, folder, producer.pid)
    assert producer.name in removed
    assert producer.name not in os.listdir(folder)


def test_a_sweeper_here_keeps_live_blobs_and_takes_dead_ones(producers: list[Producer]) -> None:
    live, dead = Producer(BlobBackend.POSIX_SHM), Producer(BlobBackend.POSIX_SHM)
    producers.extend((live, dead))
    dead.kill()
    removed = sweep_orphans(shm_root())
    assert dead.name in removed
    assert live.name not in removed
    assert live.name in os.listdir(shm_root())


def test_a_forked_child_holds_its_parents_blob() -> None:
    """The lock belongs to the open file description, which a fork shares."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PRODUCE), BlobBackend.POSIX_SHM.value, "fork"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    name = process.stdout.readline().strip()
    process.wait(timeout=CHILD_TIMEOUT_S)  # the creator is gone; its forked child is not
    try:
        assert name not in sweep_orphans(shm_root())
        assert name in os.listdir(shm_root())
    finally:
        process.stdin.close()  # the forked child reads EOF and exits
        process.stdout.close()
    # Once the forked child is gone (it is not ours to wait for), the blob is abandoned.
    deadline = time.monotonic() + 10
    while name in os.listdir(shm_root()) and time.monotonic() < deadline:
        sweep_orphans(shm_root())
        time.sleep(0.01)
    assert name not in os.listdir(shm_root())


def test_readers_keep_what_the_sweep_unlinks(producers: list[Producer]) -> None:
    producer = Producer(BlobBackend.POSIX_SHM)
    producers.append(producer)
    with map_descriptor(Named(producer.name), 5) as mapped:
        producer.kill()
        assert producer.name in sweep_orphans(shm_root())
        assert bytes(mapped.as_slice()) == b"alive"  # the pages live until the last mapping


def test_the_sweeper_leaves_what_is_not_a_blob_file() -> None:
    folder = shm_root()
    fifo, link, stranger, orphan = (
        os.path.join(folder, new_blob_name()),
        os.path.join(folder, new_blob_name()),
        os.path.join(folder, "not-a-blob-name"),
        os.path.join(folder, new_blob_name()),
    )
    target = os.path.join(folder, "link-target")
    os.mkfifo(fifo, 0o600)
    for path in (target, stranger, orphan):
        with open(path, "wb") as file:
            file.write(b"x")
    os.symlink(target, link)
    try:
        # In a child: a sweeper that opened the FIFO without O_NONBLOCK would wait forever.
        result = run_python(
            "import sys\n"
            "from blobplane.backends.private_dir import sweep_orphans\n"
            "print(' '.join(sweep_orphans(sys.argv[1])))",
            folder,
            timeout=15,
        )
        assert result.stdout.split() == [os.path.basename(orphan)]  # unlocked and a blob's
        for path in (fifo, link, stranger, target):
            assert os.path.lexists(path), path
    finally:
        for path in (fifo, link, stranger, target, orphan):
            if os.path.lexists(path):
                os.unlink(path)
