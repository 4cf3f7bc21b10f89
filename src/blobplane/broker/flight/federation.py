"""Federation: a get by key that misses here is fetched from the peer broker that holds it.

Theory of operation
-------------------

`blobplane serve --peer grpc://HOST:PORT` (repeatable) names other brokers.
When a local get names a key this broker does not hold, the server asks
`Federation.on_miss`, which starts one fetch for the key (or joins the one
under way) and has the get parked on the key like a get that waits for a
publication. The fetch runs in the broker's loop, its blocking parts in a
small pool of threads:

1. The peers are asked in rendezvous order (the highest hash of peer and key
   first: the key's *home*), then the others, until one has the key: one
   call (the "get" action), whose answer says the blob's size and, for a
   blob of at most 1 MiB, holds its bytes. That blob goes into a sealed memfd
   at once and is published as in 3. A peer that says it has no such key is
   passed over; one that cannot be reached, refuses, or does not answer
   within ``--peer-timeout`` is noted and passed over too.
2. A larger blob comes as a DoGet stream. The copy is placed in the
   registry under the key, unsealed, as a blob of the ``peer-cache`` account:
   the key is taken (a local put of it is refused meanwhile), its bytes count
   against the memory limit from now on, and the gets parked on the key now
   wait for this blob's seal, like gets of a blob a client is filling. A
   memfd of that size is made and filled as the chunks come (`Filling`:
   each chunk written through the fd, where it belongs).
3. Complete, it is sealed, published with a lease of ``--cache-ttl`` (or
   what is left of the original's lease, if that is shorter), and
   the parked gets are answered with an fd of it, exactly as for a blob put
   here. The client API does not change.

Whatever goes wrong after the copy was placed (the peer dies, stalls for
``--peer-timeout``, sends more or less than it declared, or the broker stops)
withdraws the unsealed copy: its memory and fd go at once, and the parked
gets are refused with the fetch's error (`PeerUnreachable` mostly), never
handed half a blob. When every peer said it has no such key, the gets go on
as without peers: `BlobNotFound` at once, or, for a get with a timeout, a
wait for a local publication.

A copy is a cache: evictable whenever memory is short (with or without
``--evict``), dropped when its lease runs out, and never written back. A
get by id never leaves this broker (ids are per broker), and neither does
anything but a get: deletes, leases, references and tokens stay where they
are. A get from a peer is answered from local blobs only, so brokers that
name each other as peers never fetch in circles.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from blobplane.backends.mapping import physical_memory
from blobplane.broker import memory
from blobplane.broker.flight.address import FlightAddress
from blobplane.broker.flight.arrow import keep_transfer_buffers
from blobplane.broker.flight.client import FlightBlobClient, RemoteBlob
from blobplane.broker.flight.config import FlightConfig
from blobplane.broker.flight.filling import (
    MIN_PROGRESS_BYTES,
    Filling,
    RangeWriter,
    allocate_unfilled,
    stalled,
)
from blobplane.broker.flight.tickets import StreamInfo
from blobplane.broker.logs import LOGGER, event
from blobplane.broker.protocol import MAX_MILLIS
from blobplane.broker.registry import BlobState, ClientId
from blobplane.broker.rights import Grant, Right
from blobplane.errors import (
    BlobError,
    BlobNotFound,
    BrokerLimitReached,
    BrokerShutdown,
    InvalidSize,
    KeyInUse,
    PeerUnreachable,
    RemoteProtocolError,
    Timeout,
)
from blobplane.sizes import format_size
from blobplane.types import BlobId

if TYPE_CHECKING:
    from blobplane.broker.server import BrokerServer

__all__ = ["CACHE_ACCOUNT", "Federation", "rendezvous"]

CACHE_ACCOUNT = "peer-cache"
# Fetches of distinct keys under way at once; more misses are refused (BrokerLimitReached)
# rather than queued without bound.
MAX_FETCHES = 64
# Threads that ask peers (and take small blobs whole: at most `INLINE_GET_BYTES` each, not
# accounted until placed), and threads that move the bytes of larger ones: apart, so that
# long transfers never keep an ask waiting past the peer timeout. Fetches beyond them wait
# their turn.
OPEN_THREADS = 8
MOVE_THREADS = 8
# A peer that takes its time to answer holds at most this many opening threads (a thread
# waits until its call's deadline, even after the get gave up): the others stay free for
# the other peers.
MAX_ASKS_PER_PEER = OPEN_THREADS // 2
# A token this broker mints for its peers lives this long, and is replaced at half of it.
PEER_TOKEN_TTL_S = 3600.0


def rendezvous(key: str, peers: tuple[FlightAddress, ...]) -> list[FlightAddress]:
    """The peers in the order to ask for *key*: its home (highest hash of peer and key) first.

    Every broker given the same peer list computes the same order, and adding
    or removing a peer moves only the keys whose home it is.
    """

    def score(peer: FlightAddress) -> bytes:
        return hashlib.blake2b(f"{peer.url}\0{key}".encode(), digest_size=8).digest()

    return sorted(peers, key=score, reverse=True)


class _Fetch:
    """One key being fetched: the copy's registry client once it is placed, the open stream."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.client: ClientId | None = None
        self.stream: RemoteBlob | None = None
        self.stalled = False
        self.home_deadline: float | None = None  # see `_Opened`


