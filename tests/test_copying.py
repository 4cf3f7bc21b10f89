"""The one bulk copy: exact bytes whatever the size and the buffers, parts split across threads."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

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


INTERRUPTED = """
import mmap, random, signal, sys
from blobplane.backends.copying import copy_bytes

class Tick(Exception):
    pass

armed = False

def tick(*_):
    if armed:  # only inside the copy's try: an alarm that comes late is let go
        raise Tick

signal.signal(signal.SIGALRM, tick)
size = 64 << 20
source = memoryview(bytes(size))
interrupted = 0
for attempt in range(300):
    mapped = mmap.mmap(-1, size)
    view = memoryview(mapped)
    armed = True
    signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0001, 0.004))
    try:
        copy_bytes(view, source)
        armed = False
    except Tick:
        armed = False
        interrupted += 1
    view.release()
    while True:  # a part still copying holds the mapping: close once it is done
        try:
            mapped.close()
            break
        except BufferError:
            pass
print(interrupted)
"""


@pytest.mark.timeout(60)
def test_an_interrupted_copy_never_writes_into_memory_that_is_gone() -> None:
    # In a process of its own: a part copying into an unmapped buffer is a segfault.
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTED], check=False, capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 50  # the interrupts did land during copies


@pytest.mark.parametrize("shift", [4096, -4096])
def test_overlapping_buffers_are_copied_as_memmove_would(shift: int) -> None:
    size = 2 * PARALLEL_COPY_BYTES
    data = bytearray(pattern(size + 4096))
    expected = bytearray(data)
    start, target = (0, shift) if shift > 0 else (-shift, 0)
    expected[target : target + size] = bytes(expected[start : start + size])
    with memoryview(data) as whole:
        copy_bytes(whole[target : target + size], whole[start : start + size])
    assert data == expected


AT_EXIT = """
import atexit
from blobplane.backends.copying import PARALLEL_COPY_BYTES, copy_bytes

def late_copy():
    size = 4 * PARALLEL_COPY_BYTES
    source = bytes(range(256)) * (size // 256)
    target = bytearray(size)
    copy_bytes(memoryview(target), memoryview(source))
    print("copied" if target == source else "wrong")

atexit.register(late_copy)
"""


@pytest.mark.timeout(30)
def test_a_large_copy_at_the_interpreters_exit_is_made() -> None:
    result = subprocess.run(
        [sys.executable, "-c", AT_EXIT], check=False, capture_output=True, text=True, timeout=25
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "copied\n", result.stderr


FORKED = """
import mmap, os, sys, threading, time
from blobplane.backends.copying import copy_bytes

size = 64 << 20
mapped = mmap.mmap(-1, size)
source = memoryview(bytes(size))
view = memoryview(mapped)
failures = []

def fork_often():
    for _ in range(20):
        time.sleep(0.003)
        pid = os.fork()
        if pid == 0:  # the child: no copy runs here, so the mapping can go
            try:
                view.release()
                mapped.close()
                os._exit(0)
            except BufferError:
                os._exit(3)
        failures.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

forker = threading.Thread(target=fork_often)
forker.start()
while forker.is_alive():
    copy_bytes(view, source)
forker.join()
print(sum(code != 0 for code in failures))
"""


@pytest.mark.timeout(60)
def test_a_child_forked_during_a_copy_can_close_what_was_being_copied() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", FORKED],
        check=False,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0\n", result.stderr


def test_the_threads_are_one_fewer_than_the_cpus_at_most() -> None:
    size = 4 * PARALLEL_COPY_BYTES
    copy_bytes(memoryview(bytearray(size)), memoryview(pattern(size)))
    copiers = [t for t in threading.enumerate() if t.name.startswith("blobplane-copy")]
    cpus = len(os.sched_getaffinity(0))
    assert len(copiers) <= cpus - 1
    assert cpus == 1 or copiers  # a copy this large is split whenever there is a second CPU
