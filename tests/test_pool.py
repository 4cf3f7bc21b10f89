"""BlobPool: reused, pre-faulted memfd slots and what the kernel guarantees about them."""

from __future__ import annotations

import fcntl
import mmap
import os
import threading

import pytest

from blobplane import BlobPool, UnixFd, map_descriptor, read_blob_contents
from blobplane.errors import BlobBusy, BlobClosed, InvalidSize, OutOfBounds, Timeout
from blobplane.pool import POOL_SEALS
from children import run_python

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_loan_fill_read_and_reuse() -> None:
    with BlobPool(slot_size=10_000, slots=2) as pool:
        assert pool.free_slots == 2
        with pool.loan() as loan:
            loan.buffer[:5] = b"first"
            loan.write_all(b"!", offset=5)
            loan.set_length(6)
            assert pool.free_slots == 1
            assert read_blob_contents(loan.descriptor, loan.length) == b"first!"
        assert pool.free_slots == 2


def test_slots_are_page_aligned_and_sealed_for_readers() -> None:
    with BlobPool(slot_size=4096 * 3 + 1, slots=1) as pool, pool.loan() as loan:
        fd = loan.fileno()
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & POOL_SEALS == POOL_SEALS
        assert os.fstat(fd).st_size % mmap.PAGESIZE == 0
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 4096, access=mmap.ACCESS_WRITE)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        loan.write_all(b"the producer still writes")  # through its own mapping
        with map_descriptor(UnixFd(fd), 25) as mapped:
            assert bytes(mapped.as_slice()) == b"the producer still writes"


def test_another_process_cannot_map_a_slot_writable() -> None:
    with BlobPool(slot_size=1 << 20, slots=1) as pool, pool.loan() as loan:
        loan.write_all(b"pool data")
        result = run_python(
            """
            import mmap, os, sys
            fd = int(sys.argv[1])
            for attempt in (
                lambda: mmap.mmap(fd, 4096, access=mmap.ACCESS_WRITE),
                lambda: os.ftruncate(fd, 0),
                lambda: os.pwrite(fd, b"evil", 0),
                lambda: mmap.mmap(os.open(f"/proc/self/fd/{fd}", os.O_RDWR), 4096),
            ):
                try:
                    attempt()
                    print("allowed")
                except PermissionError:
                    print("refused")
            with mmap.mmap(fd, 4096, access=mmap.ACCESS_READ) as view:
                print(view[:9].decode())
            """,
            str(loan.fileno()),
            pass_fds=(loan.fileno(),),
        )
        assert result.stdout.split() == ["refused"] * 4 + ["pool", "data"]


def test_a_slot_returns_only_after_every_reader_released_it() -> None:
    with BlobPool(slot_size=4096, slots=1) as pool:
        loan = pool.loan()
        first_generation = loan.generation
        pool.retain(loan.slot)
        pool.retain(loan.slot)
        loan.close()
        assert pool.try_loan() is None
        pool.release(loan.slot)
        assert pool.try_loan() is None
        pool.release(loan.slot)
        with pool.loan(timeout=0) as again:
            assert again.slot == loan.slot
            assert again.generation == pool.generation(again.slot) == first_generation + 1
        with pytest.raises(BlobBusy, match="released more often"):
            pool.release(loan.slot)


def test_the_slot_freed_last_is_loaned_first() -> None:
    """Its pages are the likeliest still to be in the CPU's caches."""
    with BlobPool(slot_size=4096, slots=3) as pool:
        loans = [pool.loan() for _ in range(3)]
        assert [loan.slot for loan in loans] == [0, 1, 2]
        for loan in (loans[2], loans[0], loans[1]):
            loan.close()
        first = pool.try_loan()
        assert first is not None
        again = [first, pool.loan(), pool.loan(timeout=0)]
        assert [loan.slot for loan in again] == [1, 0, 2]
        for loan in again:
            loan.close()


def test_loan_waits_for_a_release_from_another_thread() -> None:
    with BlobPool(slot_size=4096, slots=1) as pool:
        loan = pool.loan()
        waiting = threading.Event()

        def give_back() -> None:
            waiting.wait(10)
            loan.close()

        thread = threading.Thread(target=give_back)
        thread.start()
        waiting.set()
        with pool.loan(timeout=10) as second:
            assert second.slot == loan.slot
        thread.join(10)
        with pool.loan() as third:
            third.close()
        with pool.loan(), pytest.raises(Timeout, match="no free slot"):
            pool.loan(timeout=0.01)