class _Opened:
    """What a peer answered: a small blob's bytes already in a sealed memfd (*fd*), or a
    larger one's stream."""

    def __init__(self, info: StreamInfo, stream: RemoteBlob | None, fd: int | None) -> None:
        self.info = info
        self.stream = stream
        self.fd = fd
        # When the original's lease runs out (this host's monotonic clock), counted from the
        # answer's arrival: the copy lasts no longer.
        left = info.lease_left_ms
        self.home_deadline = None if left is None else time.monotonic() + left / 1000

    def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class Federation:
    """This broker's peers and the fetches under way; every method runs in the broker's loop."""

    def __init__(
        self, server: BrokerServer, config: FlightConfig, own: FlightAddress | None
    ) -> None:
        keep_transfer_buffers()
        self.server = server
        self.config = config
        own_spot = None if own is None else (own.host, own.port)
        self.peers = tuple(p for p in config.peers if (p.host, p.port) != own_spot)
        self._openers = ThreadPoolExecutor(OPEN_THREADS, thread_name_prefix="blobplane-open")
        self._movers = ThreadPoolExecutor(MOVE_THREADS, thread_name_prefix="blobplane-fetch")
        self._fetches: dict[str, _Fetch] = {}
        # Opening threads each peer occupies (see MAX_ASKS_PER_PEER).
        self._asking: dict[FlightAddress, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # A fetch's outcome while its gets are woken to take it in (see `on_miss`).
        self._settled: dict[str, BlobError | None] = {}
        self._clients: dict[FlightAddress, FlightBlobClient] = {}
        self._clients_lock = threading.Lock()
        self._token: str | None = config.peer_token
        self._token_made = 0.0
        self._grant = Grant(account=CACHE_ACCOUNT)
        self.fetched = 0

    # -- the server's get -------------------------------------------------------------------

    def on_miss(self, key: str, *, waits: bool, woken: bool) -> bool:
        """A get of *key* found nothing here. True: park it on the key, a fetch will wake it.

        Raises the error of a fetch that just failed (to the gets it woke), and
        `BlobNotFound` for a get that does not wait when no peer has the key.
        False: go on as without peers (wait for a local publication).
        """
        if key in self._settled:
            outcome = self._settled[key]
            if outcome is not None:
                raise type(outcome)(str(outcome))
            if not waits:
                raise BlobNotFound(
                    f"no blob has the key {key!r}, here or at any of the {len(self.peers)} "
                    "peers of this broker"
                )
            return False
        if woken or not self.peers:
            return False
        if key in self._fetches:
            return True
        if len(self._fetches) >= MAX_FETCHES:
            raise BrokerLimitReached(
                f"{len(self._fetches)} keys are being fetched from peers already; try again "
                "once some have arrived"
            )
        fetch = self._fetches[key] = _Fetch(key)
        task = asyncio.get_running_loop().create_task(self._run(fetch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def stop(self) -> None:
        """Cancel every fetch (its gets are refused with `BrokerShutdown`) and the threads."""
        for task in list(self._tasks):
            task.cancel()
        for fetch in list(self._fetches.values()):
            if fetch.stream is not None:
                fetch.stream.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._openers.shutdown(wait=False, cancel_futures=True)
        self._movers.shutdown(wait=False, cancel_futures=True)

    # -- one fetch --------------------------------------------------------------------------

    async def _run(self, fetch: _Fetch) -> None:
        key = fetch.key
        outcome: BlobError | None = None
        found = False
        started = time.monotonic()
        try:
            found = await self._from_peers(fetch)
        except asyncio.CancelledError:
            outcome = BrokerShutdown(
                f"the broker is shutting down; the fetch of {key!r} from its peers was dropped"
            )
            raise
        except BlobError as exc:
            outcome = exc
        except Exception as exc:  # a bug of ours: the gets learn of it, the broker goes on
            LOGGER.error("event=peer.internal_error key=%r", key, exc_info=exc)
            outcome = PeerUnreachable(f"the fetch of {key!r} failed: {type(exc).__name__}")
        finally:
            if fetch.stream is not None:
                fetch.stream.cancel()
            del self._fetches[key]
            if outcome is not None:
                event(
                    "peer.fetch_failed",
                    logging.WARNING,
                    key=key,
                    error=type(outcome).__name__,
                    reason=outcome,
                    seconds=round(time.monotonic() - started, 3),
                )
            self._settle(fetch, None if found else outcome, found)

    def _settle(self, fetch: _Fetch, outcome: BlobError | None, found: bool) -> None:
        """Wake the fetch's gets; unless it *found* the key, with its *outcome* in place
        (None: no peer has the key), which `on_miss` tells them."""
        key = fetch.key
        if not found:
            self._settled[key] = outcome
        try:
            if fetch.client is not None:
                # A copy still unsealed is withdrawn; the gets parked on it wake to the error.
                self._disconnect(fetch.client)
                fetch.client = None
            self.server.wake(key)
        finally:
            self._settled.pop(key, None)

    async def _from_peers(self, fetch: _Fetch) -> bool:
        """Fetch from the first peer that has the key; False when none has it."""
        failures: list[str] = []
        for peer in rendezvous(fetch.key, self.peers):
            try:
                opened = await self._open(peer, fetch.key)
            except BlobNotFound:
                continue
            except BlobError as exc:
                failures.append(f"{peer.url}: {exc}")
                continue
            fetch.stream = opened.stream
            fetch.home_deadline = opened.home_deadline
            try:
                if opened.fd is not None:
                    self._place_whole(fetch, peer, opened)
                else:
                    await self._receive(fetch, peer)
            finally:
                opened.close()
            return True
        if failures:
            raise PeerUnreachable(
                f"the key {fetch.key!r} is not here, and not every peer could be asked: "
                + "; ".join(failures)
            )
        return False

    async def _open(self, peer: FlightAddress, key: str) -> _Opened:
        loop = asyncio.get_running_loop()
        token = self._peer_token()
        asking = self._asking.get(peer, 0)
        if asking >= MAX_ASKS_PER_PEER:
            raise PeerUnreachable(
                f"{peer.url} has not answered {asking} asks yet; it is not asked more meanwhile"
            )
        opening = loop.run_in_executor(self._openers, self._open_blocking, peer, key, token)
        self._asking[peer] = asking + 1
        # Counted until the thread is done, whoever stopped waiting for it.
        opening.add_done_callback(lambda _: self._asked(peer))
        try:
            return await asyncio.wait_for(asyncio.shield(opening), self.config.peer_timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            # The open goes on in its thread: whatever stream it brings is ended.
            opening.add_done_callback(_cancel_opened)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise PeerUnreachable(
                f"{peer.url} did not answer within {self.config.peer_timeout} s"
            ) from None

    def _asked(self, peer: FlightAddress) -> None:
        left = self._asking.pop(peer) - 1
        if left:
            self._asking[peer] = left

    def _open_blocking(self, peer: FlightAddress, key: str, token: str | None) -> _Opened:
        """In an opening thread: ask for the blob (`get_inline`, bounded by the peer timeout).
        A small one comes whole and goes into a sealed memfd; a larger one is opened as a
        stream, for a moving thread to read."""
        client = self._client(peer)
        info, data = client.get_inline(key, token=token, timeout=self.config.peer_timeout)
        if info.offset != 0 or info.length != info.size:
            raise RemoteProtocolError(f"{peer.url} sent part of the blob for the whole")
        if data is not None:
            return _Opened(info, None, memory.holding(memoryview(data)))
        # gRPC bounds a DoGet only as a whole, opening included: by the time a transfer
        # takes at the slowest pace the stall rule lets through.
        windows = 1 + info.size / MIN_PROGRESS_BYTES
        stream = client.open(key, token=token, timeout=self.config.peer_timeout * windows)
        if stream.info.offset != 0 or stream.info.length != stream.info.size:
            stream.cancel()
            raise RemoteProtocolError(f"{peer.url} sent part of the blob for the whole")
        return _Opened(stream.info, stream, None)

    def _place_whole(self, fetch: _Fetch, peer: FlightAddress, opened: _Opened) -> None:
        """Publish a small blob that arrived whole (`_open_blocking`): place, seal, done."""
        size = opened.info.size
        # Sealed at once: the gets parked on the key find it when the fetch settles.
        blob_id = self._place(fetch, size, announce=False)
        if blob_id is None:
            return  # a local blob took the key meanwhile
        fd, opened.fd = opened.fd, None
        assert fd is not None
        self.server.fds.add(blob_id, fd)
        self._publish(fetch, blob_id, size, sealed=True)
        self.fetched += 1
        event(
            "peer.fetched",
            logging.DEBUG,
            key=fetch.key,
            peer=peer.url,
            blob=blob_id,
            remote=opened.info.id,
            size=size,
        )

    def _client(self, peer: FlightAddress) -> FlightBlobClient:
        with self._clients_lock:
            client = self._clients.get(peer)
            if client is None:
                client = self._clients[peer] = FlightBlobClient(
                    peer, tls=self.config.tls, insecure=self.config.insecure
                )
            return client

    async def _receive(self, fetch: _Fetch, peer: FlightAddress) -> None:
        stream = fetch.stream
        assert stream is not None
        info = stream.info
        key = fetch.key
        if info.size > physical_memory():
            raise InvalidSize(
                f"{peer.url} offers a blob of {format_size(info.size)} for {key!r}, more than "
                f"this host's {format_size(physical_memory())} of memory"
            )
        blob_id = self._place(fetch, info.size)
        if blob_id is None:
            return  # a local blob took the key meanwhile: the gets take that one
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        name = f"blobplane-broker:{blob_id}"
        fd = await loop.run_in_executor(self._movers, allocate_unfilled, info.size, name)
        if fetch.client is None or not self._still_allocated(blob_id):
            os.close(fd)
            raise PeerUnreachable(f"the copy of {key!r} was withdrawn while it arrived")
        self.server.fds.add(blob_id, fd)
        filling_fd = os.dup(fd)
        watchdog = loop.create_task(self._watch(fetch, stream))
        try:
            await loop.run_in_executor(self._movers, _fill, stream, filling_fd, info.size)
        except BlobError as exc:
            if fetch.stalled:
                raise PeerUnreachable(
                    f"{peer.url} sent less than {format_size(MIN_PROGRESS_BYTES)} in "
                    f"{self.config.peer_timeout} s ({stream.received} of {info.size} bytes of "
                    f"{key!r} had come)"
                ) from None
            if isinstance(exc, PeerUnreachable):
                raise
            if isinstance(exc, Timeout):  # the call's deadline: see `_open_blocking`
                raise PeerUnreachable(
                    f"{peer.url} did not send {key!r} in the time a transfer of "
                    f"{format_size(info.size)} may take at the slowest"
                ) from None
            if isinstance(exc, RemoteProtocolError):
                raise PeerUnreachable(f"{peer.url} broke the protocol: {exc}") from None
            # This broker's own trouble (memory, fds) is said as itself.
            raise
        finally:
            watchdog.cancel()
        self._publish(fetch, blob_id, info.size)
        seconds = time.monotonic() - started
        self.fetched += 1
        event(
            "peer.fetched",
            key=key,
            peer=peer.url,
            blob=blob_id,
            remote=info.id,
            size=info.size,
            seconds=round(seconds, 4),
        )

    def _place(self, fetch: _Fetch, size: int, *, announce: bool = True) -> BlobId | None:
        """Place the copy, unsealed, under the key (accounted from now on); None: key taken."""
        registry = self.server.registry
        if refusal := self.server.fd_refusal("a copy from a peer"):
            raise refusal
        client = self.server.new_client_id()
        registry.connect(client, self._grant)
        try:
            placed = registry.create(client, size, key=fetch.key, cached=True)
        except KeyInUse:
            self._disconnect(client)
            return None
        except BaseException:
            self._disconnect(client)
            raise
        fetch.client = client
        self.server.apply(placed.actions)
        if announce:
            self.server.wake(fetch.key)  # the gets parked on the key now wait for this blob
        return placed.id

    def _publish(self, fetch: _Fetch, blob_id: BlobId, size: int, *, sealed: bool = False) -> None:
        """Seal the copy (unless *sealed* already) and publish it with the cache's lease, or
        what is left of the original's if that is shorter."""
        client = fetch.client
        if client is None or not self._still_allocated(blob_id):
            raise PeerUnreachable(f"the copy of {fetch.key!r} was withdrawn while it arrived")
        registry = self.server.registry
        if not sealed:
            fd = self.server.fds.get(blob_id)
            memory.seal(fd, blob_id, size)
            self.server.fds.replace(blob_id, memory.reopen_readonly(fd))
        self.server.apply(registry.seal(client, blob_id))  # the parked gets are answered
        ttl = self.config.cache_ttl
        if fetch.home_deadline is not None:
            left = fetch.home_deadline - time.monotonic()
            ttl = left if ttl is None else min(ttl, left)
        lease_ms = None if ttl is None else min(MAX_MILLIS, max(1, round(ttl * 1000)))
        registry.renew(client, blob_id, lease_ms)
        fetch.client = None
        self._disconnect(client)  # the copy stays, owned by nobody, in the cache account

    async def _watch(self, fetch: _Fetch, stream: RemoteBlob) -> None:
        """Cancel a stream that brings too little for the peer timeout (`stalled`)."""
        await stalled(lambda: stream.received, self.config.peer_timeout, stream.info.length)
        fetch.stalled = True
        stream.cancel()

    # -- helpers ----------------------------------------------------------------------------

    def _peer_token(self) -> str | None:
        """The token for peers: the configured one, else one minted under this broker's key."""
        if self.config.peer_token is not None:
            return self.config.peer_token
        now = time.monotonic()
        if self._token is None or now - self._token_made > PEER_TOKEN_TTL_S / 2:
            self._token = self.server.authority.mint([Right.GET, Right.LIST], ttl=PEER_TOKEN_TTL_S)
            self._token_made = now
        return self._token

    def _disconnect(self, client: ClientId) -> None:
        if self.server.registry.connected(client):
            self.server.apply(self.server.registry.disconnect(client))

    def _still_allocated(self, blob_id: BlobId) -> bool:
        try:
            return self.server.registry.info(blob_id).state is BlobState.ALLOCATED
        except BlobNotFound:
            return False


def _fill(stream: RemoteBlob, fd: int, size: int) -> None:
    """In a thread: the stream's bytes into the memfd; closes *fd*."""
    try:
        filling = Filling(fd, size)
        out = filling.writer(0, size)
        _write_while_reading(stream.chunks(), out)
        if not out.complete:
            raise PeerUnreachable(f"the stream ended after {out.position} of {size} bytes")
        filling.finish()
    finally:
        os.close(fd)


def _write_while_reading(chunks: Iterator[memoryview], out: RangeWriter) -> None:
    """Append every chunk to *out*, each written (pwrite) while the next is read (gRPC's copy
    into one buffer), so that the two copies run on two CPUs; a view keeps its buffer alive.

    A blob of one chunk, as every small one is, is written here: a thread for it would
    cost more than it saves.
    """
    first = next(chunks, None)
    if first is None:
        return
    following = next(chunks, None)
    if following is None:
        out.append(first)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="blobplane-fill") as writer:
        writing = writer.submit(out.append, first)
        for view in itertools.chain((following,), chunks):
            writing.result()
            writing = writer.submit(out.append, view)
        writing.result()


def _cancel_opened(future: asyncio.Future[_Opened]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
