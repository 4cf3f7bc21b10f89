"""Blobs in the host's reserved huge pages (`MFD_HUGETLB`), for a caller that asks for them,
and files of huge pages from any peer, mapped and unmapped whole."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import socket

import pytest

from blobplane import BlobBackend, BlobId, BlobToken, SharedMemoryBlobs, channel
from blobplane.backends.hugepages import reserved_huge_pages as reserved
from blobplane.client import connect_broker
from blobplane.errors import InvalidSize
from blobplane.wire import BlobHandoff
from brokers import running_broker
from children import run_python
from leaks import blob_mappings

pytestmark = pytest.mark.usefixtures("no_leaks")

READER = """
import hashlib, os, socket, sys
from blobplane import channel
def mappings():
    with open("/proc/self/maps") as maps:
        return sum("/memfd:blobplane" in line for line in maps)
with channel.from_socket(socket.socket(fileno=int(sys.argv[1])), timeout=30) as ch:
    with ch.recv_blob() as read, read.as_slice() as view:
        print(hashlib.sha256(view).hexdigest(), len(view), mappings())
    print(mappings())  # the huge pages' mapping went with the read
"""


def payload(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + bytes(size % 251)


def in_huge_pages(fd: int) -> bool:
    return os.fstat(fd).st_blksize > mmap.PAGESIZE


def test_a_blob_in_reserved_huge_pages_reaches_another_process_whole(
    reserved_huge_pages: int,
) -> None:
    page = reserved_huge_pages
    data = payload(page + page // 2)  # not a whole number of huge pages
    free = reserved().free
    with SharedMemoryBlobs(BlobBackend.MEMFD, reserved_huge_pages=True) as blobs:
        blob = blobs.create(len(data))
        assert in_huge_pages(blob.fileno())
        assert os.fstat(blob.fileno()).st_size == 2 * page  # whole huge pages
        assert reserved().free == free - 2
        with blob.buffer as view:
            assert len(view) == len(data)  # the blob's size, not the file's
        blob.write_all(data)
        blob.seal()  # the producer's whole mapping went: the kernel takes F_SEAL_WRITE
        assert fcntl.fcntl(blob.fileno(), fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with channel.from_socket(ours, timeout=30) as ch:
            ch.send_blob(blob, wait=False)
            with theirs:
                lines = run_python(
                    READER, str(theirs.fileno()), pass_fds=(theirs.fileno(),)
                ).stdout.split("\n")
            assert lines[0] == f"{hashlib.sha256(data).hexdigest()} {len(data)} 1"
            assert lines[1] == "0"
            ch.recv()  # its Ack
        with blobs.map_read(blob.token, blob.descriptor) as read, read.as_slice() as view:
            assert view == data
        blobs.cleanup(blob.token)
    assert reserved().free == free


def test_without_enough_free_reserved_pages_a_blob_takes_the_usual_ones(
    reserved_huge_pages: int,
) -> None:
    page = reserved_huge_pages
    with SharedMemoryBlobs(BlobBackend.MEMFD, reserved_huge_pages=True) as blobs:
        with blobs.create((reserved().free + 1) * page) as too_large:
            assert not in_huge_pages(too_large.fileno())
        with blobs.create(page - 1) as under_one_page:
            assert not in_huge_pages(under_one_page.fileno())
        with blobs.create(page) as one_page:
            assert in_huge_pages(one_page.fileno())


def test_reserved_huge_pages_are_for_memfd_blobs() -> None:
    with pytest.raises(NotImplementedError, match="memfd"):
        SharedMemoryBlobs(BlobBackend.TEMP_FILE, reserved_huge_pages=True)


def test_the_broker_takes_a_blob_of_whole_huge_pages(reserved_huge_pages: int) -> None:
    page = reserved_huge_pages
    whole, part = payload(page), payload(page + 1)
    with (
        SharedMemoryBlobs(BlobBackend.MEMFD, reserved_huge_pages=True) as blobs,
        running_broker() as broker,
        connect_broker(broker.socket_path) as client,
    ):
        for data, key in ((whole, "whole"), (part, "part")):
            with blobs.create(len(data)) as blob:
                blob.write_all(data)
                blob.seal()
                if data is part:
                    with pytest.raises(InvalidSize, match="exactly"):
                        client.put(blob, key=key)
                    continue
                client.put(blob, key=key)
        with client.get("whole") as read, read.as_slice() as view:
            assert view == whole
        client.delete("whole")


def test_a_file_of_huge_pages_from_a_peer_is_unmapped_whole(reserved_huge_pages: int) -> None:
    """A sealed hugetlb memfd handed over as 4 KiB: mapped and unmapped in whole huge pages,
    so that nothing of it stays mapped once the read is closed (munmap refuses a part)."""
    page = reserved_huge_pages
    fd = os.memfd_create("blobplane-huge", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | 0x0004)
    try:
        os.ftruncate(fd, page)
        os.posix_fallocate(fd, 0, page)
        with mmap.mmap(fd, page) as writable:  # hugetlbfs has no write(2)
            writable[:4] = b"huge"
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        left, right = channel.socketpair()
        with left, right:
            before = blob_mappings()
            for _ in range(3):
                left.send(BlobHandoff(token=BlobToken(BlobId.new(), 4096)), (fd,))
                with right.recv_blob() as read, read.as_slice() as view:
                    assert bytes(view[:4]) == b"huge"
                    assert len(view) == 4096
                    assert blob_mappings() == before + 1
                assert blob_mappings() == before
    finally:
        os.close(fd)
