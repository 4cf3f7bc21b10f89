"""`blobplane serve`: the broker daemon, an asyncio server around the pure `BlobRegistry`.

Theory of operation
-------------------

One event loop owns everything: the listening socket, one callback reader
(`AsyncChannel.read_forever`) and one task per connection (`Session`), the
registry, the broker's fd of every blob (`memory.FdTable`), the gets that
wait, and one timer for the next lease. A request is handled synchronously
from decoding to the registry call and the replies it posts, so the registry
is never seen half-changed: the reader's callback carries it out as it
arrives. The only await inside a request is the allocation of a large memfd,
which runs in a thread. A reply goes out as soon as it is posted if the socket
takes it; whatever had to wait is flushed by the connection's task after the
request, the reader paused meanwhile (a client that does not read its replies
stops being read). The registry's actions are carried out at once, in order:
`FreeBlob` closes the broker's fd, `WakeWaiters` re-runs the parked gets,
`NotifyProducer` posts a `SlotFree` to the producer's session, `Evicted` is
logged.

Isolation: whatever one connection sends costs only that connection. A
malformed frame or request, the wrong number of fds, or an unknown request
ends it (with a `Refused` for rid 0 when the channel still works); a request
the registry or the fd checks refuse gets a `Refused` and the connection
carries on. Every fd that arrives is closed or owned by the fd table before
the request ends; every fd sent is a duplicate that the session closes after
sending, so freeing a blob never pulls an fd from under a reply in flight.

A connection's end, for any reason (SIGKILL included: the kernel closes the
socket), unparks its gets and calls `registry.disconnect`: its references
are released and the blobs it never sealed are freed. Every client it handed
pool slots to is told (`ProducerGone`), as those keep the slots mapped.

Shutdown (SIGINT, SIGTERM): stop accepting and remove the socket file,
refuse every parked get with `BrokerShutdown`, let requests being handled
finish (up to a grace period), tell every client with a `Refused` for rid 0,
close everything. The memfds die with their last fd.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blobplane.backends.mapping import physical_memory
from blobplane.backends.memlimit import memory_ceiling
from blobplane.backends.private_dir import ensure_private_dir
from blobplane.broker import memory
from blobplane.broker.address import key_path_for
from blobplane.broker.logs import LOGGER, event
from blobplane.broker.protocol import (
    MAX_ACCOUNTS_LISTED,
    MAX_INLINE_PUT,
    MAX_LIST_PART_BYTES,
    MAX_TEXT,
    PROTOCOL_VERSION,
    AccountEntry,
    BlobEntry,
    BlobReply,
    Create,
    Delete,
    Get,
    Hello,
    List,
    ListReply,
    MintToken,
    Ok,
    ProducerGone,
    Put,
    Refused,
    Release,
    Renew,
    Request,
    Seal,
    SlotFree,
    Stats,
    StatsEntry,
    StatsReply,
    TokenReply,
    Welcome,
    decode_request,
    encode,
    fds_expected,
    target_of,
)
from blobplane.broker.registry import (
    Action,
    BlobInfo,
    BlobRegistry,
    BlobState,
    ClientId,
    Evicted,
    EvictReason,
    FreeBlob,
    NotifyProducer,
    Pending,
    Restore,
    Spill,
    WakeWaiters,
)
from blobplane.broker.rights import Grant
from blobplane.broker.session import Session, Waiter
from blobplane.broker.spill import SpillDir
from blobplane.broker.tokens import TokenAuthority
from blobplane.channel import aio
from blobplane.errors import (
    BlobBusy,
    BlobClosed,
    BlobDeleted,
    BlobError,
    BlobLost,
    BlobNotFound,
    BrokenResource,
    BrokerLimitReached,
    BrokerShutdown,
    ConnectionClosed,
    InvalidSize,
    ProtocolError,
    RemoteProtocolError,
    RightMissing,
    Timeout,
    TokenRefused,
)
from blobplane.fds import close_fds
from blobplane.sizes import format_size
from blobplane.types import BlobId
from blobplane.wire import Message, UserPayload

if TYPE_CHECKING:
    from blobplane.broker.flight.config import FlightConfig
    from blobplane.broker.flight.federation import Federation
    from blobplane.broker.flight.service import FlightEndpoint
    from blobplane.broker.metrics import BrokerMetrics, Gauges

__all__ = ["BrokerConfig", "BrokerServer", "serve"]

# Allocating (and zeroing) a large memfd takes milliseconds: in a thread, so
# that the other clients are not kept waiting.
THREAD_ALLOCATION_BYTES = 8 << 20
# What one peer may make the broker hold, by default. Each bound refuses with
# `BrokerLimitReached` (or, for a client that does not read, drops it), so
# whatever one client does, the others keep being served.
MAX_CONNECTIONS = 1024
MAX_WAITING_GETS = 256  # per connection
MAX_WAITING_GETS_PER_ACCOUNT = 1024  # over all the connections of one token (or one client)
# Kept free below RLIMIT_NOFILE: new connections and new blobs stop short of
# it, so the clients already served can still be handed fds.
MIN_FD_RESERVE = 64
# The share of the memory ceiling (the cgroup's limit, else RAM) a broker takes
# by default: room for its clients' own memory, and no OOM kill of the broker.
DEFAULT_MEMORY_SHARE = 0.5


def default_memory_limit() -> int:
    """Half the memory this broker may use: its cgroup's limit where it has one, else RAM."""
    return int(memory_ceiling() * DEFAULT_MEMORY_SHARE)


@dataclass(frozen=True)
class BrokerConfig:
    socket_path: str
    memory_limit: int | None = None  # None: `default_memory_limit()`
    require_token: bool = False
    evict: bool = False
    key_path: str | None = None  # default: beside the socket (`key_path_for`)
    hello_timeout: float = 10.0
    shutdown_grace: float = 2.0
    max_connections: int = MAX_CONNECTIONS
    max_waiting_gets: int = MAX_WAITING_GETS
    max_waiting_gets_per_account: int = MAX_WAITING_GETS_PER_ACCOUNT
    # A Flight endpoint beside the socket and peers to fetch missing keys from
    # (blobplane.broker.flight); None: neither. Needs pyarrow.
    flight: FlightConfig | None = None
    # Where idle blobs go when memory is short (blobplane.broker.spill); None:
    # nowhere, requests that do not fit are refused (or make room with `evict`).
    spill_dir: str | None = None
    # (host, port) of a Prometheus endpoint (blobplane.broker.metrics); None: no metrics.
    # Needs prometheus-client.
    metrics: tuple[str, int] | None = None


