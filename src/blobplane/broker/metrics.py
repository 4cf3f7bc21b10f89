"""Prometheus metrics of the broker: `blobplane serve --metrics HOST:PORT`.

Two halves. What the broker *holds* (blobs and bytes by state, references,
waiting gets, connections) is read from the registry when Prometheus scrapes,
so serving requests costs nothing for it. What *happens* (requests, refusals,
evictions, expired leases, spills) is counted by `BrokerMetrics`, which the
server calls at a few points; with metrics off the server holds None and
calls nothing.

The HTTP endpoint is prometheus_client's WSGI app in a small threading
server of the standard library's: each scrape is answered in a thread of its
own, at most `MAX_SCRAPES` at once (a connection past them is closed at
once), and a connection that sends nothing for `SCRAPE_IDLE_S` is dropped,
so that clients that connect and stay silent cannot pin the broker's
threads. The registry is not thread-safe, so a scrape does not read it
there: it asks the broker's event loop for a `Gauges` snapshot and waits for
it (`SCRAPE_WAIT_S` at most; a loop that does not answer in time leaves the
gauges out of that scrape, the counters still come).

Every metric has a fixed, small set of label values: request kinds, error
class names, blob states. Keys, client ids and account names never become
labels: they come from the clients, and each new one would be a new series.
The endpoint has no authentication; it tells whoever reaches it how busy
the broker is and how much memory it holds, so bind it to loopback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

import blobplane.errors
from blobplane.broker.protocol import Request
from blobplane.broker.registry import BlobInfo, BlobState, BrokerStats, EvictReason
from blobplane.errors import BlobError, TokenRefused

__all__ = ["MAX_SCRAPES", "SCRAPE_IDLE_S", "SCRAPE_WAIT_S", "BrokerMetrics", "Gauges"]

NAMESPACE = "blobplane"
# How long a scrape waits for the event loop's snapshot. A loop this late is
# stuck or shutting down; the scrape goes without the gauges rather than hang.
SCRAPE_WAIT_S = 2.0
# Scrapes answered at once; Prometheus makes one per interval.
MAX_SCRAPES = 8
# A connection silent this long is closed (a scrape's request takes microseconds).
SCRAPE_IDLE_S = 5.0
# Handling a request takes microseconds; a create that allocates a large memfd
# takes milliseconds. (Parked gets count their handling, not their wait.)
LATENCY_BUCKETS = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
)
# Refusal reasons are error class names; anything else is folded into "other",
# so that the label stays bounded whatever raises.
_REASONS = frozenset(
    name
    for name, value in vars(blobplane.errors).items()
    if isinstance(value, type) and issubclass(value, BlobError)
)


@dataclass(frozen=True, slots=True)
class Gauges:
    """What a scrape reports of the broker's state, read on its event loop."""

    stats: BrokerStats
    blobs_by_state: dict[BlobState, int]
    bytes_by_state: dict[BlobState, int]
    connections: int
    waiting_gets: int

    @classmethod
    def read(
        cls, stats: BrokerStats, blobs: Iterable[BlobInfo], *, connections: int, waiting_gets: int
    ) -> Gauges:
        """From the registry's `stats()` and `list(include_deleted=True)`, and the server's."""
        count = dict.fromkeys(BlobState, 0)
        charged = dict.fromkeys(BlobState, 0)
        for info in blobs:
            count[info.state] += 1
            charged[info.state] += info.charge
        return cls(stats, count, charged, connections, waiting_gets)