def test_bad_arguments_and_closed_pools() -> None:
    for size, slots in ((0, 1), (4096, 0), (-1, 1), (4096, 1.5)):
        with pytest.raises(InvalidSize):
            BlobPool(size, slots)  # type: ignore[arg-type]
    pool = BlobPool(4096, 1)
    loan = pool.loan()
    with pytest.raises(OutOfBounds):
        loan.write_all(b"x" * 4097)
    with pytest.raises(OutOfBounds):
        loan.set_length(4097)
    loan.close()
    with pytest.raises(BlobClosed):
        _ = loan.buffer
    pool.close()
    pool.close()
    with pytest.raises(BlobClosed):
        pool.loan()


def test_thousands_of_loans_leave_nothing_behind() -> None:
    with BlobPool(slot_size=64 * 1024, slots=4) as pool:
        for number in range(3000):
            with pool.loan() as loan:
                loan.write_all(number.to_bytes(4, "little"))
                pool.retain(loan.slot)
            pool.release(loan.slot)
        assert pool.free_slots == 4


CLAIM_IN_CHILD = """
import os, sys
from blobplane.backends.memfd import reopen_readonly
from blobplane.slot_claims import try_claim_shared, unclaim
fd = reopen_readonly(int(sys.argv[1]))
assert try_claim_shared(fd, int(sys.argv[2]))
print("claimed", flush=True)
sys.stdin.readline()
unclaim(fd, int(sys.argv[2]))
print("unclaimed", flush=True)
sys.stdin.readline()
"""


def test_a_slot_a_reader_is_reading_cannot_be_revoked() -> None:
    import subprocess
    import sys

    with BlobPool(slot_size=4096, slots=2) as pool:
        with pool.loan() as loan:
            pool.retain(loan.slot)
        control = pool.control_fileno()
        with subprocess.Popen(
            [sys.executable, "-c", CLAIM_IN_CHILD, str(control), str(loan.slot)],
            pass_fds=(control,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdin is not None
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "claimed"
            assert not pool.try_revoke(loan.slot)
            assert pool.holders(loan.slot) == 1
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "unclaimed"
            generation = pool.generation(loan.slot)
            assert pool.try_revoke(loan.slot)
            assert pool.generation(loan.slot) == generation + 1
            assert pool.holders(loan.slot) == 0
            assert pool.free_slots == 2
            assert not pool.try_revoke(loan.slot)  # nothing to take back
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(timeout=30) == 0


# Watches slot 0's generation through one aligned 8-byte load at a time (what a
# reader on another CPU sees) until stdin closes; prints how many loads went back.
WATCH_GENERATION = """
import mmap, sys, threading
fd = int(sys.argv[1])
words = memoryview(mmap.mmap(fd, mmap.PAGESIZE, access=mmap.ACCESS_READ)).cast("Q")
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("watching", flush=True)
last, backwards, loads = words[0], 0, 0
while not stop.is_set():
    for _ in range(10_000):
        now = words[0]
        if now < last:
            backwards += 1
        last = now
    loads += 10_000
print(backwards, loads, flush=True)
"""


def test_a_reader_never_sees_a_generation_half_written() -> None:
    # struct.pack_into zeroes its bytes before writing them: a reader in another
    # process could see 0, or a mix of old and new bytes, where the old or new
    # generation belongs. A stale generation read as current lets a reader take a
    # revoked slot for its frame.
    import subprocess
    import sys
    import time

    with BlobPool(slot_size=4096, slots=1) as pool:
        control = pool.control_fileno()
        with subprocess.Popen(
            [sys.executable, "-c", WATCH_GENERATION, str(control)],
            pass_fds=(control,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdin is not None
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "watching"
            end = time.monotonic() + 2
            while time.monotonic() < end:
                for _ in range(1000):
                    pool._bump_generation(0)  # what every loan and revoke does
            child.stdin.close()
            backwards, loads = map(int, child.stdout.readline().split())
            assert child.wait(timeout=30) == 0
    assert loads > 0
    assert backwards == 0
