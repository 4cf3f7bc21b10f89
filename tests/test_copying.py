"""The one bulk copy: exact bytes whatever the size and the buffers, parts split across threads."""

from __future__ import annotations

import mmap
import os
import signal
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from blobplane.backends import copying
from blobplane.backends.copying import PARALLEL_COPY_BYTES, copy_bytes

SIZES = [0, 1, 4095, PARALLEL_COPY_BYTES - 1, PARALLEL_COPY_BYTES, PARALLEL_COPY_BYTES + 4097]


def pattern(size: int) -> bytes:
    return np.random.default_rng(size).bytes(size)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [*SIZES, 37 << 20])
def test_every_byte_lands_where_it_belongs_and_nothing_past_it(size: int) -> None:
    data = pattern(size)
    fd = os.memfd_create("copy-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size + 8192)
        with mmap.mmap(fd, size + 8192) as mapped:
            with memoryview(mapped) as whole, whole[4096:] as into:
                copy_bytes(into, memoryview(data))  # bytes: a read-only source
            assert mapped[4096 : 4096 + size] == data
            assert mapped[:4096] == bytes(4096)
            assert mapped[4096 + size :] == bytes(4096)
    finally:
        os.close(fd)


@pytest.mark.timeout(30)
def test_numpy_and_bytearray_buffers_copy_both_ways() -> None:
    size = 3 * PARALLEL_COPY_BYTES + 5
    source = np.frombuffer(pattern(size), dtype=np.uint8).copy()
    target = bytearray(size)
    copy_bytes(memoryview(target), source.data)
    assert target == source.tobytes()
    back = np.zeros(size, dtype=np.uint8)
    copy_bytes(back.data, memoryview(target))
    assert np.array_equal(back, source)


@pytest.mark.parametrize("size", [16, 2 * PARALLEL_COPY_BYTES])
def test_a_target_too_short_or_read_only_is_refused_before_any_byte(size: int) -> None:
    data = memoryview(pattern(size))
    short = bytearray(size - 1)
    with pytest.raises(ValueError, match="do not fit"):
        copy_bytes(memoryview(short), data)
    assert short == bytearray(size - 1)
    with pytest.raises((TypeError, BufferError)):
        copy_bytes(memoryview(bytes(size)), data)


@pytest.mark.timeout(30)
def test_a_forked_child_copies_with_threads_of_its_own() -> None:
    size = 2 * PARALLEL_COPY_BYTES
    data = pattern(size)
    copy_bytes(memoryview(bytearray(size)), memoryview(data))  # the parent's threads exist
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            target = bytearray(size)
            copy_bytes(memoryview(target), memoryview(data))
            code = 0 if target == data else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("a large copy in a forked child hung: it waited for the parent's threads")


@pytest.mark.timeout(10)
def test_an_interrupt_is_raised_only_once_every_part_is_copied() -> None:
    part: Future[object] = Future()
    finished = threading.Event()

    def finish_later() -> None:
        time.sleep(0.3)
        finished.set()
        part.set_result(None)

    threading.Thread(target=finish_later).start()
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            copying._wait_for_all([part])
        assert finished.is_set()  # not before the part was done
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_threads_are_one_fewer_than_the_cpus_at_most() -> None:
    size = 4 * PARALLEL_COPY_BYTES
    copy_bytes(memoryview(bytearray(size)), memoryview(pattern(size)))
    copiers = [t for t in threading.enumerate() if t.name.startswith("blobplane-copy")]
    cpus = len(os.sched_getaffinity(0))
    assert len(copiers) <= cpus - 1
    assert cpus == 1 or copiers  # a copy this large is split whenever there is a second CPU
