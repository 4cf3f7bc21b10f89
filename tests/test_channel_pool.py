"""Pool slots over a plain channel: mapped once by the receiver, given back on release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from blobplane import BlobPool, channel
from blobplane.errors import ConnectionClosed, Timeout
from blobplane.wire import Ack
from children import CHILD_TIMEOUT_S

pytestmark = pytest.mark.usefixtures("no_leaks")

RECEIVER = """
import json, os, sys
from blobplane import channel
sys.path.insert(0, sys.argv[3])
from leaks import blob_mappings
count, hold = int(sys.argv[2]), sys.argv[4] == "hold"
fds, maps, seqs = [], [], []
held = []
with channel.connect(sys.argv[1], timeout=30) as ch:
    for number in range(count):
        handoff = ch.recv_handoff()
        seqs.append(int.from_bytes(handoff.blob.as_slice()[:8], "little"))
        if hold:
            held.append(handoff)
        else:
            handoff.blob.close()
        if number in (9, count - 1):
            fds.append(len(os.listdir("/proc/self/fd")))
            maps.append(blob_mappings())
    ch.recv(timeout=30)  # the sender's goodbye
print(json.dumps({"seqs": seqs, "fds": fds, "maps": maps}))
"""


@pytest.fixture
def listener() -> Iterator[channel.Listener]:
    with (
        tempfile.TemporaryDirectory() as folder,
        channel.listen(os.path.join(folder, "private", "pool.sock")) as listening,
    ):
        yield listening


def _receiver(path: str, count: int, mode: str = "release") -> subprocess.Popen[str]:
    tests = os.path.dirname(__file__)
    return subprocess.Popen(
        [sys.executable, "-c", RECEIVER, path, str(count), tests, mode],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_thousands_of_pooled_handoffs_reuse_one_mapping_per_slot(
    listener: channel.Listener,
) -> None:
    count = 2000
    child = _receiver(listener.path, count)
    with BlobPool(slot_size=64 * 1024, slots=4) as pool, listener.accept() as ch:
        for seq in range(count):
            with ch.loan(pool, timeout=CHILD_TIMEOUT_S) as loan:
                loan.write_all(seq.to_bytes(8, "little"))
                loan.set_length(4096 + seq % 100)
                ch.send_blob(loan, wait=False)
        while pool.free_slots < 4:
            message, _ = ch.recv(timeout=CHILD_TIMEOUT_S)
            assert isinstance(message, Ack)
        ch.send(b"bye")
        out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    summary = json.loads(out)
    assert summary["seqs"] == list(range(count))
    assert summary["fds"][0] == summary["fds"][1]  # no fd kept per frame
    assert summary["maps"][0] == summary["maps"][1] == 4  # one mapping per slot


def test_a_slot_stays_out_of_the_pool_until_the_receiver_releases_it(
    listener: channel.Listener,
) -> None:
    child = _receiver(listener.path, 2, "hold")
    with BlobPool(slot_size=4096, slots=2) as pool, listener.accept() as ch:
        for seq in range(2):
            with ch.loan(pool, timeout=CHILD_TIMEOUT_S) as loan:
                loan.write_all(seq.to_bytes(8, "little"))
                ch.send_blob(loan, wait=False)
        assert pool.free_slots == 0
        with pytest.raises(Timeout):
            ch.loan(pool, timeout=0.2)
        ch.send(b"bye")
        out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
        # The receiver exited holding both: its end of the channel closed, so
        # the slots are ours again.
        with pytest.raises(ConnectionClosed):
            ch.recv(timeout=CHILD_TIMEOUT_S)
        assert pool.free_slots == 2
    assert json.loads(out)["seqs"] == [0, 1]


def test_send_blob_waits_for_the_release_of_a_slot(listener: channel.Listener) -> None:
    child = _receiver(listener.path, 3)
    with BlobPool(slot_size=4096, slots=1) as pool, listener.accept() as ch:
        for seq in range(3):
            with pool.loan(timeout=0) as loan:  # free again: the last send waited
                loan.write_all(seq.to_bytes(8, "little"))
                ch.send_blob(loan)
                assert pool.holders(loan.slot) == 0
        ch.send(b"bye")
        out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert json.loads(out)["seqs"] == [0, 1, 2]