class _EndSession(Exception):
    """The connection is over; the reason has been logged (and told to the client)."""


class BrokerServer:
    """The daemon: `await server.run()` serves until `stop()` (or SIGINT/SIGTERM)."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.memory_limit = (
            default_memory_limit() if config.memory_limit is None else config.memory_limit
        )
        self.registry = BlobRegistry(
            memory_limit=self.memory_limit,
            evict=config.evict,
            spill=config.spill_dir is not None,
        )
        # The listener would make the socket's folder too; the key file beside it needs it first.
        folder = os.path.dirname(os.path.abspath(config.socket_path))
        if not os.path.isdir(folder):
            ensure_private_dir(folder)
        self.key_path = config.key_path or key_path_for(config.socket_path)
        self.authority = TokenAuthority.from_key_file(self.key_path)
        self.spill = None if config.spill_dir is None else SpillDir.open(config.spill_dir)
        # Spill files being written and read, in threads; the memfd a write reads
        # is out of the fd table (`Spill`) until the write is over.
        self._spilling: dict[BlobId, asyncio.Future[_Timed]] = {}
        # The broker's fd of each blob being written out, which the write holds meanwhile.
        self._spill_fds: dict[BlobId, int] = {}
        # One thread for the seals of kept slots (`_seal_kept`): a client that makes them
        # slow delays only those, never the spills and restores of the default executor.
        self._sealer = concurrent.futures.ThreadPoolExecutor(1, "blobplane-seal")
        self._restoring: dict[BlobId, asyncio.Future[None]] = {}
        # The writes a put started, which its connection waits for before its next
        # request: a client cannot pile up memory faster than the disk takes it.
        self._spill_waits: dict[ClientId, list[asyncio.Future[_Timed]]] = {}
        self.fds = memory.FdTable()
        self._max_blob = physical_memory()
        self._sessions: dict[ClientId, Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._by_id: dict[BlobId, dict[Waiter, None]] = {}
        self._by_key: dict[str, dict[Waiter, None]] = {}
        self._waiting_by_account: dict[str, int] = {}
        self._fd_limit = _raise_fd_limit()
        self._fd_reserve = max(MIN_FD_RESERVE, self._fd_limit // 16)
        # fds open before serving (stdio, logs, the listener, the key file's): the rest
        # is counted as it is taken (`_fds_in_use`).
        self._fd_baseline = 0
        self._client_ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._started = time.monotonic()
        self.flight: FlightEndpoint | None = None
        self.federation: Federation | None = None
        # None without metrics: then each call site costs one test of None.
        self.metrics: BrokerMetrics | None = None
        if config.metrics is not None:
            from blobplane.broker.metrics import BrokerMetrics

            self.metrics = BrokerMetrics(self._gauges)

    # -- running ---------------------------------------------------------------------------

    async def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Listen, call *ready* with the socket path, serve until `stop()`, shut down."""
        loop = asyncio.get_running_loop()
        listener = aio.listen(self.config.socket_path, timeout=None)
        self._fd_baseline = _count_open_fds()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop)
        event(
            "broker.started",
            socket=listener.path,
            pid=os.getpid(),
            memory_limit=self.memory_limit,
            max_connections=self.config.max_connections,
            fd_limit=self._fd_limit,
            fd_reserve=self._fd_reserve,
            require_token=self.config.require_token,
            evict=self.config.evict,
            key_file=self.key_path,
            spill_dir=None if self.spill is None else self.spill.path,
        )
        if self.spill is not None:
            self._spill_started(self.spill)
        accepting = loop.create_task(self._accept(listener))
        try:
            if self.config.flight is not None:
                self._start_flight(self.config.flight)
            if self.metrics is not None and self.config.metrics is not None:
                self.metrics.start(*self.config.metrics)
            if ready is not None:
                ready(listener.path)
            await self._stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            listener.close()  # the socket file goes first: no new client finds us
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            await self._stop_flight()
            await self._shutdown()
            if self.metrics is not None:
                await self.metrics.stop()

    def stop(self) -> None:
        """Begin a clean shutdown (what SIGINT and SIGTERM do)."""
        if not self._stop.is_set():
            event("broker.stopping", clients=len(self._sessions))
        self._stop.set()

    async def _accept(self, listener: aio.AsyncListener) -> None:
        while True:
            # An accept the backlog can answer returns without a wait: yield first, so
            # that a flood of connections cannot keep the loop from the clients it has.
            await asyncio.sleep(0)
            try:
                channel = await listener.accept(timeout=None)
            except BlobClosed:
                return
            except BlobError as exc:
                # A peer of another uid, or this process is out of fds: the others go on.
                event("client.rejected", logging.WARNING, error=type(exc).__name__, reason=exc)
                await asyncio.sleep(0.05)
                continue
            client = next(self._client_ids)
            session = Session(client, channel, account=f"client:{client}")
            if refusal := self._connection_refusal():
                event("client.rejected", logging.WARNING, client=client, reason=refusal)
                if self.metrics is not None:
                    self.metrics.refused(None, refusal)
                session.post(_refusal(0, refusal))
                session.close()
                continue
            self._sessions[client] = session
            task = asyncio.get_running_loop().create_task(self._serve(session))
            session.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _connection_refusal(self) -> BrokerLimitReached | None:
        if len(self._sessions) >= self.config.max_connections and not self._displace_silent():
            return BrokerLimitReached(
                f"the broker serves {len(self._sessions)} connections, its maximum "
                "(blobplane serve --max-connections); try again later"
            )
        return self._fd_refusal("a new connection")

    def _displace_silent(self) -> bool:
        """Make room by ending the oldest connection that has not said hello yet.

        A flood of connections that never speak then costs the flood its own
        places, never those of the clients being served.
        """
        for session in self._sessions.values():  # oldest first
            if not session.welcomed and not session.displaced and session.task is not None:
                session.displaced = "displaced: no hello yet, and the connections were all taken"
                session.task.cancel()
                self._sessions.pop(session.client)
                return True
        return False

    def _fd_refusal(self, what: str) -> BrokerLimitReached | None:
        """Refuse *what* once the fds in use reach the reserve kept for existing clients."""
        if self._fds_in_use() < self._fd_limit - self._fd_reserve:
            return None
        return BrokerLimitReached(
            f"the broker has {self._fds_in_use()} of its {self._fd_limit} fds in use and keeps "
            f"the last {self._fd_reserve} for the clients it serves; {what} must wait until "
            "blobs are freed or clients leave"
        )

    def _fds_in_use(self) -> int:
        # One per blob and per connection, and those queued with replies; the fds of
        # a request in hand are closed before the next one is read.
        queued = sum(session.queued_fds for session in self._sessions.values())
        return self._fd_baseline + len(self.fds) + len(self._sessions) + queued

    async def _shutdown(self) -> None:
        self._stopping = True
        for session in list(self._sessions.values()):
            for waiter in list(session.waiters):
                self._unpark(waiter)
                session.post(_refusal(waiter.request.rid, BrokerShutdown(_SHUTDOWN)))
            if not session.busy and session.task is not None:
                session.task.cancel()  # idle: no request in flight
        if self._tasks:
            # Requests in progress are answered; then their readers see _stopping.
            _, late = await asyncio.wait(set(self._tasks), timeout=self.config.shutdown_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        await self._spill_io_done()
        self._sealer.shutdown(wait=False, cancel_futures=True)
        self.fds.close_all()
        if self.spill is not None:
            self.spill.close()
        event("broker.stopped", pid=os.getpid())

    # -- one connection --------------------------------------------------------------------

    async def _serve(self, session: Session) -> None:
        reason = "closed by the client"
        try:
            await self._welcome(session)
            loop = asyncio.get_running_loop()
            session.wake = wake = loop.create_future()
            # Requests are handled in the channel's reader callback (`_on_request`), as
            # they arrive; this task only awaits what a request has to await, and the end.
            reader = session.reader = session.channel.read_forever(
                lambda message, fds: self._on_request(session, message, fds),
                lambda error: self._on_reader_end(session, error),
            )
            while not self._stopping:
                create = await wake
                session.wake = wake = loop.create_future()
                try:
                    if create is not None:
                        await self._handle_create(session, create)
                    if spills := self._spill_waits.pop(session.client, None):
                        await asyncio.wait(spills)
                    if session.pending:
                        await session.flush()
                finally:
                    session.busy = False
                if session.late_end is not None:
                    raise session.late_end
                reader.resume()
            reason = "broker shutting down"
        except _EndSession as end:
            reason = str(end)
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            event("client.protocol_error", logging.WARNING, client=session.client, error=exc)
            session.post(_refusal(0, exc))
            await _flush_briefly(session)
        except asyncio.CancelledError:
            reason = session.displaced or "broker shutting down"
        except BlobError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            # A bug of ours: this connection ends, the broker and everyone else go on.
            reason = f"internal error: {type(exc).__name__}"
            _log_bug(session.client, exc)
        finally:
            if session.reader is not None:
                session.reader.stop()
            last = session.wake
            if last is not None and last.done() and not last.cancelled():
                last.exception()  # an end that came after the loop stopped: not news
            await self._end(session, reason)

    def _on_request(self, session: Session, message: Message, fds: tuple[int, ...]) -> None:
        """The reader's callback: carry out one request at once, or wake the task to await.

        It never raises (the fds are `_handle`'s from the call on); an error that
        ends the connection goes to the task, as `recv()` would have raised it.
        """
        reader, wake = session.reader, session.wake
        assert reader is not None
        assert wake is not None
        if self._stopping or wake.done():
            # Shutting down: requests not taken in before are not answered, as when
            # the task stopped reading; its end is on the way.
            close_fds(fds)
            reader.pause()
            return
        session.busy = True
        try:
            create = self._handle(session, message, fds)
        except Exception as exc:
            session.busy = False
            reader.stop()
            wake.set_exception(exc)
            return
        if create is None and not session.pending and session.client not in self._spill_waits:
            session.busy = False
            return
        # A create to await, or replies the socket did not take: the next request waits.
        reader.pause()
        wake.set_result(create)

    def _on_reader_end(self, session: Session, error: Exception) -> None:
        wake = session.wake
        if wake is not None and not wake.done():
            wake.set_exception(error)
        elif session.late_end is None:
            session.late_end = error

    async def _welcome(self, session: Session) -> None:
        try:
            message, fds = await session.channel.recv(timeout=self.config.hello_timeout)
        except Timeout:
            raise _EndSession("no hello within the hello timeout") from None
        request = _decode(message, fds)
        if not isinstance(request, Hello):
            close_fds(fds)  # a hello takes none, so these came with a request refused here
            raise RemoteProtocolError(
                f"the first request must be a hello, not {type(request).__name__}"
            )
        peer = session.channel.peer_credentials
        session.name = request.name
        try:
            if request.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"this broker speaks protocol version {PROTOCOL_VERSION}, "
                    f"the client {request.version}"
                )
            grant = self._grant(request.token)
        except BlobError as exc:
            event(
                "client.refused",
                logging.WARNING,
                client=session.client,
                pid=peer.pid,
                error=type(exc).__name__,
                reason=exc,
            )
            if self.metrics is not None:
                self.metrics.refused(request, exc)
            session.post(_refusal(request.rid, exc))
            await _flush_briefly(session)
            raise _EndSession(f"refused: {type(exc).__name__}") from None
        self.registry.connect(session.client, grant)
        session.bound_to = grant.blob
        session.welcomed = True
        if grant.key_id is not None or grant.expires_at is not None:
            session.token_grant = grant
        if grant.account is not None:
            session.account = grant.account
        event(
            "client.connected",
            client=session.client,
            pid=peer.pid,
            uid=peer.uid,
            name=request.name or None,
            rights=",".join(sorted(grant.rights)),
            max_bytes=grant.max_bytes,
            account=grant.account,
        )
        session.post(
            Welcome(
                rid=request.rid,
                version=PROTOCOL_VERSION,
                client=session.client,
                rights=tuple(sorted(grant.rights)),
                max_bytes=grant.max_bytes,
                blob=None if grant.blob is None else grant.blob.uuid,
                token_required=self.config.require_token,
            )
        )
        await session.flush()

    def _grant(self, token: str | None) -> Grant:
        if token is not None:
            return self.authority.grant(token)
        if self.config.require_token:
            raise TokenRefused(
                "this broker requires a token: ask its owner for one (`blobplane token "
                "create --rights ...`) and pass it with --token, $BLOBPLANE_TOKEN, or the "
                "client's token argument"
            )
        return Grant()

    async def _end(self, session: Session, reason: str) -> None:
        if session.overflowed:
            reason = (
                "overflowed: the client did not read its replies (more than "
                f"{session.max_queued_replies} replies or {session.max_queued_fds} fds queued)"
            )
        for waiter in list(session.waiters):
            self._unpark(waiter)
        try:
            if self._stopping:
                session.post(_refusal(0, BrokerShutdown(_SHUTDOWN)))
                await _flush_briefly(session)
        finally:
            # Even when cancelled in the farewell: the client's references and unsealed
            # blobs must not outlive its connection.
            session.close()
            self._sessions.pop(session.client, None)
            self._spill_waits.pop(session.client, None)
            try:
                if self.registry.connected(session.client):
                    sealed = await self._seal_kept(session.client)
                    self._carry_out(self.registry.disconnect(session.client, sealed))
                    self._schedule_expiry()
                for reader in list(self._sessions.values()):
                    if session.client in reader.pooled_from:
                        reader.pooled_from.discard(session.client)
                        reader.post(ProducerGone(client=session.client))
            except Exception as exc:
                _log_bug(session.client, exc)
            event("client.disconnected", client=session.client, reason=reason)

    async def _seal_kept(self, client: ClientId) -> set[BlobId]:
        """The slots *client* put to outlive it that are sealed against every write now.

        They stay published; the others are withdrawn (someone still maps them
        writable). In a thread: the kernel's seal waits for pages still pinned,
        which a hostile client can make it do for every slot. Through dups, as
        the blobs may be freed meanwhile (the fd of one being spilled is the
        spill's). Nothing is sealed if the broker is stopping.
        """
        fds: dict[BlobId, int] = {}
        try:
            for blob_id in self.registry.kept_by(client):
                fd = self.fds.get(blob_id) if blob_id in self.fds else self._spill_fds.get(blob_id)
                if fd is not None:
                    fds[blob_id] = os.dup(fd)
        except OSError:
            close_fds(fds.values())
            return set()
        if not fds:
            return set()
        # From here the dups are the thread's to close: a cancelled wait leaves it running.
        sealing = asyncio.get_running_loop().run_in_executor(self._sealer, _seal_all, fds)
        try:
            return await sealing
        except asyncio.CancelledError:
            return set()

    # -- requests --------------------------------------------------------------------------

    def _handle(self, session: Session, message: Message, fds: tuple[int, ...]) -> Create | None:
        """Carry out a request, or return a `Create` for `_handle_create` (it awaits)."""
        request = _decode(message, fds)
        if isinstance(request, Hello):
            close_fds(fds)
            raise RemoteProtocolError("the client said hello twice")
        if session.token_grant is not None:
            try:
                # A token that expired or was revoked since the hello ends the connection.
                self.authority.check_current(session.token_grant)
            except TokenRefused as exc:
                close_fds(fds)
                if self.metrics is not None:
                    self.metrics.refused(request, exc)
                session.post(_refusal(0, exc))
                raise _EndSession(f"{type(exc).__name__}: {exc}") from None
        if isinstance(request, Create):
            return request  # no fds ride with it: `_decode` saw to that
        started = time.perf_counter() if self.metrics is not None else 0.0
        try:
            if isinstance(request, Put):
                if request.data is not None:
                    self._put_data(session, request, request.data)
                else:
                    fd, fds = fds[0], ()
                    self._put(session, request, fd)
            else:
                self._dispatch(session, request)
        except BlobError as exc:
            self._refuse(session, request, exc)
        finally:
            close_fds(fds)
            self._schedule_expiry()
            if self.metrics is not None:
                self.metrics.handled(request, started)
        return None

    async def _handle_create(self, session: Session, request: Create) -> None:
        started = time.perf_counter() if self.metrics is not None else 0.0
        try:
            await self._create(session, request)
        except BlobError as exc:
            self._refuse(session, request, exc)
        finally:
            self._schedule_expiry()
            if self.metrics is not None:
                self.metrics.handled(request, started)

    def _refuse(self, session: Session, request: Request, exc: BlobError) -> None:
        quiet = isinstance(request, Release | Delete) and not request.ack
        event(
            "request.refused",
            logging.DEBUG,
            client=session.client,
            op=type(request).__name__.lower(),
            error=type(exc).__name__,
            reason=exc,
        )
        if self.metrics is not None:
            self.metrics.refused(request, exc)
        if not quiet:
            session.post(_refusal(request.rid, exc))

    def _dispatch(self, session: Session, request: Request) -> None:
        client = session.client
        match request:
            case Seal(id=raw):
                self._seal(session, request.rid, BlobId(raw))
            case Get():
                self._get(session, request)
            case Release(id=raw, ack=ack):
                self._carry_out(self.registry.release(client, BlobId(raw)))
                if ack:
                    session.post(Ok(rid=request.rid))
            case Delete(ack=ack):
                target = target_of(request)
                self._carry_out(self.registry.delete(client, target))
                event("blob.deleted", logging.DEBUG, client=client, blob=target)
                if ack:
                    session.post(Ok(rid=request.rid))
            case Renew(lease_ms=lease_ms):
                info = self.registry.renew(client, target_of(request), lease_ms)
                session.post(BlobReply(rid=request.rid, blob=_entry(info)))
            case List(include_deleted=include_deleted):
                infos = self.registry.list(client, include_deleted=include_deleted)
                self._post_listing(session, request.rid, infos)
            case Stats():
                session.post(StatsReply(rid=request.rid, stats=self._stats(client)))
            case MintToken(ttl_ms=ttl_ms):
                if session.bound_to is not None:
                    raise RightMissing(
                        f"client {client}'s token grants a get of blob {session.bound_to} only; "
                        "it cannot hand the blob on with tokens of its own"
                    )
                if ttl_ms is not None and ttl_ms <= 0:
                    raise InvalidSize(f"a token's ttl must be at least 1 ms, got {ttl_ms} ms")
                # A token's bearer hands on no more than it holds: not once its token
                # lapsed or was revoked, and never for longer than its token lasts.
                grant = self.registry.grant(client)
                self.authority.check_current(grant)
                info = self.registry.check_get(client, target_of(request))
                ttl = None if ttl_ms is None else ttl_ms / 1000
                token = self.authority.mint_for_blob(info.id, ttl=ttl, not_after=grant.expires_at)
                event("token.minted", logging.DEBUG, client=client, blob=info.id, ttl_ms=ttl_ms)
                session.post(TokenReply(rid=request.rid, token=token, id=info.id.uuid))
            case _:  # pragma: no cover - _handle takes Hello, Put and Create itself
                raise RemoteProtocolError(f"unexpected {type(request).__name__}")

    async def _create(self, session: Session, request: Create) -> None:
        client, size = session.client, request.size
        if refusal := self._fd_refusal("a new blob"):
            raise refusal
        if size > self._max_blob:
            raise InvalidSize(
                f"a blob of {format_size(size)} is larger than this host's "
                f"{format_size(self._max_blob)} of memory"
            )
        placed = self.registry.create(client, size, key=request.key, lease_ms=request.lease_ms)
        self._carry_out(placed.actions)
        blob_id = placed.id
        if spills := self._spills_of(placed.actions):
            # The memory it takes is what they give back.
            await asyncio.wait(spills)
        try:
            fd = await _allocate(size, blob_id)
        except BlobError:
            if self._still_allocated(blob_id) and self.registry.connected(client):
                self._carry_out(self.registry.discard(client, blob_id))
            raise
        if not self._still_allocated(blob_id):
            os.close(fd)
            raise BlobDeleted(
                f"blob {blob_id} was withdrawn (deleted, or its lease ran out) while the "
                "broker allocated it"
            )
        self.fds.add(blob_id, fd)
        try:
            sent = self.fds.dup(blob_id)
        except BlobError:
            self._carry_out(self.registry.discard(client, blob_id))
            self.fds.close(blob_id)
            raise
        entry = _entry(self.registry.info(blob_id), evicted=_evictions(placed.actions))
        session.post(BlobReply(rid=request.rid, blob=entry), (sent,))
        event(
            "blob.created", logging.DEBUG, client=client, blob=blob_id, size=size, key=request.key
        )
        if request.key is not None:
            self._wake(request.key)

    def _seal(self, session: Session, rid: int, blob_id: BlobId) -> None:
        self.registry.check_seal(session.client, blob_id)
        if blob_id not in self.fds:
            raise BlobBusy(f"blob {blob_id} is still being allocated; seal it once create returned")
        fd = self.fds.get(blob_id)
        memory.seal(fd, blob_id, self.registry.info(blob_id).size)
        self.fds.replace(blob_id, memory.reopen_readonly(fd))
        self._carry_out(self.registry.seal(session.client, blob_id))
        session.post(Ok(rid=rid))
        event("blob.sealed", logging.DEBUG, client=session.client, blob=blob_id)

    def _put(self, session: Session, request: Put, fd: int) -> None:
        try:
            if refusal := self._fd_refusal("a new blob"):
                raise refusal
            charge = memory.check_put(fd, request.size, pooled=request.pooled)
            readonly = memory.reopen_readonly(fd)
        finally:
            os.close(fd)
        self._publish(session, request, readonly, charge)

    def _put_data(self, session: Session, request: Put, data: bytes) -> None:
        """A put that carries its bytes: the broker makes the sealed memfd (no fd came)."""
        if request.pooled or request.keep:
            raise InvalidSize("a put that carries its bytes makes a new blob: it cannot be pooled")
        if len(data) != request.size or request.size > MAX_INLINE_PUT:
            raise InvalidSize(
                f"a put carries at most {MAX_INLINE_PUT} bytes inline, as many as its size says "
                f"({request.size}); this one carried {len(data)}"
            )
        if refusal := self._fd_refusal("a new blob"):
            raise refusal
        self._publish(session, request, memory.holding(data), len(data))

    def _publish(self, session: Session, request: Put, readonly: int, charge: int) -> None:
        """Place the blob *request* put, held by the broker's *readonly* fd (which it owns)."""
        try:
            placed = self.registry.put(
                session.client,
                request.size,
                key=request.key,
                lease_ms=request.lease_ms,
                pooled=request.pooled,
                keep=request.keep,
                charge=charge,
            )
        except BaseException:
            os.close(readonly)
            raise
        self.fds.add(placed.id, readonly)
        self._carry_out(placed.actions)
        if spills := self._spills_of(placed.actions):
            self._spill_waits.setdefault(session.client, []).extend(spills)
        if request.key is not None:
            self._wake(request.key)  # the readers waiting for it first: they are the hurry
        session.post(
            BlobReply(rid=request.rid, blob=_entry(placed.info, evicted=_evictions(placed.actions)))
        )
        event(
            "blob.put",
            logging.DEBUG,
            client=session.client,
            blob=placed.id,
            size=request.size,
            key=request.key,
            pooled=request.pooled,
        )

    # -- gets that wait --------------------------------------------------------------------

    def _get(
        self,
        session: Session,
        request: Get,
        waiter: Waiter | None = None,
        woken_by: BlobId | None = None,
    ) -> None:
        """Answer the get, or park it (again) on what it waits for.

        *woken_by*: the unsealed blob the get waited for, now sealed or gone.
        """
        target = target_of(request)
        try:
            result = self.registry.get(session.client, target)
        except BlobNotFound as exc:
            # A key nobody has used yet may still come, if the client is willing to wait.
            if type(exc) is not BlobNotFound or not isinstance(target, str):
                raise
            # A key that is not here may be at a peer (timeout 0: look here only).
            if (
                self.federation is not None
                and request.timeout_ms != 0
                and self.federation.on_miss(
                    target, waits=bool(request.timeout_ms), woken=woken_by is not None
                )
            ):
                self._park(session, request, target, waiter)
                return
            if woken_by is not None:
                # The blob it waited for went unsealed: that is the answer, not a reason
                # to wait out the timeout for another.
                raise BlobDeleted(
                    f"blob {woken_by} with the key {target!r} was withdrawn before it was "
                    "sealed (its producer disconnected or deleted it, or its lease ran out)"
                ) from None
            if not request.timeout_ms:
                raise
            self._park(session, request, target, waiter)
            return
        if isinstance(result, Pending):
            if result.restore:
                # Bringing a blob back from disk is the broker's own work, not a wait
                # for a producer: whatever the get's timeout, it waits for that.
                parked = self._park(session, request, result.id, waiter, timed=False)
                try:
                    self._carry_out(self.registry.restore(result.id))
                except BlobError:
                    self._unpark(parked)
                    raise
                return
            if request.timeout_ms == 0:
                raise Timeout(f"blob {result.id} is not sealed yet, and the get would not wait")
            self._park(session, request, result.id, waiter)
            return
        blob_id = result.info.id
        try:
            sent = _dup(self.fds, blob_id)
        except BlobError:
            self._carry_out(self.registry.release(session.client, blob_id))
            raise
        if waiter is not None:
            self._unpark(waiter)
        owner = result.info.owner
        if result.info.pooled and owner is not None and owner != session.client:
            session.pooled_from.add(owner)
        session.post(BlobReply(rid=request.rid, blob=_entry(result.info)), (sent,))

    def _park(
        self,
        session: Session,
        request: Get,
        on: BlobId | str,
        waiter: Waiter | None,
        *,
        timed: bool = True,
    ) -> Waiter:
        if waiter is None:
            if len(session.waiters) >= self.config.max_waiting_gets:
                raise BrokerLimitReached(
                    f"this connection already has {len(session.waiters)} gets waiting; "
                    "wait for their answers before asking for more"
                )
            waiting = self._waiting_by_account.get(session.account, 0)
            if waiting >= self.config.max_waiting_gets_per_account:
                raise BrokerLimitReached(
                    f"the account {session.account!r} already has {waiting} gets waiting over "
                    "all its connections; wait for their answers before asking for more"
                )
            waiter = Waiter(session, request)
            self._waiting_by_account[session.account] = waiting + 1
            if request.timeout_ms is not None and timed:
                loop = asyncio.get_running_loop()
                waiter.timer = loop.call_later(
                    request.timeout_ms / 1000, self._waiter_timed_out, waiter
                )
            session.waiters[waiter] = None
        waiter.on = on
        if isinstance(on, str):
            self._by_key.setdefault(on, {})[waiter] = None
        else:
            self._by_id.setdefault(on, {})[waiter] = None
        return waiter

    def _unpark(self, waiter: Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        self._off_table(waiter)
        session = waiter.session
        if session.waiters.pop(waiter, False) is None:
            left = self._waiting_by_account[session.account] - 1
            if left:
                self._waiting_by_account[session.account] = left
            else:
                del self._waiting_by_account[session.account]

    def _off_table(self, waiter: Waiter) -> None:
        on, waiter.on = waiter.on, None
        if isinstance(on, str):
            parked = self._by_key.get(on)
            if parked is not None:
                parked.pop(waiter, None)
                if not parked:
                    del self._by_key[on]
        elif on is not None:
            waiting = self._by_id.get(on)
            if waiting is not None:
                waiting.pop(waiter, None)
                if not waiting:
                    del self._by_id[on]

    def _wake(self, on: BlobId | str) -> None:
        parked = self._by_key.pop(on, None) if isinstance(on, str) else self._by_id.pop(on, None)
        woken_by = None if isinstance(on, str) else on
        for waiter in parked or ():
            waiter.on = None
            try:
                grant = waiter.session.token_grant
                if grant is not None:
                    # A token that expired or was revoked while its get waited gets nothing.
                    self.authority.check_current(grant)
                self._get(waiter.session, waiter.request, waiter, woken_by)
            except BlobError as exc:
                self._unpark(waiter)
                if self.metrics is not None:
                    self.metrics.refused(waiter.request, exc)
                waiter.session.post(_refusal(waiter.request.rid, exc))

    def _waiter_timed_out(self, waiter: Waiter) -> None:
        waiter.timer = None
        on = waiter.on
        self._unpark(waiter)
        what = (
            f"no blob with the key {on!r} appeared"
            if isinstance(on, str)
            else f"blob {on} was not sealed"
        )
        timeout = Timeout(f"{what} within the get's timeout of {waiter.request.timeout_ms} ms")
        if self.metrics is not None:
            self.metrics.refused(waiter.request, timeout)
        waiter.session.post(_refusal(waiter.request.rid, timeout))

    # -- registry actions, leases --------------------------------------------------------------

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case FreeBlob(id=blob_id):
                    self.fds.close(blob_id)
                    # A file being written is removed once the write is over.
                    if self.spill is not None and blob_id not in self._spilling:
                        self.spill.remove(blob_id)
                case Spill(id=blob_id, size=size):
                    self._start_spill(blob_id, size)
                case Restore(id=blob_id, size=size):
                    # After the spills that make room for it (listed before it).
                    self._start_restore(blob_id, size, self._spills_of(actions))
                case WakeWaiters(id=blob_id):
                    self._wake(blob_id)
                case NotifyProducer(client=client, id=blob_id, reuse=reuse):
                    producer = self._sessions.get(client)
                    if producer is not None:
                        producer.post(SlotFree(id=blob_id.uuid, reuse=reuse))
                case Evicted(id=blob_id, key=key, size=size, reason=reason):
                    event("blob.evicted", blob=blob_id, key=key, size=size, reason=reason.value)
                    if self.metrics is not None:
                        self.metrics.withdrawn(reason)

    # -- spilling (blobplane.broker.spill) -------------------------------------------------------

    def _spill_started(self, spill: SpillDir) -> None:
        if spill.leftovers:
            event("spill.cleaned", folder=spill.path, files=spill.leftovers)
        if spill.on_tmpfs:
            event(
                "spill.on_tmpfs",
                logging.WARNING,
                folder=spill.path,
                reason="the spill folder is in memory (tmpfs): spilled blobs still take memory",
            )

    def _spills_of(self, actions: list[Action]) -> list[asyncio.Future[_Timed]]:
        """The writes under way of the blobs *actions* spill."""
        return [
            future
            for action in actions
            if isinstance(action, Spill) and (future := self._spilling.get(action.id))
        ]

    def _start_spill(self, blob_id: BlobId, size: int) -> None:
        assert self.spill is not None
        fd = self.fds.take(blob_id)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, _timed, self.spill.write_file, blob_id, fd, size)
        self._spilling[blob_id] = future
        self._spill_fds[blob_id] = fd
        future.add_done_callback(lambda done: self._spill_done(blob_id, fd, size, done))

    def _spill_done(
        self, blob_id: BlobId, fd: int, size: int, done: asyncio.Future[_Timed]
    ) -> None:
        assert self.spill is not None
        del self._spilling[blob_id]
        del self._spill_fds[blob_id]
        error = done.exception() if not done.cancelled() else BrokenResource("cancelled")
        try:
            state: BlobState | None = self.registry.info(blob_id).state
        except BlobNotFound:
            state = None
        if error is None and state is BlobState.SPILLED:
            checksum, seconds = done.result()
            self.spill.written(blob_id, checksum)
            os.close(fd)  # the memory goes back to the host (or a slot to its producer)
            event("blob.spilled", logging.DEBUG, blob=blob_id, size=size, seconds=f"{seconds:.6f}")
            if self.metrics is not None:
                self.metrics.spilled()
            self.apply(self.registry.spill_written(blob_id))
            return
        if error is None:
            self.spill.written(blob_id, done.result()[0])
            self.spill.remove(blob_id)  # the memfd is whole: the file is not needed
        if state is None:
            os.close(fd)  # freed (deleted, lease over) while it was written
            return
        self.fds.add(blob_id, fd)
        if state is BlobState.RESTORING:
            # A get came while it was written: it never left memory.
            event("blob.restored", logging.DEBUG, blob=blob_id, size=size, seconds=0, disk=False)
            if self.metrics is not None:
                self.metrics.restored()
            self.apply(self.registry.restored(blob_id))
            return
        event("blob.spill_failed", logging.WARNING, blob=blob_id, size=size, error=error)
        self.apply(self.registry.spill_failed(blob_id))

    def _start_restore(
        self, blob_id: BlobId, size: int, after: list[asyncio.Future[_Timed]]
    ) -> None:
        if blob_id in self._spilling:
            return  # the write's end puts the memfd back (`_spill_done`)
        task = asyncio.get_running_loop().create_task(self._restore(blob_id, size, after))
        self._restoring[blob_id] = task

    async def _restore(
        self, blob_id: BlobId, size: int, after: list[asyncio.Future[_Timed]]
    ) -> None:
        assert self.spill is not None
        fd: int | None = None
        seconds = 0.0
        error: BlobError | None = None
        try:
            if after:
                await asyncio.wait(after)  # the memory this takes is what they give back
            checksum = self.spill.checksum(blob_id)
            if checksum is None:
                raise BlobLost(f"blob {blob_id} was spilled, but its spill file was never written")
            fd, seconds = await _restore_in_thread(self.spill, blob_id, size, checksum)
        except BlobError as exc:
            error = exc
        except Exception as exc:
            LOGGER.error("event=blob.restore_bug blob=%s", blob_id, exc_info=exc)
            error = BrokenResource(f"restoring blob {blob_id} failed: {type(exc).__name__}")
        finally:
            del self._restoring[blob_id]
        try:
            restoring = self.registry.info(blob_id).state is BlobState.RESTORING
        except BlobNotFound:
            restoring = False
        if not restoring:  # freed (deleted, lease over) meanwhile: its file went with it
            if fd is not None:
                os.close(fd)
            return
        if fd is not None:
            self.fds.add(blob_id, fd)
            self.spill.remove(blob_id)
            event("blob.restored", logging.DEBUG, blob=blob_id, size=size, seconds=f"{seconds:.6f}")
            if self.metrics is not None:
                self.metrics.restored()
            self.apply(self.registry.restored(blob_id))
            return
        assert error is not None
        lost = isinstance(error, BlobLost)
        event(
            "blob.lost" if lost else "blob.restore_failed",
            logging.WARNING,
            blob=blob_id,
            size=size,
            error=type(error).__name__,
            reason=error,
        )
        # Its gets learn why, rather than that it is gone.
        for waiter in list(self._by_id.get(blob_id, ())):
            self._unpark(waiter)
            if self.metrics is not None:
                self.metrics.refused(waiter.request, error)
            waiter.session.post(_refusal(waiter.request.rid, error))
        self.apply(self.registry.restore_failed(blob_id, lost=lost))

    async def _spill_io_done(self) -> None:
        """Wait for the spill files being written and read (their threads cannot be stopped)."""
        while self._spilling or self._restoring:
            pending: list[asyncio.Future[Any]] = [*self._spilling.values()]
            pending += self._restoring.values()
            await asyncio.wait(pending)

    def _schedule_expiry(self) -> None:
        deadline = self.registry.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            # A hair late: asyncio may fire a little early, and the registry must see it due.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(deadline + 0.001, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = None
        self._carry_out(self.registry.expire())
        self._schedule_expiry()

    def _still_allocated(self, blob_id: BlobId) -> bool:
        try:
            return self.registry.info(blob_id).state is BlobState.ALLOCATED
        except BlobNotFound:
            return False

    # -- for the Flight endpoint and federation (blobplane.broker.flight) ---------------------

    def _start_flight(self, config: FlightConfig) -> None:
        from blobplane.broker.flight.federation import Federation
        from blobplane.broker.flight.service import FlightEndpoint

        own = None
        if config.listen is not None:
            self.flight = FlightEndpoint(self, config, config.listen)
            own = self.flight.start()
        if config.peers:
            self.federation = Federation(self, config, own)

    async def _stop_flight(self) -> None:
        if self.flight is not None:
            await self.flight.stop(self.config.shutdown_grace)
        if self.federation is not None:
            await self.federation.stop()

    @property
    def flight_url(self) -> str | None:
        """Where the Flight endpoint listens (its real port), once `run()` started it."""
        return None if self.flight is None else self.flight.address.url

    @property
    def metrics_url(self) -> str | None:
        """Where the metrics endpoint listens (its real port), once `run()` started it."""
        return None if self.metrics is None else self.metrics.url

    def _gauges(self) -> Gauges:
        from blobplane.broker.metrics import Gauges

        return Gauges.read(
            self.registry.stats(),
            self.registry.list(include_deleted=True),
            connections=len(self._sessions),
            waiting_gets=sum(len(s.waiters) for s in self._sessions.values()),
        )

    def new_client_id(self) -> ClientId:
        """A registry client id no connection uses: one per Flight call or fetch."""
        return next(self._client_ids)

    def apply(self, actions: list[Action]) -> None:
        """Carry out what a registry call returned, and reschedule the lease timer."""
        self._carry_out(actions)
        self._schedule_expiry()

    def wake(self, key: str) -> None:
        """Re-run the gets parked on *key*."""
        self._wake(key)

    def fd_refusal(self, what: str) -> BrokerLimitReached | None:
        """`BrokerLimitReached` once the fds in use reach the reserve, else None."""
        return self._fd_refusal(what)

    # -- looking -----------------------------------------------------------------------------

    def _post_listing(self, session: Session, rid: int, infos: list[BlobInfo]) -> None:
        part: list[BlobEntry] = []
        used = 0
        for info in infos:
            entry = _entry(info)
            size = len(encode(entry))
            if part and used + size > MAX_LIST_PART_BYTES:
                session.post(ListReply(rid=rid, blobs=tuple(part), more=True))
                part, used = [], 0
            part.append(entry)
            used += size
        session.post(ListReply(rid=rid, blobs=tuple(part), more=False))

    def _stats(self, client: ClientId) -> StatsEntry:
        stats = self.registry.stats(client)
        accounts = sorted(stats.accounts, key=lambda a: a.bytes, reverse=True)
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_fds = -1
        return StatsEntry(
            pid=os.getpid(),
            uptime_s=time.monotonic() - self._started,
            clients=stats.clients,
            blobs=stats.blobs,
            allocated=stats.allocated,
            sealed=stats.sealed,
            deleted=stats.deleted,
            pooled=stats.pooled,
            bytes=stats.bytes,
            pooled_bytes=stats.pooled_bytes,
            memory_limit=stats.memory_limit,
            references=stats.references,
            evictions=stats.evictions,
            expirations=stats.expirations,
            waiting_gets=sum(len(s.waiters) for s in self._sessions.values()),
            open_fds=open_fds,
            token_required=self.config.require_token,
            evict=self.config.evict,
            accounts=tuple(
                AccountEntry(
                    name=a.name,
                    bytes=a.bytes,
                    blobs=a.blobs,
                    max_bytes=a.max_bytes,
                    clients=a.clients,
                )
                for a in accounts[:MAX_ACCOUNTS_LISTED]
            ),
            accounts_omitted=max(0, len(accounts) - MAX_ACCOUNTS_LISTED),
        )


