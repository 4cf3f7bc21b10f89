"""Objects through the broker: put_object in one process, get_object in another."""

from __future__ import annotations

import asyncio
import gc
import json

import numpy as np
import pandas as pd
import pytest

from blobplane import BlobPool
from blobplane.client import connect_broker, connect_broker_async
from brokers import running_broker, spawn, wait_until

pytestmark = pytest.mark.usefixtures("no_leaks")

READER = """
import json, sys
from blobplane.client import connect_broker
with connect_broker(sys.argv[1]) as client:
    obj = client.get_object(sys.argv[2], timeout=20, restricted=True)
    print(json.dumps({
        "sum": int(obj["array"].sum()),
        "writeable": bool(obj["array"].flags.writeable),
        "frame": int(obj["frame"]["x"].sum()),
        "refs_while_held": client.stats().references,
    }), flush=True)
    del obj
    print(json.dumps({"refs_after": client.stats().references}), flush=True)
"""


def _payload() -> dict[str, object]:
    return {"array": np.arange(1_000_000), "frame": pd.DataFrame({"x": np.arange(100_000)})}


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
def test_put_object_then_get_object_in_another_process(pooled: bool) -> None:
    with (
        running_broker() as broker,
        connect_broker(broker.socket_path) as client,
        BlobPool(slot_size=16 << 20, slots=1) as pool,
    ):
        client.put_object(_payload(), key="weights", pool=pool if pooled else None)
        reader = spawn(READER, broker.socket_path, "weights")
        out, _ = reader.communicate(timeout=30)
        assert reader.returncode == 0, out
        held, after = (json.loads(line) for line in out.splitlines())
        assert held["sum"] == int(np.arange(1_000_000).sum())
        assert held["frame"] == int(np.arange(100_000).sum())
        assert held["writeable"] is False
        assert held["refs_while_held"] >= 1
        assert after["refs_after"] == held["refs_while_held"] - 1
        client.delete("weights")
        if pooled:
            wait_until(lambda: client.pump() >= 0 and pool.free_slots == 1, "slot back")


def test_the_reference_is_released_with_the_last_array() -> None:
    with running_broker() as broker, connect_broker(broker.socket_path) as client:
        client.put_object(np.ones(200_000), key="a")
        array = client.get_object("a")
        assert client.stats().references == 1
        view = array[10:20]
        del array
        gc.collect()
        assert client.stats().references == 1  # the slice still uses the memory
        del view
        gc.collect()
        assert client.stats().references == 0


def test_asyncio_put_and_get_object() -> None:
    async def main() -> None:
        with running_broker() as broker:
            client = await connect_broker_async(broker.socket_path)
            try:
                await client.put_object({"x": np.arange(100_000)}, key="k")
                obj = await client.get_object("k", restricted=True)
                assert int(obj["x"].sum()) == int(np.arange(100_000).sum())
                assert not obj["x"].flags.writeable
                del obj
            finally:
                client.close()

    asyncio.run(main())
