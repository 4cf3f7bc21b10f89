"""Puts a client of this library would not send. A pool slot put to outlive its producer
(`Put(pooled=True, keep=True)`) is published on after the producer goes only if the broker
can seal it against every write then: a producer that keeps a writable mapping, or sealed
the seals, gets it withdrawn instead. A put that carries its bytes must carry as many as it
says, and no fd."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time

import pytest
from rawclient import RawConnection
from test_broker_bounds import ask, hello

from blobplane.backends.checks import F_SEAL_FUTURE_WRITE
from blobplane.broker.protocol import BlobReply, Put, Refused
from blobplane.client import connect_broker
from blobplane.errors import BlobNotFound
from brokers import Broker, running_broker, wait_until

pytestmark = pytest.mark.usefixtures("no_leaks")

SIZE = 1 << 20
SLOT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE


def slot(extra_seals: int = 0) -> tuple[int, mmap.mmap]:
    """A slot as a pool makes it: mapped writable first, then sealed against new writers."""
    fd = os.memfd_create("hostile-slot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.posix_fallocate(fd, 0, SIZE)
    mapped = mmap.mmap(fd, SIZE)
    mapped[:5] = b"first"
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SLOT_SEALS | extra_seals)
    return fd, mapped


@pytest.mark.parametrize(
    ("keeps_mapping", "seal_sealed", "published"),
    [
        (False, False, True),  # let go of everything: sealed against writes, kept
        (True, False, False),  # still maps it writable: it could change, so withdrawn
        (False, True, False),  # no seal can be added: withdrawn
    ],
    ids=["let-go", "keeps-a-writable-mapping", "seals-sealed"],
)
def test_a_kept_slot_outlives_its_producer_only_once_nobody_can_write_it(
    keeps_mapping: bool, seal_sealed: bool, published: bool
) -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as reader:
        fd, mapped = slot(fcntl.F_SEAL_SEAL if seal_sealed else 0)
        try:
            raw = RawConnection(broker.socket_path)
            hello(raw)
            put = Put(rid=raw.next_rid(), size=SIZE, key="kept", pooled=True, keep=True)
            assert isinstance(ask(raw, put, (fd,)), BlobReply)
            os.close(fd)
            if not keeps_mapping:
                mapped.close()
            raw.close()
            wait_until(lambda: reader.stats().clients == 1, "the producer's disconnection")
            if published:
                with reader.get("kept") as read:
                    assert bytes(read.as_slice()[:5]) == b"first"
                reader.delete("kept")
            else:
                with pytest.raises(BlobNotFound):
                    reader.get("kept")
                # Nobody writes into a published blob: what the producer writes now
                # is its own business.
                if keeps_mapping:
                    mapped[:5] = b"later"
            wait_until(lambda: reader.stats().blobs == 0, "the slot to be freed")
        finally:
            if not mapped.closed:
                mapped.close()


def test_inline_puts_that_lie_are_refused_and_leave_nothing() -> None:
    with running_broker() as broker:
        raw = RawConnection(broker.socket_path)
        hello(raw)
        lies = [
            Put(rid=raw.next_rid(), size=10, data=b"x" * 9),  # shorter than it says
            Put(rid=raw.next_rid(), size=8, data=b"x" * 9),  # longer than it says
            Put(rid=raw.next_rid(), size=4, data=b"four", pooled=True),  # no slot to pool
            Put(rid=raw.next_rid(), size=4, data=b"four", keep=True),
        ]
        for lie in lies:
            reply = ask(raw, lie)
            assert isinstance(reply, Refused)
            assert reply.error == "InvalidSize", reply
        assert broker.memfds() == 0
        # Bytes and an fd at once: the count of fds is wrong, the connection ends.
        fd = os.memfd_create("extra", os.MFD_CLOEXEC)
        try:
            raw.send_request(Put(rid=raw.next_rid(), size=4, data=b"four"), (fd,))
        finally:
            os.close(fd)
        wait_until(lambda: not broker_has_client(broker), "the connection to end")
        assert broker.memfds() == 0
        raw.close()


def broker_has_client(broker: Broker) -> bool:
    with connect_broker(broker.socket_path) as probe:
        return probe.stats().clients > 1


F_SETPIPE_SZ = 1031
SPLICE_F_NONBLOCK = 2


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def pinned_slot(pipe_write: int) -> int:
    """A slot whose pages a pipe still references (vmsplice) after it is unmapped: the
    kernel's seal waits for them before it refuses."""
    fd, mapped = slot()
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (ctypes.c_char * SIZE).from_buffer(mapped)
    vector = _Iovec(ctypes.addressof(pages), 64 << 10)
    spliced = libc.vmsplice(pipe_write, ctypes.byref(vector), 1, SPLICE_F_NONBLOCK)
    del pages
    mapped.close()
    if spliced <= 0:  # pragma: no cover - a kernel without vmsplice
        os.close(fd)
        pytest.skip("vmsplice is not available")
    return fd


def test_slow_seals_of_a_departing_client_hold_up_nobody_else() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as other:
        pipe_read, pipe_write = os.pipe()
        fcntl.fcntl(pipe_write, F_SETPIPE_SZ, 1 << 20)  # room for every slot's pages
        raw = RawConnection(broker.socket_path)
        hello(raw)
        try:
            for index in range(8):
                fd = pinned_slot(pipe_write)
                try:
                    put = Put(
                        rid=raw.next_rid(), size=SIZE, key=f"p{index}", pooled=True, keep=True
                    )
                    assert isinstance(ask(raw, put, (fd,)), BlobReply)
                finally:
                    os.close(fd)
            started = time.monotonic()
            raw.close()  # eight seals to try, each waiting for the pinned pages
            slowest, left = 0.0, 8
            while left:  # until they are withdrawn
                begun = time.monotonic()
                left = other.stats().blobs
                other.put_bytes(b"served", key="other")
                with other.get("other") as read:
                    assert bytes(read.as_slice()) == b"served"
                other.delete("other")
                slowest = max(slowest, time.monotonic() - begun)
                assert time.monotonic() - started < 30, "the seals never ended"
            sealing = time.monotonic() - started
        finally:
            os.close(pipe_read)
            os.close(pipe_write)
        assert sealing > 0.5  # the seals did take long...
        assert slowest < sealing / 4  # ...and the other client was served meanwhile
        with pytest.raises(BlobNotFound):
            other.get("p0")  # pinned pages: not sealable, withdrawn
