"""Objects over channels between real processes: send_obj / recv_obj, fresh and pooled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from blobplane import BlobPool, channel
from blobplane.errors import Timeout
from blobplane.objects import recv_obj, send_obj
from blobplane.wire import UserPayload
from children import CHILD_TIMEOUT_S

pytestmark = pytest.mark.usefixtures("no_leaks")

RECEIVER = """
import asyncio, json, sys
from blobplane import channel
from blobplane.objects import recv_obj, recv_obj_async

def in_blob_mapping(array):
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "blobplane" not in line:
                continue
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return True
    return False

def describe(obj):
    return {
        "sum": int(obj["array"].sum()),
        "dtype": str(obj["array"].dtype),
        "shape": list(obj["array"].shape),
        "writeable": bool(obj["array"].flags.writeable),
        "in_blob": in_blob_mapping(obj["array"]),
        "frame_sum": int(obj["frame"]["x"].sum()),
        "text": obj["text"],
    }

path, count, flavour = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if flavour == "sync":
    with channel.connect(path) as ch:
        results = [describe(recv_obj(ch, restricted=True)) for _ in range(count)]
else:
    async def main():
        ch = await channel.aio.connect(path)
        try:
            return [describe(await recv_obj_async(ch, restricted=True)) for _ in range(count)]
        finally:
            ch.close()
    results = asyncio.run(main())
print(json.dumps(results))
"""


@pytest.fixture
def listener() -> Iterator[channel.Listener]:
    with (
        tempfile.TemporaryDirectory() as folder,
        channel.listen(os.path.join(folder, "private", "objects.sock")) as listening,
    ):
        yield listening


def _payload(seed: int) -> dict[str, object]:
    return {
        "array": np.arange(seed, seed + 300_000, dtype=np.int64).reshape(600, 500),
        "frame": pd.DataFrame({"x": np.full(100_000, seed)}),
        "text": f"object {seed}",
    }


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
def test_objects_cross_processes_zero_copy(
    listener: channel.Listener, flavour: str, pooled: bool
) -> None:
    count = 6
    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, listener.path, str(count), flavour],
        stdout=subprocess.PIPE,
        text=True,
    )
    with BlobPool(slot_size=8 << 20, slots=2) as pool, listener.accept() as ch:
        for seed in range(count):
            send_obj(ch, _payload(seed), pool=pool if pooled else None)
        out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0
    results = json.loads(out)
    for seed, result in enumerate(results):
        expected = _payload(seed)
        array = expected["array"]
        assert isinstance(array, np.ndarray)
        assert result == {
            "sum": int(array.sum()),
            "dtype": "int64",
            "shape": [600, 500],
            "writeable": False,
            "in_blob": True,
            "frame_sum": seed * 100_000,
            "text": f"object {seed}",
        }


HOLDER = """
import sys
from blobplane import channel
from blobplane.objects import recv_obj
with channel.connect(sys.argv[1]) as ch:
    first = recv_obj(ch)
    second = recv_obj(ch)
    print("holding", flush=True)
    sys.stdin.readline()
    del first  # the array dies: its slot goes back
    print("dropped", int(second.sum()), flush=True)
    sys.stdin.readline()
"""


def test_a_pooled_object_keeps_its_slot_until_it_is_collected(
    listener: channel.Listener,
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, listener.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    with BlobPool(slot_size=1 << 20, slots=2) as pool, listener.accept() as ch:
        send_obj(ch, np.ones(100_000), pool=pool)
        send_obj(ch, np.ones(100_000), pool=pool)
        assert child.stdout.readline().strip() == "holding"
        with pytest.raises(Timeout):
            ch.loan(pool, timeout=0.2)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["dropped", "100000"]
        with ch.loan(pool, timeout=CHILD_TIMEOUT_S) as loan:
            assert loan.slot in (0, 1)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=CHILD_TIMEOUT_S) == 0
    child.stdin.close()
    child.stdout.close()


def test_a_small_object_rides_inside_the_message_and_a_large_one_in_a_memfd() -> None:
    ours, theirs = channel.socketpair(timeout=CHILD_TIMEOUT_S)
    with ours, theirs:
        small = {"frame": 7, "labels": ["a", "b"], "scores": np.arange(16.0)}
        send_obj(ours, small)
        message, fds = theirs.recv()
        assert isinstance(message, UserPayload)
        assert fds == ()
        assert len(message.data) <= ours.payload_limit
        # What came is the packed object: a receiver's recv_obj rebuilds it.
        send_obj(ours, small)
        got = recv_obj(theirs)
        assert got["labels"] == ["a", "b"]
        np.testing.assert_array_equal(got["scores"], small["scores"])
        big = np.arange(1 << 17, dtype=np.float64)  # 1 MiB: out of the message
        sender = threading.Thread(target=send_obj, args=(ours, big))
        sender.start()
        handoff = theirs.recv_handoff()
        sender.join(CHILD_TIMEOUT_S)
        with handoff:
            assert len(handoff.blob) > big.nbytes