# -- helpers ---------------------------------------------------------------------------------

_SHUTDOWN = "the broker is shutting down; the request was not carried out"


def _log_bug(client: ClientId, exc: BaseException) -> None:
    LOGGER.error(
        "event=client.internal_error client=%s error=%s", client, type(exc).__name__, exc_info=exc
    )


def _decode(message: Message, fds: tuple[int, ...]) -> Request:
    """The broker request in *message*; on any violation its fds are closed and it raises."""
    try:
        if not isinstance(message, UserPayload):
            raise RemoteProtocolError(
                f"expected a broker request in a UserPayload, got {type(message).__name__}"
            )
        request = decode_request(message.data)
        wanted = fds_expected(request)
        if len(fds) != wanted:
            raise RemoteProtocolError(
                f"fd count mismatch: a {type(request).__name__.lower()} request takes "
                f"{wanted} fds, {len(fds)} came with it"
            )
    except BaseException:
        close_fds(fds)
        raise
    return request


def _seal_all(fds: dict[BlobId, int]) -> set[BlobId]:
    """In the sealing thread: which of *fds* took the seal; closes them all."""
    try:
        return {blob_id for blob_id, fd in fds.items() if memory.seal_for_good(fd)}
    finally:
        close_fds(fds.values())


def _dup(fds: memory.FdTable, blob_id: BlobId) -> int:
    """`fds.dup(blob_id)`, without building its error message unless the dup fails."""
    try:
        return os.dup(fds.get(blob_id))
    except OSError:
        return fds.dup(blob_id)  # fails again, now with the message


