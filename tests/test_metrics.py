"""`blobplane serve --metrics`: a real broker, real requests, its endpoint scraped over loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blobplane.broker.metrics import MAX_SCRAPES
from blobplane.broker.server import BrokerConfig, BrokerServer
from blobplane.client import connect_broker
from blobplane.errors import (
    BlobNotFound,
    MemoryLimitExceeded,
    Timeout,
    TokenRefused,
)
from brokers import DEADLINE_S, Broker, broker_folder, run_cli, running_broker, wait_until

pytestmark = pytest.mark.timeout(60)

KIB = 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=DEADLINE_S) as response:
        assert response.status == 200
        text: str = response.read().decode()
    return text


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    return parse(fetch(url))


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled series not seen yet (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of *name* whose labels include *labels*."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker("--metrics", "127.0.0.1:0", "--memory-limit", "1MiB", "--evict") as b:
        yield b


@pytest.fixture
def url(broker: Broker) -> str:
    found = broker.handle.metrics_url
    assert found is not None, broker.handle.ready_line
    assert found.startswith("http://127.0.0.1:")
    return found


def test_the_ready_line_names_the_endpoint_and_every_metric_is_there(url: str) -> None:
    samples = scrape(url)
    names = {name for name, _ in samples}
    assert all(name.startswith("blobplane_") for name in names), sorted(names)
    for gauge in ("blobs", "blob_bytes"):
        for state in ("allocated", "sealed", "deleted"):
            assert (f"blobplane_{gauge}", frozenset({("state", state)})) in samples
    for name in (
        "blobplane_references",
        "blobplane_waiting_gets",
        "blobplane_connections",
        "blobplane_accounts",
        "blobplane_pooled_bytes",
        "blobplane_evictions_total",
        "blobplane_lease_expiries_total",
        "blobplane_tokens_refused_total",
        "blobplane_process_resident_memory_bytes",
    ):
        assert name in names, name
    assert value(samples, "blobplane_memory_limit_bytes") == 1024 * KIB
    assert value(samples, "blobplane_memory_bytes") >= 0
    # Nothing spills yet; the counters are there for whoever scrapes for them.
    assert value(samples, "blobplane_spills_total") == 0
    assert value(samples, "blobplane_restores_total") == 0


def test_requests_refusals_and_gauges_move(broker: Broker, url: str, no_leaks: None) -> None:
    before = scrape(url)
    secret_key = "secret-key-name-\u00e9"
    with connect_broker(broker.socket_path, name="metrics test") as client:
        entry = client.put_bytes(bytes(100 * KIB), key=secret_key)
        with client.get(secret_key):
            held = scrape(url)
            assert value(held, "blobplane_references") >= 1
            assert value(held, "blobplane_blobs", state="sealed") >= 1
            assert value(held, "blobplane_blob_bytes", state="sealed") >= 100 * KIB
            assert value(held, "blobplane_memory_bytes") >= 100 * KIB
            assert value(held, "blobplane_connections") >= 1
        with pytest.raises(BlobNotFound):
            client.get("no-such-key")
        with pytest.raises(Timeout):
            client.get("never-comes", timeout=0.05)  # parked, then timed out by the broker
        with pytest.raises(MemoryLimitExceeded):
            client.put_bytes(bytes(2048 * KIB))  # larger than the whole limit: no eviction helps
        client.delete(entry.blob_id)
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("blobplane_requests_total", op="put") == 2
    assert moved("blobplane_requests_total", op="get") == 3
    assert moved("blobplane_requests_total", op="delete") == 1
    assert moved("blobplane_requests_total", op="stats") == 0
    # Every request handled is in the histogram too, and no faster than 0.
    for op in ("put", "get", "delete", "release"):
        assert value(after, "blobplane_request_duration_seconds_count", op=op) == value(
            after, "blobplane_requests_total", op=op
        )
        assert value(after, "blobplane_request_duration_seconds_sum", op=op) > 0
    assert moved("blobplane_refusals_total", op="get", reason="BlobNotFound") == 1
    assert moved("blobplane_refusals_total", op="get", reason="Timeout") == 1
    assert moved("blobplane_refusals_total", op="put", reason="MemoryLimitExceeded") == 1
    # Keys come from clients: never a label, never in the text at all.
    text = fetch(url)
    assert "secret-key-name" not in text
    assert "never-comes" not in text


def test_evictions_expiries_and_waiting_gets(broker: Broker, url: str, no_leaks: None) -> None:
    before = scrape(url)
    with connect_broker(broker.socket_path) as client:
        first = client.put_bytes(bytes(600 * KIB), key="evicted-first")
        second = client.put_bytes(bytes(600 * KIB), key="evicts-the-first")  # --evict: room made
        assert second.evicted == 1
        client.put_bytes(b"short-lived", key="leased", lease_ms=50)
        wait_until(
            lambda: (
                value(scrape(url), "blobplane_lease_expiries_total")
                > value(before, "blobplane_lease_expiries_total")
            ),
            "the lease's expiry to be counted",
        )
        # A get that waits shows as waiting until the key comes.
        got: list[bytes] = []

        def wait_for_key() -> None:
            with (
                connect_broker(broker.socket_path) as reader,
                reader.get("comes-later", timeout=DEADLINE_S) as mapped,
            ):
                got.append(bytes(mapped.as_slice()))

        waiting = threading.Thread(target=wait_for_key)
        waiting.start()
        try:
            wait_until(
                lambda: value(scrape(url), "blobplane_waiting_gets") == 1, "the get to be parked"
            )
        finally:
            late = client.put_bytes(b"here", key="comes-later")
            waiting.join(DEADLINE_S)
        assert got == [b"here"]
        assert value(scrape(url), "blobplane_waiting_gets") == 0
        for blob in (second, late):
            client.delete(blob.blob_id)
        with pytest.raises(BlobNotFound):
            client.delete(first.blob_id)
    after = scrape(url)
    assert (
        value(after, "blobplane_evictions_total") - value(before, "blobplane_evictions_total") == 1
    )
    assert (
        value(after, "blobplane_lease_expiries_total")
        - value(before, "blobplane_lease_expiries_total")
        == 1
    )


def test_a_refused_token_is_counted(broker: Broker, url: str, no_leaks: None) -> None:
    before = scrape(url)
    with pytest.raises(TokenRefused):
        connect_broker(broker.socket_path, token="not-a-token")
    after = scrape(url)
    assert (
        value(after, "blobplane_tokens_refused_total")
        - value(before, "blobplane_tokens_refused_total")
        == 1
    )
    refused_hellos = total(after, "blobplane_refusals_total", op="hello") - total(
        before, "blobplane_refusals_total", op="hello"
    )
    assert refused_hellos == 1


def test_the_endpoint_stops_with_the_broker(no_leaks: None) -> None:
    """In this process: once `run()` returns, the port is free and its threads are gone."""
    threads_before = set(threading.enumerate())
    scraped: list[Samples] = []
    urls: list[str] = []
    with broker_folder() as folder:
        config = BrokerConfig(socket_path=os.path.join(folder, "b.sock"), metrics=("127.0.0.1", 0))
        server = BrokerServer(config)

        async def scenario() -> None:
            ready = asyncio.Event()
            serving = asyncio.create_task(server.run(lambda _path: ready.set()))
            await asyncio.wait_for(ready.wait(), DEADLINE_S)
            assert server.metrics_url is not None
            urls.append(server.metrics_url)
            # The scrape asks this loop for the gauges: it must not wait on the loop here.
            scraped.append(await asyncio.to_thread(scrape, server.metrics_url))
            server.stop()
            await asyncio.wait_for(serving, DEADLINE_S)

        asyncio.run(scenario())
    assert value(scraped[0], "blobplane_connections") == 0
    assert server.metrics_url is None
    port = int(urls[0].rsplit(":", 1)[1].split("/")[0])
    with socket.create_server(("127.0.0.1", port)):
        pass  # bound again at once: the broker closed its listening socket
    wait_until(lambda: set(threading.enumerate()) <= threads_before, "the HTTP threads to end")
    with pytest.raises(urllib.error.URLError, match="refused"):
        fetch(urls[0])


def test_a_taken_port_is_one_line_and_leaves_no_socket(no_leaks: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken, broker_folder() as folder:
        path = os.path.join(folder, "b.sock")
        status, err = serve("--socket", path, "--metrics", f"127.0.0.1:{taken.getsockname()[1]}")
        assert status == 1, err
        assert err.splitlines()[-1].startswith("error: ")
        assert "Traceback" not in err
        assert not os.path.exists(path)


@pytest.mark.parametrize("address", ["9464", "127.0.0.1", ":9464", "127.0.0.1:99999", "h:p"])
def test_a_malformed_address_is_a_usage_error(address: str) -> None:
    status, err = serve("--socket", "/nonexistent/b.sock", "--metrics", address)
    assert status == 2, err
    assert "HOST:PORT" in err


def serve(*args: str) -> tuple[int, str]:
    """`blobplane serve ARGS` that is expected to stop at once: its status and stderr."""
    result = run_cli("serve", *args)
    return result.returncode, result.stderr.decode()


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_silent_connections_to_the_endpoint_hold_few_threads_and_no_client_waits(
    no_leaks: None,
) -> None:
    with running_broker("--metrics", "127.0.0.1:0") as broker:
        url = broker.handle.metrics_url
        assert url is not None
        before = threads_of(broker.pid)  # no scrape yet: no scrape thread either
        host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
        address = (host, int(port))
        silent = [socket.create_connection(address, timeout=DEADLINE_S) for _ in range(64)]
        try:
            # Past the bound, a connection is closed at once: the last one is, once
            # the server has taken them all in.
            assert silent[-1].recv(1) == b""
            assert threads_of(broker.pid) <= before + MAX_SCRAPES
            with connect_broker(broker.socket_path) as client:
                client.put_bytes(b"served", key="during")
                with client.get("during") as mapped:
                    assert bytes(mapped.as_slice()) == b"served"
                client.delete("during")
        finally:
            for sock in silent:
                sock.close()
        # The silent ones go (closed, or idle past SCRAPE_IDLE_S): scrapes are answered again.
        wait_until(lambda: threads_of(broker.pid) <= before, "the scrape threads to end")
        assert "blobplane_requests_total" in fetch(url)