class _QuietHandler(WSGIRequestHandler):
    # A connection that sends nothing for this long gives its thread back.
    timeout = SCRAPE_IDLE_S

    def log_message(self, format: str, *args: object) -> None:
        pass  # the broker logs its own events; a scrape is not one


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per scrape, `MAX_SCRAPES` at most: a connection past them is closed."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper that went silent (SCRAPE_IDLE_S) or hung up is its own affair;
        # anything else is a bug, printed as the standard library does.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class BrokerMetrics:
    """The broker's metrics, in a `CollectorRegistry` of their own.

    *read* returns the broker's `Gauges`; it is called on the event loop that
    called `start()`, once per scrape.
    """

    def __init__(self, read: Callable[[], Gauges]) -> None:
        self.registry = CollectorRegistry()
        self._state = _StateCollector(self._read_on_loop)
        self.registry.register(self._state)
        ProcessCollector(namespace=NAMESPACE, registry=self.registry)
        self._read = read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, text, labels, namespace=NAMESPACE, registry=self.registry)

        self._requests = counter("requests", "Requests handled, by kind.", ("op",))
        self._latency = Histogram(
            "request_duration_seconds",
            "Time the broker spent handling a request (not a get's wait), by kind.",
            ("op",),
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self._refusals = counter(
            "refusals",
            "Requests refused, by kind and error class (op=connect: connections turned away).",
            ("op", "reason"),
        )
        self._tokens_refused = counter(
            "tokens_refused", "Tokens refused: invalid, expired or revoked, at the hello or later."
        )
        self._evictions = counter("evictions", "Idle blobs evicted to make room (--evict).")
        self._lease_expiries = counter("lease_expiries", "Blobs withdrawn as their lease ran out.")
        self._spills = counter("spills", "Blobs spilled to disk to make room.")
        self._restores = counter("restores", "Spilled blobs read back into memory.")
        # The labelled children of each request kind, bound once: a request then
        # costs one dict lookup, not two label lookups under their locks.
        self._by_kind: dict[type[Request], tuple[Counter, Histogram]] = {}

    # -- the HTTP endpoint ------------------------------------------------------------------

    def start(self, host: str, port: int) -> None:
        """Serve /metrics on *host*:*port* (0: any free port) from a thread; call on the loop."""
        self._loop = asyncio.get_running_loop()
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_Server", (_BoundedServer,), {"address_family": family})
        server: WSGIServer = make_server(
            host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler
        )
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    async def stop(self) -> None:
        """Stop serving and close the listening socket (its port is free once this returns)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        # shutdown() waits for the server's loop to notice (it polls every 0.5 s):
        # in a thread, so that the broker's clients are not kept waiting meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, server.shutdown)
        server.server_close()
        thread.join()

    @property
    def url(self) -> str | None:
        """Where the endpoint listens (its real port), once started."""
        if self._server is None:
            return None
        host, port = self._server.socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    # -- what the server calls --------------------------------------------------------------

    def handled(self, request: Request, started: float) -> None:
        """*request* was handled; *started* is its `time.perf_counter()` on arrival."""
        elapsed = time.perf_counter() - started
        kind = type(request)
        bound = self._by_kind.get(kind)
        if bound is None:
            op = _op(request)
            bound = self._by_kind[kind] = (self._requests.labels(op), self._latency.labels(op))
        bound[0].inc()
        bound[1].observe(elapsed)

    def refused(self, request: Request | None, error: BlobError) -> None:
        """*request* (None: a new connection) was refused with *error*."""
        reason = type(error).__name__
        op = "connect" if request is None else _op(request)
        self._refusals.labels(op, reason if reason in _REASONS else "other").inc()
        if isinstance(error, TokenRefused):
            self._tokens_refused.inc()

    def withdrawn(self, reason: EvictReason) -> None:
        """The registry withdrew a blob on its own (an `Evicted` action)."""
        if reason is EvictReason.MEMORY:
            self._evictions.inc()
        elif reason is EvictReason.LEASE_EXPIRED:
            self._lease_expiries.inc()

    def spilled(self) -> None:
        """A blob was moved out of memory to disk."""
        self._spills.inc()

    def restored(self) -> None:
        """A spilled blob was read back into memory."""
        self._restores.inc()

    # -- scrapes ----------------------------------------------------------------------------

    def _read_on_loop(self) -> Gauges | None:
        """The broker's gauges, read on its event loop; None if it does not answer in time."""
        loop = self._loop
        if loop is None:
            return None
        answer: concurrent.futures.Future[Gauges] = concurrent.futures.Future()

        def read() -> None:
            if answer.set_running_or_notify_cancel():
                try:
                    answer.set_result(self._read())
                except Exception as exc:
                    answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(read)
        except RuntimeError:  # the loop is closed: the broker has stopped
            return None
        try:
            return answer.result(timeout=SCRAPE_WAIT_S)
        except TimeoutError:
            answer.cancel()
            return None


class _StateCollector(Collector):
    """The gauges, built at each scrape from a fresh `Gauges`."""

    def __init__(self, read: Callable[[], Gauges | None]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        # Names only, for the registry's check of duplicates: no need to ask the loop.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        gauges = self._read()
        if gauges is None:
            return []
        return list(self._families(gauges))

    @staticmethod
    def _families(gauges: Gauges | None = None) -> Iterator[GaugeMetricFamily]:
        def family(name: str, text: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NAMESPACE}_{name}", text, labels=labels)

        blobs = family("blobs", "Blobs the broker holds, by state.", ("state",))
        blob_bytes = family(
            "blob_bytes", "Bytes of the blobs the broker holds, by state.", ("state",)
        )
        pooled = family("pooled_blobs", "Published pool slots (counted in blobplane_blobs).")
        pooled_bytes = family("pooled_bytes", "Bytes of published pool slots.")
        memory = family("memory_bytes", "Bytes counted against the memory limit.")
        limit = family("memory_limit_bytes", "The broker's memory limit (absent: none).")
        references = family("references", "References held by readers.")
        waiting = family("waiting_gets", "Gets parked until a blob appears or is sealed.")
        connections = family("connections", "Client connections open.")
        accounts = family(
            "accounts", "Accounts (a token's, or a client's without one) with clients or blobs."
        )
        if gauges is not None:
            stats = gauges.stats
            for state in BlobState:
                blobs.add_metric([state.value], gauges.blobs_by_state.get(state, 0))
                blob_bytes.add_metric([state.value], gauges.bytes_by_state.get(state, 0))
            pooled.add_metric([], stats.pooled)
            pooled_bytes.add_metric([], stats.pooled_bytes)
            memory.add_metric([], stats.bytes)
            if stats.memory_limit is not None:
                limit.add_metric([], stats.memory_limit)
            references.add_metric([], stats.references)
            waiting.add_metric([], gauges.waiting_gets)
            connections.add_metric([], gauges.connections)
            accounts.add_metric([], len(stats.accounts))
        yield from (blobs, blob_bytes, pooled, pooled_bytes, memory, limit, references, waiting)
        yield from (connections, accounts)


def _op(request: Request) -> str:
    # The name the broker's log uses (event=request.refused op=...).
    return type(request).__name__.lower()