def _refusal(rid: int, error: BlobError) -> Refused:
    return Refused(rid=rid, error=type(error).__name__, message=str(error)[:MAX_TEXT])


def _evictions(actions: list[Action]) -> int:
    return sum(
        1
        for action in actions
        if isinstance(action, Evicted) and action.reason is EvictReason.MEMORY
    )


def _entry(info: BlobInfo, *, evicted: int = 0) -> BlobEntry:
    now = time.monotonic()
    return BlobEntry(
        id=info.id.uuid,
        key=info.key,
        size=info.size,
        state=info.state.value,
        pooled=info.pooled,
        lease_ms=info.lease_ms,
        expires_in_ms=None if info.expires_at is None else round((info.expires_at - now) * 1000),
        references=info.references,
        age_ms=max(0, round((now - info.created_at) * 1000)),
        idle_ms=max(0, round((now - info.last_used) * 1000)),
        account=info.account,
        owner=info.owner,
        evicted=evicted,
    )


async def _allocate(size: int, blob_id: BlobId) -> int:
    if size < THREAD_ALLOCATION_BYTES:
        return memory.allocate(size, blob_id)
    future = asyncio.get_running_loop().run_in_executor(None, memory.allocate, size, blob_id)
    try:
        # Shielded: a cancelled request must still close what the thread allocates.
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_result)
        raise


