"""A peer hands over a sealed memfd whose pages do not exist: the reader must not pay for them.

Every page of a tmpfs file that a reader touches and that was never
allocated is allocated then, and charged to the reader's memory cgroup. A
peer that only ftruncate()s a memfd before sealing it could make a
memory-limited reader allocate gigabytes. Each hostile memfd here is made by
a real second process and arrives over SCM_RIGHTS; the reader refuses it
with `SparseBlob` unless it opted in (``allow_sparse=True``), and every blob
blobplane itself makes passes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from blobplane import BlobPool, SharedMemoryBlobs, UnixFd, map_descriptor, read_blob_contents
from blobplane.backends.checks import check_allocated, check_received_fd, fully_allocated
from blobplane.backends.kernel import cached_pages
from blobplane.channel import Channel
from blobplane.channel.aio import AsyncChannel
from blobplane.errors import SparseBlob, UnsafeDescriptor
from children import run_python

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")

# The peer: makes memfds of the kinds named on its command line and sends them back.
MAKE_MEMFDS = """
import ctypes, fcntl, os, socket, sys
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
FALLOC_FL_KEEP_SIZE = 1
libc = ctypes.CDLL(None, use_errno=True)
sock = socket.socket(fileno=int(sys.argv[1]))
size = int(sys.argv[2])
page = os.sysconf("SC_PAGE_SIZE")

def make(kind):
    fd = os.memfd_create(kind, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    if kind == "truncated":  # sized, never allocated
        os.ftruncate(fd, size)
    elif kind == "one-page":  # one page written, the rest holes
        os.ftruncate(fd, size)
        os.pwrite(fd, b"x", 0)
    elif kind == "hole-in-the-middle":  # allocated but for one page
        os.posix_fallocate(fd, 0, size // 2)
        os.posix_fallocate(fd, size // 2 + page, size - size // 2 - page)
    elif kind == "allocated-past-the-end":  # as many blocks as its size, all beyond its end
        os.ftruncate(fd, size)
        if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, ctypes.c_long(size), ctypes.c_long(size)):
            raise OSError(ctypes.get_errno(), "fallocate(KEEP_SIZE)")
    elif kind == "fallocated":
        os.posix_fallocate(fd, 0, size)
    elif kind == "written":
        os.ftruncate(fd, size)
        os.pwrite(fd, b"w" * size, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd

for kind in sys.argv[3:]:
    fd = make(kind)
    socket.send_fds(sock, [kind.encode()], [fd])
    os.close(fd)
"""

SPARSE_KINDS = ["truncated", "one-page", "hole-in-the-middle", "allocated-past-the-end"]
WHOLE_KINDS = ["fallocated", "written"]


def cachestat_works() -> bool:
    fd = os.memfd_create("probe", os.MFD_CLOEXEC)
    try:
        return cached_pages(fd, 0, 0) is not None
    finally:
        os.close(fd)


def from_a_peer(size: int, *kinds: str) -> Iterator[tuple[str, int]]:
    """(kind, fd) of memfds a child process made and sent over SCM_RIGHTS; the caller closes."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        run_python(
            MAKE_MEMFDS, str(theirs.fileno()), str(size), *kinds, pass_fds=(theirs.fileno(),)
        )
        for _ in kinds:
            data, fds, _, _ = socket.recv_fds(ours, 64, 1)
            yield data.decode(), fds[0]


def skip_without_cachestat(kind: str) -> None:
    if kind == "allocated-past-the-end" and not cachestat_works():
        pytest.skip(
            "cachestat(2) is missing (Linux < 6.5 or filtered): st_blocks alone cannot tell "
            "pages past the end from pages inside"
        )


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_a_sparse_memfd_is_refused_before_mapping(kind: str) -> None:
    skip_without_cachestat(kind)
    for _, fd in from_a_peer(4 * MIB, kind):
        try:
            with pytest.raises(SparseBlob, match="is sparse") as refused:
                map_descriptor(UnixFd(fd), 4 * MIB)
            assert isinstance(refused.value, UnsafeDescriptor)
            assert "allow_sparse=True" in str(refused.value)
            with pytest.raises(SparseBlob):
                read_blob_contents(UnixFd(fd), 4 * MIB)
            with pytest.raises(SparseBlob):
                check_allocated(fd, 4 * MIB, "the peer's memfd")
            # Nothing was faulted in by the refusal: the holes are still holes.
            assert not fully_allocated(fd, os.fstat(fd))
        finally:
            os.close(fd)


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_a_reader_that_opts_in_maps_a_sparse_memfd(kind: str) -> None:
    skip_without_cachestat(kind)
    for _, fd in from_a_peer(MIB, kind):
        try:
            with map_descriptor(UnixFd(fd), MIB, allow_sparse=True) as mapped:
                assert len(mapped) == MIB
            check_received_fd(fd, MIB, allow_sparse=True)
        finally:
            os.close(fd)


def test_whole_memfds_from_a_peer_pass() -> None:
    for kind, fd in from_a_peer(3 * MIB + 5, *WHOLE_KINDS):
        try:
            contents = read_blob_contents(UnixFd(fd), 3 * MIB + 5)
            assert contents == (b"w" * (3 * MIB + 5) if kind == "written" else bytes(3 * MIB + 5))
        finally:
            os.close(fd)


def test_reading_fewer_bytes_than_a_partly_sparse_file_holds() -> None:
    """A file allocated up to the token's size and sparse beyond: only those bytes matter."""
    if not cachestat_works():
        pytest.skip("cachestat(2) is missing: only the whole file's allocation can be judged")
    for _, fd in from_a_peer(4 * MIB, "hole-in-the-middle"):
        try:
            # The hole starts at 2 MiB: the first 2 MiB are all there, the first 3 MiB are not.
            assert read_blob_contents(UnixFd(fd), 2 * MIB) == bytes(2 * MIB)
            with pytest.raises(SparseBlob):
                read_blob_contents(UnixFd(fd), 3 * MIB)
        finally:
            os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * MIB + 5])
