"""blobplane.multiprocessing with real processes: every start method, every way objects travel.

Each (start method, mechanism) pair sends a large and a small array to a
worker and gets a large and a small array back: the large ones must arrive
read-only (shared) and intact, the small ones writable (pickled as usual).
The pools and children are started once per start method, while installed,
so spawned and forkserver children show that they install it themselves.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.reduction import ForkingPickler
from typing import Any, cast

import numpy as np
import pytest

import blobplane.multiprocessing as bmp
from blobplane.errors import BlobNotFound, ConnectionRefused, NotSealed
from blobplane.multiprocessing.sharer import process_sharer
from children import run_python
from leaks import Snapshot, blob_mappings

pytestmark = pytest.mark.timeout(60)

THRESHOLD = 64 * 1024
BIG = 256 * 1024  # bytes: shared
SMALL = 1024  # bytes: pickled
METHODS = ["fork", "spawn", "forkserver"]
MECHANISMS = ["pool_map", "pool_imap", "executor_map", "executor_submit", "queue", "pipe"]
SETTLE_S = 5.0  # how long the sharer may take to close what it sent


# -- what the workers run ----------------------------------------------------------------------


def digest(array: Any) -> str:
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def inspect(big: Any, small: Any) -> dict[str, Any]:
    """What the worker saw, and two new arrays to send back."""
    return {
        "big_read_only": not big.flags.writeable,
        "small_read_only": not small.flags.writeable,
        "digests": (digest(big), digest(small)),
        "big_out": big + 1,
        "small_out": small + 1,
    }


def inspect_pair(pair: tuple[Any, Any]) -> dict[str, Any]:
    return inspect(*pair)


def serve_queue(inbox: Any, outbox: Any) -> None:
    while (pair := inbox.get()) is not None:
        outbox.put(inspect(*pair))
        del pair


def serve_pipe(conn: Any) -> None:
    while (pair := conn.recv()) is not None:
        conn.send(inspect(*pair))
        del pair


def hold(array: Any, seconds: float) -> float:
    time.sleep(seconds)
    return float(array.sum())


def total(array: Any) -> float:
    return float(array.sum())


def memfds_of(pid: int) -> list[str]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if "memfd:blobplane" in target:
            found.append(target)
    return found


def put_and_exit(queue: Any, size: int, abruptly: bool) -> None:
    queue.put(np.full(size, 7, dtype=np.uint8))
    if abruptly:
        queue.close()
        queue.join_thread()  # the pickle is in the pipe, its memfd pending here
        os._exit(0)  # no finalizers: the pending memfd goes with the process


def count_memfds() -> int:
    return len(memfds_of(os.getpid()))


def report_memfds(conn: Any) -> None:
    conn.send(count_memfds())


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def installed() -> Iterator[None]:
    with bmp.installed(threshold=THRESHOLD, exit_timeout=5):
        # Start this process's fd server now, so no test counts its socket as a leak.
        pickle.loads(ForkingPickler.dumps(np.zeros(BIG, np.uint8)))
        yield


class Workers:
    """A Pool, an executor and two serving children of one start method, started once."""

    def __init__(self, method: str) -> None:
        self.context = cast(Any, multiprocessing.get_context(method))  # its Process is per method
        self.pool = self.context.Pool(1)
        self.executor = ProcessPoolExecutor(1, mp_context=self.context)
        self.inbox, self.outbox = self.context.Queue(), self.context.Queue()
        self.queue_child = self.context.Process(target=serve_queue, args=(self.inbox, self.outbox))
        self.conn, theirs = self.context.Pipe()
        self.pipe_child = self.context.Process(target=serve_pipe, args=(theirs,))
        self.queue_child.start()
        self.pipe_child.start()
        theirs.close()
        # Warm every path up: workers started, feeder threads running, fds settled.
        for mechanism in MECHANISMS:
            self.send(mechanism, np.zeros(4, np.uint8), np.zeros(4, np.uint8))

    def send(self, mechanism: str, big: Any, small: Any) -> dict[str, Any]:
        result: dict[str, Any]
        match mechanism:
            case "pool_map":
                result = self.pool.map(inspect_pair, [(big, small)])[0]
            case "pool_imap":
                result = next(iter(self.pool.imap(inspect_pair, [(big, small)])))
            case "executor_map":
                result = next(iter(self.executor.map(inspect_pair, [(big, small)])))
            case "executor_submit":
                result = self.executor.submit(inspect, big, small).result(timeout=30)
            case "queue":
                self.inbox.put((big, small))
                result = self.outbox.get(timeout=30)
            case "pipe":
                self.conn.send((big, small))
                assert self.conn.poll(30)
                result = self.conn.recv()
            case _:
                raise AssertionError(mechanism)
        return result

    def close(self) -> None:
        self.inbox.put(None)
        self.conn.send(None)
        self.queue_child.join(10)
        self.pipe_child.join(10)
        self.pool.close()
        self.pool.join()
        self.executor.shutdown()
        for queue in (self.inbox, self.outbox):
            queue.close()
            queue.join_thread()
        self.conn.close()


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, Workers]]:
    started: dict[str, Workers] = {}
    yield started
    for each in started.values():
        each.close()


def workers_for(workers: dict[str, Workers], method: str) -> Workers:
    if method not in workers:
        workers[method] = Workers(method)
    return workers[method]


@pytest.fixture
def settled_leaks() -> Iterator[Callable[[], None]]:
    """Like `no_leaks`, but the test calls the check once its workers are started."""
    before: list[Snapshot] = []

    def start() -> None:
        gc.collect()
        before.append(Snapshot.take())

    yield start
    # The sharer's thread closes a sent fd and its connection right after the send,
    # in its own time: a result can come back first.
    deadline = time.monotonic() + SETTLE_S
    while True:
        gc.collect()
        leaks = Snapshot.take().leaks_since(before[0])
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaks, "; ".join(leaks)


# -- every start method, every mechanism -----------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("method", METHODS)
def test_arguments_and_results_travel_shared(
    workers: dict[str, Workers], method: str, mechanism: str, settled_leaks: Callable[[], None]
) -> None:
    each = workers_for(workers, method)
    settled_leaks()
    rng = np.random.default_rng(len(method) * 10 + len(mechanism))
    big = rng.integers(0, 255, BIG, dtype=np.uint8)
    small = rng.integers(0, 255, SMALL, dtype=np.uint8)

    out = each.send(mechanism, big, small)

    assert out["big_read_only"], "the large argument arrived pickled, not shared"
    assert not out["small_read_only"], "the small argument should have been pickled"
    assert out["digests"] == (digest(big), digest(small))
    assert not out["big_out"].flags.writeable, "the large result came back pickled"
    assert out["small_out"].flags.writeable
    np.testing.assert_array_equal(out["big_out"], big + 1)
    np.testing.assert_array_equal(out["small_out"], small + 1)
    assert bmp.unclaimed() == (0, 0)
    del out


# -- what travels, and how it comes back ----------------------------------------------------


def test_pandas_arrow_memoryview_and_shared_bytes(no_leaks: None) -> None:
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    bmp.install()  # again: pandas and pyarrow are imported now
    n = BIG // 8

    def roundtrip(obj: object) -> Any:
        pickled = ForkingPickler.dumps(obj)
        assert len(pickled) < THRESHOLD, f"{type(obj)} was pickled whole"
        return pickle.loads(pickled)

    frame = pd.DataFrame({"x": np.arange(n), "y": np.ones(n), "s": ["a"] * n})
    series = pd.Series(np.arange(n, dtype=np.float64), name="v")
    index = pd.Index(np.arange(n))
    table = pa.table({"x": np.arange(n), "y": np.ones(n)})
    array = pa.array(np.arange(n))
    buffer = pa.py_buffer(bytes(BIG))
    matrix = np.arange(n, dtype=np.int32).reshape(-1, 4)
    view = matrix.data
    pd.testing.assert_frame_equal(roundtrip(frame), frame)
    back = roundtrip(series)
    pd.testing.assert_series_equal(back, series)
    assert not back.to_numpy().flags.writeable
    pd.testing.assert_index_equal(roundtrip(index), index)
    assert roundtrip(table).equals(table)
    assert roundtrip(array).equals(array)
    assert roundtrip(buffer).equals(buffer)
    got = roundtrip(view)
    assert (got.format, got.shape, got.readonly) == (view.format, view.shape, True)
    assert got.tobytes() == view.tobytes()
    small_view = pickle.loads(ForkingPickler.dumps(memoryview(b"abc")))
    assert (small_view.tobytes(), small_view.readonly) == (b"abc", True)
    data = bytes(range(256)) * (BIG // 256)
    for wrapped, kind in ((data, bytes), (bytearray(data), bytearray)):
        got_back = roundtrip(bmp.share(wrapped))
        assert type(got_back) is kind
        assert got_back == wrapped
    assert roundtrip(bmp.share({"a": np.ones(10)}))["a"].tolist() == [1.0] * 10
    del back, got, got_back


def test_below_threshold_and_object_arrays_pickled_as_usual() -> None:
    small = np.arange(100)
    assert pickle.loads(ForkingPickler.dumps(small)).flags.writeable
    objects = np.array([object()] * (BIG // 8), dtype=object)
    assert len(ForkingPickler.dumps(objects)) > BIG // 8  # in the stream, as before
    assert bmp.unclaimed() == (0, 0)


def test_uninstall_restores_multiprocessing_pickling() -> None:
    table = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    installed_table = dict(table)
    big = np.ones(BIG // 8)
    bmp.uninstall(timeout=0)
    try:
        assert not bmp.is_installed()
        assert np.ndarray not in table
        assert memoryview not in table
        assert len(ForkingPickler.dumps(big)) > BIG
        assert pickle.loads(ForkingPickler.dumps(big)).flags.writeable
        with pytest.raises(TypeError, match="memoryview"):
            ForkingPickler.dumps(memoryview(b"x"))
        with bmp.installed(threshold=THRESHOLD):
            assert len(ForkingPickler.dumps(np.ones(1))) < 1000
            pickle.loads(ForkingPickler.dumps(big))
            assert bmp.is_installed()
        assert not bmp.is_installed()
        assert not process_sharer().serving, "uninstall leaves no server behind"
    finally:
        bmp.install(threshold=THRESHOLD)
        pickle.loads(ForkingPickler.dumps(big))  # the module's server again
    assert set(table) >= set(installed_table)


def test_installed_restores_the_settings_before_it() -> None:
    with bmp.installed(threshold=1):
        pickled = ForkingPickler.dumps(np.ones(1))
        assert not pickle.loads(pickled).flags.writeable  # 8 bytes, shared
    assert bmp.is_installed()
    assert pickle.loads(ForkingPickler.dumps(np.ones(1))).flags.writeable


# -- lifetimes -------------------------------------------------------------------------------


def test_a_pickle_loads_once_and_unclaimed_ones_are_released(no_leaks: None) -> None:
    pickled = ForkingPickler.dumps(np.ones(BIG // 8))
    count, size = bmp.unclaimed()
    assert count == 1
    assert BIG <= size < BIG + 16384
    pickle.loads(pickled)
    with pytest.raises(BlobNotFound):
        pickle.loads(pickled)
    never_loaded = ForkingPickler.dumps(np.ones(BIG // 8))
    assert bmp.unclaimed()[0] == 1
    assert process_sharer().drain(0, stop=False) == 1
    assert bmp.unclaimed() == (0, 0)
    with pytest.raises(BlobNotFound):
        pickle.loads(never_loaded)


def test_the_mapping_lives_as_long_as_the_array(no_leaks: None) -> None:
    mapped_before = blob_mappings()
    array = pickle.loads(ForkingPickler.dumps(np.ones(BIG // 8)))
    view = array[10:20]
    del array
    gc.collect()
    assert blob_mappings() == mapped_before + 1
    assert view.sum() == 10
    del view
    gc.collect()
    assert blob_mappings() == mapped_before


def test_max_pending_pickles_the_rest_as_usual() -> None:
    with bmp.installed(max_pending=BIG + 8192):
        first = ForkingPickler.dumps(np.ones(BIG // 8))
        second = ForkingPickler.dumps(np.ones(BIG // 8))
        assert len(first) < 1000
        assert len(second) > BIG
        pickle.loads(first)


def test_a_received_memfd_must_be_sealed(no_leaks: None) -> None:
    fd = os.memfd_create("blobplane:test-unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, bytes(8192))
        address, token = process_sharer().offer(fd, 8192)
    finally:
        os.close(fd)
    with pytest.raises(NotSealed):
        bmp._rebuild(address, token, 8192, b"")


# -- processes that die ----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_worker_killed_mid_task_leaks_nothing(settled_leaks: Callable[[], None]) -> None:
    context = multiprocessing.get_context("fork")
    pool = context.Pool(2)
    try:
        pool.map(total, [np.zeros(4)] * 4)
        settled_leaks()
        originals = [p.pid for p in pool._pool]  # type: ignore[attr-defined]
        held = pool.apply_async(hold, (np.ones(BIG // 8), 60))
        wait_for(lambda: any(blob_mappings(pid) for pid in originals))
        victim = next(pid for pid in originals if blob_mappings(pid))
        survivor = next(pid for pid in originals if pid != victim)
        # The survivor takes a shared array too, and must let it go once done.
        assert pool.apply_async(total, (np.ones(BIG // 8),)).get(20) == BIG // 8
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in [p.pid for p in pool._pool])  # type: ignore[attr-defined]
        assert pool.apply_async(total, (np.ones(BIG // 8),)).get(20) == BIG // 8
        assert not held.ready()
        wait_for(lambda: not memfds_of(survivor) and not blob_mappings(survivor))
    finally:
        pool.terminate()
        pool.join()
    assert bmp.unclaimed() == (0, 0)


def test_executor_worker_killed_leaves_nothing_pending(settled_leaks: Callable[[], None]) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as executor:
        executor.submit(total, np.zeros(4)).result(30)
        settled_leaks()
        pid = next(iter(executor._processes))
        futures = [executor.submit(hold, np.ones(BIG // 8), 60) for _ in range(3)]
        wait_for(lambda: blob_mappings(pid) > 0)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            futures[0].result(30)
    # The tasks queued behind the killed one were pickled (their memfds pending
    # here) but never read; uninstall (or the end of the process) releases them.
    count, size = bmp.unclaimed()
    assert count <= 2
    assert size <= 2 * BIG + 2 * 8192
    assert process_sharer().drain(0, stop=False) == count
    assert bmp.unclaimed() == (0, 0)


@pytest.mark.parametrize("abruptly", [False, True], ids=["exits", "dies"])
def test_a_sender_that_ends(abruptly: bool, settled_leaks: Callable[[], None]) -> None:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=put_and_exit, args=(queue, BIG, abruptly))
    settled_leaks()
    child.start()
    time.sleep(0.3)  # the child is done sending, and waits (or died)
    if abruptly:
        with pytest.raises(ConnectionRefused):
            queue.get(timeout=30)
    else:
        # Its exit waits for the reader: the array is still there to take.
        got = queue.get(timeout=30)
        assert not got.flags.writeable
        assert int(got[0]) == 7
        del got
    child.join(10)
    assert child.exitcode == 0
    child.close()
    queue.close()
    queue.join_thread()


def test_a_forked_child_closes_the_fds_pending_in_its_parent() -> None:
    gc.collect()
    before = count_memfds()
    pending = ForkingPickler.dumps(np.ones(BIG // 8))
    assert count_memfds() == before + 1
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    child = context.Process(target=report_memfds, args=(theirs,))
    child.start()
    assert ours.recv() == before
    child.join(10)
    child.close()
    pickle.loads(pending)
    assert count_memfds() == before


def test_a_process_without_relatives_does_not_wait_for_readers() -> None:
    started = time.monotonic()
    result = run_python(
        """
        import time
        import numpy as np
        from multiprocessing.reduction import ForkingPickler
        import blobplane.multiprocessing as bmp

        bmp.install(threshold=1024, exit_timeout=30)
        ForkingPickler.dumps(np.ones(100_000))  # never read
        started = time.monotonic()
        released = bmp.uninstall()
        print(released, round(time.monotonic() - started))
        ForkingPickler.dumps(np.ones(100_000))  # not shared any more
        bmp.install(threshold=1024, exit_timeout=30)
        ForkingPickler.dumps(np.ones(100_000))  # pending at exit
        """
    )
    assert result.stdout.split() == ["1", "0"]
    assert time.monotonic() - started < 10  # its exit did not wait 30 s either


def test_initializer_installs_in_workers_of_an_uninstalled_parent() -> None:
    bmp.uninstall(timeout=0)
    try:
        with multiprocessing.get_context("fork").Pool(1, initializer=bmp.install) as pool:
            out = pool.apply(inspect, (np.ones(BIG * 8, np.uint8), np.ones(4, np.uint8)))
        assert not out["big_read_only"]  # the parent pickled it: not installed here
        assert not out["big_out"].flags.writeable  # the worker shared its result
        del out
    finally:
        bmp.install(threshold=THRESHOLD)
        pickle.loads(ForkingPickler.dumps(np.ones(BIG // 8)))