# What a spill file's thread returns (a checksum, or a restored fd) and its seconds.
_Timed = tuple[int, float]


def _timed(function: Callable[..., int], *args: object) -> _Timed:
    """*function(*args)*, and how long it took: the I/O alone, not its wait for a thread."""
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


async def _restore_in_thread(spill: SpillDir, blob_id: BlobId, size: int, checksum: int) -> _Timed:
    future = asyncio.get_running_loop().run_in_executor(
        None, _timed, spill.read_file, blob_id, size, checksum
    )
    try:
        # Shielded: a cancelled restore must still close what the thread makes.
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_timed)
        raise


def _close_timed(future: asyncio.Future[_Timed]) -> None:
    if not future.cancelled() and future.exception() is None:
        os.close(future.result()[0])


def _close_result(future: asyncio.Future[int]) -> None:
    if not future.cancelled() and future.exception() is None:
        os.close(future.result())


async def _flush_briefly(session: Session) -> None:
    """Send what is queued if the client takes it soon; a farewell must not hang the broker."""
    try:
        await asyncio.wait_for(session.flush(), 0.5)
    except (BlobError, TimeoutError):
        pass


def _raise_fd_limit() -> int:
    """Every blob holds one fd in the broker: allow as many as the hard limit does.

    Returns the limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _count_open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def serve(config: BrokerConfig, ready: Callable[[str], None] | None = None) -> None:
    """Run a broker until SIGINT or SIGTERM (blocking); *ready* is called once it listens."""

    async def main() -> None:
        await BrokerServer(config).run(ready)

    asyncio.run(main())