def test_every_blob_blobplane_makes_passes(size: int) -> None:
    with SharedMemoryBlobs() as blobs, blobs.create(size) as blob:
        blob.write_all(b"z" * min(size, 3))
        blob.seal()
        check_allocated(blob.fileno(), size, "a sealed blob")
        check_received_fd(blob.fileno(), size)
    with BlobPool(size or 1, 2) as pool, pool.loan() as loan:
        loan.set_length(min(size, 10))  # a receiver maps fewer bytes than the slot holds
        check_received_fd(loan.fileno(), loan.length)
        check_received_fd(pool.control_fileno(), 16)


# -- over a channel: the fast lane and the full checks -----------------------------------------

SEND_HANDOFFS = """
import fcntl, os, socket, sys
from blobplane import BlobId, BlobToken
from blobplane.wire import BlobHandoff, Connection, ErrorReply, Ack, Received
sock = socket.socket(fileno=int(sys.argv[1]))
wire = Connection("datagram")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
for kind in ("sparse", "whole"):
    fd = os.memfd_create(kind, os.MFD_ALLOW_SEALING)
    if kind == "sparse":
        os.ftruncate(fd, 1 << 20)
    else:
        os.posix_fallocate(fd, 0, 1 << 20)
        os.pwrite(fd, b"whole", 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    handoff = BlobHandoff(id=wire.next_id(), token=BlobToken(BlobId.new(), 1 << 20))
    data, _ = wire.send(handoff, (fd,))
    socket.send_fds(sock, [data], [fd])
    os.close(fd)
sock.settimeout(10)
answers = []
while len(answers) < 2:
    event = wire.next_event()
    if isinstance(event, Received):
        answers.append(type(event.message).__name__)
    else:
        wire.receive_data(sock.recv(65536))
print(" ".join(answers))
"""


def _exchange(flavour: str, allow_sparse: bool) -> tuple[list[object], str]:
    """Receive the peer's two handoffs (sparse, then whole); return what came and its replies."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    loop = asyncio.new_event_loop() if flavour == "aio" else None
    channel = AsyncChannel(ours, timeout=10) if loop else Channel(ours, timeout=10)
    channel.allow_sparse = allow_sparse
    outcomes: list[object] = []
    try:
        with theirs:
            child = _start(SEND_HANDOFFS, theirs.fileno())
        for _ in range(2):
            try:
                if loop is not None:
                    assert isinstance(channel, AsyncChannel)
                    mapped = loop.run_until_complete(channel.recv_blob())
                else:
                    assert isinstance(channel, Channel)
                    mapped = channel.recv_blob()
            except SparseBlob as exc:
                outcomes.append(exc)
                continue
            with mapped, mapped.as_slice() as view:
                outcomes.append(bytes(view[:5]))
        stdout, stderr = child.communicate(timeout=30)
        assert child.returncode == 0, stderr
        return outcomes, stdout.strip()
    finally:
        channel.close()
        if loop is not None:
            loop.close()


def _start(code: str, fd: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(fd)],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_a_channel_refuses_a_sparse_handoff_and_carries_on(flavour: str) -> None:
    outcomes, replies = _exchange(flavour, allow_sparse=False)
    assert isinstance(outcomes[0], SparseBlob)
    assert outcomes[1] == b"whole"
    assert replies == "ErrorReply Ack"  # the peer is told which one was refused


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_a_channel_that_allows_sparse_blobs_takes_both(flavour: str) -> None:
    outcomes, replies = _exchange(flavour, allow_sparse=True)
    assert outcomes == [bytes(5), b"whole"]
    assert replies == "Ack Ack"
