"""Random peers against a live broker: whatever they send, the broker serves everyone else.

Hypothesis draws an `Example`: up to four connections, each with a plan (how
it says hello, whether it reads its replies), and a list of steps spread over
them: puts with fds of every kind (sealed memfds, pool slots, sparse,
oversized and undersized memfds, memfds without seals, pipes, directories,
sockets, /dev/null, files on disk, O_PATH fds...), creates that the client
fills, shrinks, grows or keeps mapped before sealing, gets that park and are
never read, floods, requests with the wrong fds, payloads and frames that are
no request at all, and connections closed in the middle. The steps go out
through `rawclient.RawConnection`, which checks nothing. A reading connection
gets back every blob the broker accepted from it, to look at what readers get.

After each example:

(a) the broker process is alive;
(b) a well-behaved client (`connect_broker`) puts a blob and gets it back by
    key within `PROBE_S`, while the random connections are still open;
(c) once they are closed (and the watcher deleted the blobs they published),
    the broker's open fds and its accounting (`Stats`: bytes, blobs,
    waiting gets, references, clients, accounts) are back where they were
    before the example, within `SETTLE_S`;
(d) the broker logged no internal error;
(e) every fd a random reader got for a blob was safe to map: a regular
    file, read-only, sealed against shrinking and growing (and writing,
    unless pooled), at least as large as the blob, and (unless a pool slot)
    no larger either, or the broker holds memory it does not account for, and
    not sparse (reading a missing page would charge it to the reader);
(f) the test process itself kept no fd, mapping or shm file.

One broker serves the whole module; if it dies, the example fails and the
next one starts a new broker. `make test` runs `BLOBPLANE_FUZZ_EXAMPLES`
(default 100, a few seconds) examples; `BLOBPLANE_FUZZ_SECONDS` keeps drawing
batches of that many until the time is up, and `BLOBPLANE_FUZZ_STEPS` sets
the most steps an example has (default 16), e.g.::

    BLOBPLANE_FUZZ_EXAMPLES=500 BLOBPLANE_FUZZ_SECONDS=600 \\
        .venv/bin/pytest tests/hostile/test_broker_fuzz.py

A failure is shrunk by Hypothesis and printed as the `Example` to replay.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, TypeVar, get_args

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rawclient import RawConnection, Received, frame

from blobplane.backends.checks import F_SEAL_FUTURE_WRITE, SIZE_SEALS
from blobplane.broker import protocol
from blobplane.broker.protocol import (
    BlobReply,
    Create,
    Delete,
    Get,
    Hello,
    List,
    ListReply,
    MintToken,
    Ok,
    Put,
    Release,
    Renew,
    Request,
    Seal,
    Stats,
    StatsEntry,
    TokenReply,
)
from blobplane.client import BrokerClient, connect_broker
from blobplane.errors import BlobError
from blobplane.types import BlobId, BlobToken
from blobplane.wire import BlobHandoff, ErrorReply, UserPayload
from blobplane.wire.frames import HEADER, MAGIC, MAX_FDS_PER_MESSAGE, MAX_FRAME_SIZE
from blobplane.wire.messages import Ack as WireAck
from brokers import Broker, start
from leaks import Snapshot

EXAMPLES = int(os.environ.get("BLOBPLANE_FUZZ_EXAMPLES", "100"))
SECONDS = float(os.environ.get("BLOBPLANE_FUZZ_SECONDS", "0"))
MAX_STEPS = int(os.environ.get("BLOBPLANE_FUZZ_STEPS", "16"))
PROBE_S = 5.0  # (b): the well-behaved client's whole round trip
SETTLE_S = 2.0  # (c): how long the broker may take to get back to its baseline
STABLE_S = 0.5  # (c): unchanged this long with every fuzz client gone: it will not settle
REPLY_S = 1.0  # how long a reading fuzz connection waits for a prompt reply
MAX_OPENS = 4  # connections per plan and example: a new one each time the broker hung up

# A passing example takes milliseconds; a failing one up to SETTLE_S + STABLE_S, and
# Hypothesis replays it many times while it shrinks it.
pytestmark = pytest.mark.timeout(int(120 + 2 * SECONDS + EXAMPLES))

FULL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
SLOT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
MAX_WRITTEN = 2 << 20  # what goes into a memfd: all of it, unless it is larger (1 GiB)

# -- what an example is ------------------------------------------------------------------------

FdKind: TypeAlias = Literal[
    "sealed",  # F_SEAL_SHRINK | GROW | WRITE | SEAL, filled: what a put takes
    "slot",  # F_SEAL_FUTURE_WRITE instead of WRITE: what a pooled put takes
    "sparse",  # fully sealed, only ftruncate'd: no page behind it
    "size-seals",  # F_SEAL_SHRINK | GROW only
    "write-seal",  # F_SEAL_WRITE only
    "unsealed",
    "no-sealing",  # memfd without MFD_ALLOW_SEALING
    "dev-shm",  # a file in /dev/shm (tmpfs: F_SEAL_SEAL alone)
    "disk-file",  # a regular file on a filesystem without seals
    "proc-file",  # a regular file whose size says 0
    "o-path",  # an O_PATH fd of a regular file
    "pipe",
    "socket",
    "directory",
    "dev-null",
    "eventfd",
]
FD_KINDS: tuple[FdKind, ...] = get_args(FdKind)
Fit: TypeAlias = Literal["exact", "larger", "smaller"]  # the fd's size against the declared one
PUT_SIZES = (4096, 0, 1, 65536, 1 << 20, 1 << 30)
CREATE_SIZES = (4096, 0, 1, 65536, 1 << 20, 9 << 20, 1 << 50)
LEASES = (None, 1, 50, 60_000)
GET_TIMEOUTS = (0, None, 20, 60_000)
KEYS = 3
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How a connection starts, and whether it reads what the broker sends it."""

    hello: Literal["valid", "none", "wrong-version", "bad-token", "minted-token"]
    reads: bool


@dataclass(frozen=True)
class PutFd:
    kind: FdKind
    size: int
    fit: Fit
    key: int | None
    pooled: bool
    lease_ms: int | None


@dataclass(frozen=True)
class CreateBlob:
    size: int
    key: int | None
    lease_ms: int | None


@dataclass(frozen=True)
class Fill:
    """Create a blob, fill it, do *tamper* to its fd, seal it: what a producer does (or worse).

    Only a connection that reads its replies gets the fd; others just create.
    """

    size: int
    key: int | None
    tamper: Literal["none", "shrink", "grow", "map", "close-fd"]


@dataclass(frozen=True)
class OnCreated:
    """Something the client does with the writable fd of a blob it created (index: which)."""

    blob: int
    how: Literal["seal", "write", "map", "unmap", "shrink", "grow", "close-fd"]


@dataclass(frozen=True)
class Targeted:
    """A request about one blob: a key, one the example saw (target < 9), or an unknown id."""

    op: Literal["get", "release", "delete", "renew", "mint", "seal"]
    by_key: bool
    target: int
    timeout_ms: int | None  # get's timeout, renew's lease, mint's ttl
    ack: bool


@dataclass(frozen=True)
class Plain:
    op: Literal["stats", "list", "list-deleted", "hello"]


@dataclass(frozen=True)
class WrongFds:
    """A request with fds it should not carry (or a put without exactly one)."""

    op: Literal["stats", "put", "get", "hello"]
    kinds: tuple[FdKind, ...]


@dataclass(frozen=True)
class BadPayload:
    """Bytes in a UserPayload where a request should be, with fds maybe."""

    data: bytes
    kinds: tuple[FdKind, ...]


BadFrameKind: TypeAlias = Literal[
    "garbage",  # bytes that are no frame
    "short",  # half a header
    "wrong-magic",
    "wrong-version",
    "header-more-fds",  # the header announces one fd more than ride with it
    "header-fewer-fds",
    "too-many-fds",  # 17, over the per-message maximum of 16
    "too-big",  # a datagram over the 64 KiB frame limit
    "trailing",  # a good frame, then more bytes in the same datagram
    "empty",  # a zero-length datagram (with fds, if any)
    "handoff",  # a BlobHandoff: the channel's protocol, not the broker's
    "error-reply",
    "ack",
    "old-id",  # a wire id that does not increase
]
BAD_FRAMES: tuple[BadFrameKind, ...] = get_args(BadFrameKind)


@dataclass(frozen=True)
class BadFrame:
    how: BadFrameKind
    data: bytes
    kinds: tuple[FdKind, ...]


@dataclass(frozen=True)
class Flood:
    """*count* requests without reading in between: stats, or gets that park."""

    count: int
    what: Literal["stats", "park"]


@dataclass(frozen=True)
class Read:
    pass


@dataclass(frozen=True)
class Close:
    how: Literal["close", "shutdown-write", "shutdown-read"]


Action: TypeAlias = (
    PutFd
    | Fill
    | CreateBlob
    | OnCreated
    | Targeted
    | Plain
    | WrongFds
    | BadPayload
    | BadFrame
    | Flood
    | Read
    | Close
)


@dataclass(frozen=True)
class Example:
    plans: tuple[Plan, ...]
    steps: tuple[tuple[int, Action], ...]  # (connection, action)


# -- strategies --------------------------------------------------------------------------------

_fd_kinds = st.lists(st.sampled_from(FD_KINDS), max_size=3).map(tuple)
_keys = st.none() | st.integers(0, KEYS - 1)
_ops = ("get", "put", "create", "seal", "release", "delete", "renew", "list", "stats", "mint")
_msgpack_ints = st.integers(-(2**63), 2**64 - 1)
_requestish = st.fixed_dictionaries(
    {"op": st.sampled_from((*_ops, "hello", "nope")), "rid": _msgpack_ints},
    optional={
        "id": st.binary(max_size=17),
        "key": st.text(max_size=8),
        "size": _msgpack_ints,
        "timeout_ms": _msgpack_ints | st.none(),
        "lease_ms": _msgpack_ints | st.none(),
        "pooled": st.booleans(),
        "ack": st.booleans(),
        "version": st.integers(0, 3),
        "token": st.text(max_size=12) | st.none(),
        "extra": st.none(),
    },
).map(msgspec.msgpack.encode)


def _weighted(*choices: tuple[int, T]) -> st.SearchStrategy[T]:
    """One of *choices* (weight, value), drawn in proportion; shrinks toward the first."""
    return st.sampled_from([value for weight, value in choices for _ in range(weight)])


# Mostly what a client of this library sends, so that blobs exist, gets wait and
# connections hold things when the hostile steps come; the first of each choice is
# where Hypothesis shrinks to.
_put_fd = st.builds(
    PutFd,
    kind=_weighted((4, "sealed"), (2, "slot"), *((1, kind) for kind in FD_KINDS[2:])),
    size=st.sampled_from(PUT_SIZES),
    fit=_weighted((3, "exact"), (1, "larger"), (1, "smaller")),
    key=_keys,
    pooled=st.booleans(),
    lease_ms=st.sampled_from(LEASES),
)
_create = st.builds(
    CreateBlob, size=st.sampled_from(CREATE_SIZES), key=_keys, lease_ms=st.sampled_from(LEASES)
)
_fill = st.builds(
    Fill,
    size=st.sampled_from(CREATE_SIZES[:5]),
    key=_keys,
    tamper=_weighted((3, "none"), (1, "shrink"), (1, "grow"), (1, "map"), (1, "close-fd")),
)
_on_created = st.builds(
    OnCreated,
    blob=st.integers(0, 3),
    how=_weighted(
        (3, "seal"),
        (2, "write"),
        (1, "map"),
        (1, "unmap"),
        (1, "shrink"),
        (1, "grow"),
        (1, "close-fd"),
    ),
)
_targeted = st.builds(
    Targeted,
    op=_weighted((3, "get"), (1, "release"), (1, "delete"), (1, "renew"), (1, "mint"), (1, "seal")),
    by_key=st.booleans(),
    target=st.integers(0, 9),
    timeout_ms=st.sampled_from(GET_TIMEOUTS),
    ack=st.booleans(),
)
_plain_requests = st.builds(Plain, op=st.sampled_from(("stats", "list", "list-deleted", "hello")))
_wrong_fds = st.builds(
    WrongFds, op=st.sampled_from(("stats", "put", "get", "hello")), kinds=_fd_kinds
)
_bad_payload = st.builds(BadPayload, data=st.binary(max_size=48) | _requestish, kinds=_fd_kinds)
_bad_frame = st.builds(
    BadFrame, how=st.sampled_from(BAD_FRAMES), data=st.binary(max_size=48), kinds=_fd_kinds
)
_flood = st.builds(
    Flood, count=st.sampled_from((5, 100, 2000)), what=st.sampled_from(("stats", "park"))
)
_close = st.builds(Close, how=st.sampled_from(("close", "shutdown-write", "shutdown-read")))

_actions: st.SearchStrategy[Action] = _weighted(
    *((3, strategy) for strategy in (_put_fd, _fill, _targeted)),
    *((1, strategy) for strategy in (_create, _on_created)),
    *((1, strategy) for strategy in (_plain_requests, st.just(Read()), _wrong_fds)),
    *((1, strategy) for strategy in (_bad_payload, _bad_frame, _flood, _close)),
).flatmap(lambda strategy: strategy)

_plans = st.builds(
    Plan,
    hello=_weighted(
        (6, "valid"), (1, "none"), (1, "wrong-version"), (1, "bad-token"), (1, "minted-token")
    ),
    reads=_weighted((2, True), (1, False)),
)

examples = st.builds(
    Example,
    plans=st.tuples(_plans, _plans, _plans, _plans),
    steps=st.lists(st.tuples(st.integers(0, 3), _actions), min_size=1, max_size=MAX_STEPS).map(
        tuple
    ),
)


# -- fds of every kind -----------------------------------------------------------------------------

_MEMFD_SEALS: dict[str, int] = {
    "sealed": FULL_SEALS,
    "slot": SLOT_SEALS,
    "sparse": FULL_SEALS,
    "size-seals": SIZE_SEALS,
    "write-seal": fcntl.F_SEAL_WRITE,
    "unsealed": 0,
    "no-sealing": 0,
}
_PATTERN = bytes(range(256)) * (MAX_WRITTEN // 256)


def _memfd(kind: FdKind, size: int) -> int:
    flags = os.MFD_CLOEXEC | (0 if kind == "no-sealing" else os.MFD_ALLOW_SEALING)
    fd = os.memfd_create(f"blobplane-fuzz-{kind}", flags)
    try:
        os.ftruncate(fd, size)
        if kind != "sparse" and size:
            os.pwrite(fd, _PATTERN[: min(size, MAX_WRITTEN)], 0)
        if _MEMFD_SEALS[kind]:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS[kind])
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sized_file(path_or_folder: str, size: int, *, tmpfile: bool) -> int:
    if tmpfile:
        fd = os.open(path_or_folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    else:
        fd = os.open(path_or_folder, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path_or_folder)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_fd(kind: FdKind, size: int, folder: str) -> int:
    """A new fd of *kind* (*size* bytes where that means anything); the caller closes it."""
    if kind in _MEMFD_SEALS:
        return _memfd(kind, size)
    if kind == "dev-shm":
        path = f"/dev/shm/blobplane-tests-fuzz-{uuid.uuid4().hex}"
        return _sized_file(path, size, tmpfile=False)
    if kind == "disk-file":
        return _sized_file(folder, size, tmpfile=True)
    if kind == "proc-file":
        return os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    if kind == "o-path":
        return os.open(os.path.join(folder, "plain-file"), os.O_PATH | os.O_CLOEXEC)
    if kind == "pipe":
        read, write = os.pipe()
        os.close(write)
        return read
    if kind == "socket":
        left, right = socket.socketpair()
        right.close()
        return left.detach()
    if kind == "directory":
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if kind == "dev-null":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    assert kind == "eventfd", kind
    return os.eventfd(0, os.EFD_CLOEXEC)


@contextmanager
def fds_of(kinds: Sequence[FdKind], size: int, folder: str) -> Iterator[list[int]]:
    """Fds of *kinds*, closed when the block ends (the kernel copied whatever was sent)."""
    fds: list[int] = []
    try:
        for kind in kinds:
            fds.append(make_fd(kind, size, folder))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _fd_size(size: int, fit: Fit) -> int:
    if fit == "larger":
        return size + 4096
    if fit == "smaller":
        return size // 2
    return size


def _plain(op: str, rid: int, key: str = "k") -> Request:
    """A request that needs no fd: stats, list, hello (a get with a timeout of 0, a put)."""
    if op == "stats":
        return Stats(rid=rid)
    if op == "hello":
        return Hello(rid=rid)
    if op == "get":
        return Get(rid=rid, key=key, timeout_ms=0)
    if op == "put":
        return Put(rid=rid, size=4096)  # with other than one fd: the wrong number
    return List(rid=rid, include_deleted=op == "list-deleted")


# -- one example, played -----------------------------------------------------------------------


@dataclass
class CreatedBlob:
    """A blob a fuzz connection created: the writable fd the broker sent, and its mappings."""

    id: uuid.UUID
    size: int
    fd: int | None
    maps: list[mmap.mmap] = field(default_factory=list)

    def close(self) -> None:
        while self.maps:
            self.maps.pop().close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Conn:
    plan: Plan
    raw: RawConnection
    creates: set[int] = field(default_factory=set)  # rids of its creates
    gets: set[int] = field(default_factory=set)  # rids of its gets
    created: list[CreatedBlob] = field(default_factory=list)

    def keep(self) -> set[int]:
        return self.creates | self.gets


class Play:
    """Plays one `Example` against the broker; `close()` closes everything it opened."""

    def __init__(self, socket_path: str, folder: str, example: Example) -> None:
        self.socket_path = socket_path
        self.folder = folder
        self.example = example
        nonce = uuid.uuid4().hex[:8]
        self.keys = [f"fuzz-{nonce}-{i}" for i in range(KEYS)]
        self.known: list[uuid.UUID] = []
        self.minted: list[str] = []
        self.conns: dict[int, Conn] = {}
        self.opens = [0] * len(example.plans)
        self.opened: list[RawConnection] = []
        self.created: list[CreatedBlob] = []
        # (e): what readers were handed that they must not map, and the error to raise
        self.unsafe: list[tuple[type[UnsafeForReaders], str]] = []

    def run(self) -> None:
        for index, action in self.example.steps:
            conn = self._conn(index)
            if conn is not None:
                self._do(conn, action)

    def close(self) -> None:
        for raw in self.opened:
            raw.close()
        for blob in self.created:
            blob.close()

    # -- connections ---------------------------------------------------------------------------

    def _conn(self, index: int) -> Conn | None:
        conn = self.conns.get(index)
        if conn is not None and not conn.raw.ended:
            return conn
        if self.opens[index] >= MAX_OPENS:
            return None
        self.opens[index] += 1
        try:
            raw = RawConnection(self.socket_path)
        except OSError:
            return None  # the broker takes no more connections: its right
        self.opened.append(raw)
        conn = self.conns[index] = Conn(self.example.plans[index], raw)
        hello = conn.plan.hello
        if hello == "none":
            return conn
        rid = raw.next_rid()
        if hello == "valid":
            request = Hello(rid=rid, name="fuzz")
        elif hello == "wrong-version":
            request = Hello(rid=rid, version=protocol.PROTOCOL_VERSION + 7)
        elif hello == "bad-token":
            request = Hello(rid=rid, token="bp1.AAAA.AAAA")
        else:
            request = Hello(rid=rid, token=self.minted[-1] if self.minted else "bp1.x.y")
        self._send(conn, request)
        return conn

    def _send(
        self, conn: Conn, request: Request, fds: Sequence[int] = (), *, reply: bool = True
    ) -> Received | None:
        """Send *request*; a reading connection then takes in what came, up to its reply."""
        sent = conn.raw.send_request(request, fds)
        return self._after(conn, request.rid if sent and reply else None)

    def _after(self, conn: Conn, rid: int | None, timeout: float = REPLY_S) -> Received | None:
        """A reading connection takes in its replies: up to *rid*'s (returned), or what is there."""
        if not conn.plan.reads:
            return None
        got = None
        if rid is None:
            seen = conn.raw.drain(conn.keep())
        else:
            got, seen = conn.raw.wait_for(rid, timeout, conn.keep())
        for received in seen:
            self._absorb(conn, received)
        return got

    def _read_back(self, conn: Conn, blob_id: uuid.UUID) -> None:
        """Get a blob the broker just took: what it hands a reader must be safe (e)."""
        rid = conn.raw.next_rid()
        conn.gets.add(rid)
        self._send(conn, Get(rid=rid, id=blob_id, timeout_ms=0))

    def _absorb(self, conn: Conn, received: Received) -> None:
        fds, received.fds = received.fds, []
        try:
            match received.reply:
                case BlobReply(rid=rid, blob=entry):
                    self._saw(entry.id)
                    if fds and rid in conn.creates:
                        blob = CreatedBlob(entry.id, entry.size, fds.pop(0))
                        conn.created.append(blob)
                        self.created.append(blob)
                    elif fds and rid in conn.gets:
                        self._check_reader_fd(fds[0], entry)
                case ListReply(blobs=entries):
                    for entry in entries:
                        self._saw(entry.id)
                case TokenReply(token=token, id=blob_id):
                    self.minted.append(token)
                    self._saw(blob_id)
                case _:
                    pass
        finally:
            for fd in fds:
                os.close(fd)

    def _saw(self, blob_id: uuid.UUID) -> None:
        if blob_id not in self.known:
            self.known.append(blob_id)

    def _check_reader_fd(self, fd: int, entry: protocol.BlobEntry) -> None:
        """(e): what a get hands a reader must be safe to map as it is."""
        problems: list[tuple[type[UnsafeForReaders], str]] = []
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            problems.append((Unmappable, f"mode 0o{info.st_mode:o} is no regular file"))
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            problems.append((Unmappable, "not opened read-only"))
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            seals = 0
            problems.append((Unmappable, f"F_GET_SEALS fails: {exc}"))
        if seals & SIZE_SEALS != SIZE_SEALS:
            problems.append((Unmappable, f"seals 0x{seals:x} lack F_SEAL_SHRINK|F_SEAL_GROW"))
        write_seals = fcntl.F_SEAL_WRITE | (F_SEAL_FUTURE_WRITE if entry.pooled else 0)
        if not seals & write_seals:
            problems.append(
                (Unmappable, f"seals 0x{seals:x} lack a write seal (pooled={entry.pooled})")
            )
        if info.st_size < entry.size:
            problems.append((Unmappable, f"{info.st_size} bytes where the blob says {entry.size}"))
        elif info.st_size > entry.size and not entry.pooled:
            # Not unsafe to map, but memory the broker does not account for.
            problems.append(
                (Unaccounted, f"{info.st_size} bytes, more than the {entry.size} accounted")
            )
        # Every page of the blob allocated: reading a missing one would allocate it, charged
        # to the reader. A pool slot may be larger than its blob, and a reader reads only the
        # blob: fewer blocks than the blob's pages is sparse for sure, which is what is checked.
        # (Not SEEK_HOLE: tmpfs calls a page that fallocate allocated but nobody wrote a hole.)
        pages = -(-min(entry.size, info.st_size) // mmap.PAGESIZE) * mmap.PAGESIZE
        if info.st_blocks * 512 < pages:
            allocated = info.st_blocks * 512
            problems.append((Sparse, f"sparse: {allocated} of its {entry.size} bytes allocated"))
        if problems:
            what = "; ".join(message for _, message in problems)
            self.unsafe.append((problems[0][0], f"get of blob {entry.id}: {what}"))

    # -- actions -------------------------------------------------------------------------------

    def _key(self, index: int | None) -> str | None:
        return None if index is None else self.keys[index]

    def _blob_id(self, target: int) -> uuid.UUID:
        if self.known and target < 9:
            return self.known[target % len(self.known)]
        return uuid.uuid4()

    def _do(self, conn: Conn, action: Action) -> None:
        raw = conn.raw
        match action:
            case PutFd():
                self._put(conn, action)
            case Fill():
                self._fill(conn, action)
            case CreateBlob(size=size, key=key, lease_ms=lease_ms):
                rid = raw.next_rid()
                conn.creates.add(rid)
                self._send(conn, Create(rid=rid, size=size, key=self._key(key), lease_ms=lease_ms))
            case OnCreated():
                self._on_created(conn, action)
            case Targeted():
                self._targeted(conn, action)
            case Plain(op=op):
                self._send(conn, _plain(op, raw.next_rid()))
            case WrongFds(op=op, kinds=kinds):
                request = _plain(op, raw.next_rid(), key=self.keys[0])
                with fds_of(kinds, 4096, self.folder) as fds:
                    self._send(conn, request, fds)
            case BadPayload(data=data, kinds=kinds):
                with fds_of(kinds, 4096, self.folder) as fds:
                    raw.send_request(data, fds)
                self._after(conn, None)
            case BadFrame():
                self._bad_frame(conn, action)
                self._after(conn, None)
            case Flood():
                self._flood(conn, action)
            case Read():
                for received in raw.drain(conn.keep()):
                    self._absorb(conn, received)
            case Close(how="close"):
                raw.close()
            case Close(how=how):
                try:
                    raw.sock.shutdown(socket.SHUT_WR if how == "shutdown-write" else socket.SHUT_RD)
                except OSError:
                    pass

    def _put(self, conn: Conn, action: PutFd) -> None:
        put = Put(
            rid=conn.raw.next_rid(),
            size=action.size,
            key=self._key(action.key),
            lease_ms=action.lease_ms,
            pooled=action.pooled,
        )
        with fds_of([action.kind], _fd_size(action.size, action.fit), self.folder) as fds:
            got = self._send(conn, put, fds)
        if got is not None and isinstance(got.reply, BlobReply):
            self._read_back(conn, got.reply.blob.id)

    def _flood(self, conn: Conn, action: Flood) -> None:
        """Requests without reading in between; it stops where the socket is full."""
        last = None
        for _ in range(action.count):
            rid = conn.raw.next_rid()
            if action.what == "stats":
                request: Request = Stats(rid=rid)
            else:  # a key nobody will use: it waits until the connection ends
                request = Get(rid=rid, key=f"nobody-{rid}", timeout_ms=60_000)
            if not conn.raw.send_request(request):
                break
            last = rid
        self._after(conn, last if action.what == "stats" else None, timeout=2 * REPLY_S)

    def _fill(self, conn: Conn, action: Fill) -> None:
        rid = conn.raw.next_rid()
        conn.creates.add(rid)
        create = Create(rid=rid, size=action.size, key=self._key(action.key))
        if not conn.raw.send_request(create) or not conn.plan.reads:
            return
        got, seen = conn.raw.wait_for(rid, REPLY_S, conn.keep())
        for received in seen:
            self._absorb(conn, received)
        if got is None or not isinstance(got.reply, BlobReply):
            return
        index = next(
            (i for i, blob in enumerate(conn.created) if blob.id == got.reply.blob.id), None
        )
        if index is None:
            return
        self._on_created(conn, OnCreated(index, "write"))
        if action.tamper != "none":
            self._on_created(conn, OnCreated(index, action.tamper))
        sealed = self._send(conn, Seal(rid=conn.raw.next_rid(), id=got.reply.blob.id))
        if sealed is not None and isinstance(sealed.reply, Ok):
            self._read_back(conn, got.reply.blob.id)

    def _on_created(self, conn: Conn, action: OnCreated) -> None:
        if not conn.created:
            return
        blob = conn.created[action.blob % len(conn.created)]
        how, fd = action.how, blob.fd
        if how == "seal":
            self._send(conn, Seal(rid=conn.raw.next_rid(), id=blob.id))
        elif how == "unmap":
            if blob.maps:
                blob.maps.pop().close()
        elif fd is None:
            return
        elif how == "close-fd":
            os.close(fd)
            blob.fd = None
        else:
            try:
                if how == "write":
                    os.pwrite(fd, _PATTERN[: min(blob.size, 4096)], 0)
                elif how == "shrink":
                    os.ftruncate(fd, blob.size // 2)
                elif how == "grow":
                    os.ftruncate(fd, blob.size * 2 + 4096)
                elif (length := os.fstat(fd).st_size) > 0:  # map: held, never touched
                    blob.maps.append(mmap.mmap(fd, length))
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EACCES, errno.EBUSY):
                    raise

    def _targeted(self, conn: Conn, action: Targeted) -> None:
        rid = conn.raw.next_rid()
        blob_id = self._blob_id(action.target)
        key = self.keys[action.target % KEYS] if action.by_key else None
        named: dict[str, object] = {"key": key} if key is not None else {"id": blob_id}
        number = action.timeout_ms or None  # a lease or ttl of 0 is not a thing
        match action.op:
            case "get":
                conn.gets.add(rid)
                prompt = action.timeout_ms is not None and action.timeout_ms < REPLY_S * 1000
                get = msgspec.convert({"rid": rid, "timeout_ms": action.timeout_ms, **named}, Get)
                self._send(conn, get, reply=prompt)
            case "release":
                self._send(conn, Release(rid=rid, id=blob_id, ack=action.ack), reply=action.ack)
            case "delete":
                delete = msgspec.convert({"rid": rid, "ack": action.ack, **named}, Delete)
                self._send(conn, delete, reply=action.ack)
            case "renew":
                self._send(conn, msgspec.convert({"rid": rid, "lease_ms": number, **named}, Renew))
            case "mint":
                self._send(
                    conn, msgspec.convert({"rid": rid, "ttl_ms": number, **named}, MintToken)
                )
            case _:
                self._send(conn, Seal(rid=rid, id=blob_id))

    def _bad_frame(self, conn: Conn, action: BadFrame) -> None:
        raw, how, data = conn.raw, action.how, action.data
        kinds: Sequence[FdKind] = action.kinds
        if how in ("header-fewer-fds", "too-many-fds", "handoff") and not kinds:
            kinds = ("sealed",)
        with fds_of(kinds, 4096, self.folder) as fds:
            stats = protocol.encode(Stats(rid=raw.next_rid()))
            payload = msgspec.msgpack.encode(
                {"type": "payload", "id": raw.wire_id + 1, "data": stats}
            )
            if how == "garbage":
                raw.send_datagram(data, fds)
            elif how == "short":
                raw.send_datagram(frame(payload, len(fds))[:5], fds)
            elif how == "wrong-magic":
                raw.send_datagram(b"XX" + frame(payload, len(fds))[2:], fds)
            elif how == "wrong-version":
                raw.send_datagram(HEADER.pack(MAGIC, 7, len(fds), len(payload)) + payload, fds)
            elif how == "header-more-fds":
                raw.send_message(UserPayload(data=stats), fds, header_fds=len(fds) + 1)
            elif how == "header-fewer-fds":
                raw.send_message(UserPayload(data=stats), fds, header_fds=len(fds) - 1)
            elif how == "too-many-fds":
                raw.send_message(UserPayload(data=stats), [fds[0]] * (MAX_FDS_PER_MESSAGE + 1))
            elif how == "too-big":
                raw.send_datagram(frame(b"\x00" * (MAX_FRAME_SIZE + 16), len(fds)), fds)
            elif how == "trailing":
                raw.send_datagram(frame(payload, len(fds)) + data + b"\x00", fds)
            elif how == "empty":
                raw.send_datagram(b"", fds)
            elif how == "handoff":
                token = BlobToken(BlobId.new(), 4096)
                raw.send_message(BlobHandoff(token=token, fds=len(fds)), fds)
            elif how == "error-reply":
                raw.send_message(ErrorReply(reply_to=0, code="fuzz", message="bye"), fds)
            elif how == "ack":
                raw.send_message(WireAck(reply_to=1), fds)
            else:
                raw.wire_id = 0
                raw.send_message(UserPayload(data=stats), fds)


# -- the broker under test, and the properties -------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """What must come back to where it was once the random connections are gone."""

    fds: int
    clients: int
    bytes: int
    blobs: int
    waiting_gets: int
    references: int
    accounts: int

    @classmethod
    def of(cls, fds: int, stats: StatsEntry) -> Measure:
        return cls(
            fds=fds,
            clients=stats.clients,
            bytes=stats.bytes,
            blobs=stats.blobs,
            waiting_gets=stats.waiting_gets,
            references=stats.references,
            accounts=len(stats.accounts) + stats.accounts_omitted,
        )

    def differences(self, before: Measure) -> list[str]:
        return [
            f"{name} {getattr(before, name)} -> {getattr(self, name)}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(before, name)
        ]


class BrokerBroke(AssertionError):
    """(a), (b): the broker died or stopped serving a well-behaved client."""


class BrokerLeaked(AssertionError):
    """(c): fds or accounting did not come back after the random clients left."""


class BrokerBug(AssertionError):
    """(d): the broker logged an internal error."""


class UnsafeForReaders(AssertionError):
    """(e): a get handed out an fd a reader must not map as it is."""


class Unmappable(UnsafeForReaders):
    """(e): not a sealed regular file opened read-only, or shorter than the blob."""


class Unaccounted(UnsafeForReaders):
    """(e): a plain blob's memfd larger than the blob: memory the broker does not account for."""


class Sparse(UnsafeForReaders):
    """(e): pages missing, which a reader's first touch would allocate (and be charged for)."""


class Harness:
    """The module's broker (restarted when it dies), a watcher client, and what went wrong."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.fd_folder = os.path.join(folder, "fds")
        os.mkdir(self.fd_folder, 0o700)
        with open(os.path.join(self.fd_folder, "plain-file"), "wb") as plain:
            plain.write(b"plain")
        self.started = 0
        self.failures: list[str] = []  # broker deaths and wedges, across the module
        self.broker, self.watcher = self._start()
        self.log_offset = 0
        self.wedged = False

    def _start(self) -> tuple[Broker, BrokerClient]:
        self.started += 1
        broker = start(self.folder, name=f"b{self.started}.sock")
        try:
            watcher = connect_broker(broker.socket_path, timeout=PROBE_S, name="fuzz-watcher")
        except BaseException:
            broker.stop()
            raise
        return broker, watcher

    def ensure_broker(self) -> None:
        """A broker that serves: the same one, or a new one if it died or wedged."""
        if self.broker.alive() and not self.wedged:
            return
        self.watcher.close()
        self.broker.stop()
        self.broker, self.watcher = self._start()
        self.log_offset = 0
        self.wedged = False

    def close(self) -> int:
        self.watcher.close()
        return self.broker.stop()

    # -- looking -------------------------------------------------------------------------------

    def measure(self) -> Measure:
        return Measure.of(len(self.broker.fds()), self.watcher.stats())

    def fd_targets(self) -> dict[int, str]:
        targets = {}
        for fd in self.broker.fds():
            try:
                targets[fd] = os.readlink(f"/proc/{self.broker.pid}/fd/{fd}")
            except OSError:
                continue
        return targets

    def blob_ids(self, *, include_deleted: bool) -> set[uuid.UUID]:
        return {entry.id for entry in self.watcher.list(include_deleted=include_deleted)}

    def new_log(self) -> str:
        with open(self.broker.handle.log_path, "rb") as log:
            log.seek(self.log_offset)
            data = log.read()
        self.log_offset += len(data)
        return data.decode("utf-8", "replace")

    # -- the properties ------------------------------------------------------------------------

    def check_alive(self, when: str) -> None:
        if not self.broker.alive():
            status = self.broker.handle.process.returncode
            tail = self.new_log()[-3000:]
            self.failures.append(f"broker died {when} (status {status})")
            raise BrokerBroke(f"(a) the broker died {when}: exit status {status}\n{tail}")

    def probe(self) -> None:
        """(b): a well-behaved client puts a blob and gets it back by key, in time."""
        began = time.monotonic()
        key = f"probe-{uuid.uuid4().hex}"
        data = os.urandom(1000)
        try:
            with connect_broker(self.broker.socket_path, timeout=PROBE_S, name="probe") as client:
                entry = client.put_bytes(data, key=key)
                with client.get(key, timeout=PROBE_S) as mapped:
                    same = bytes(mapped.as_slice()) == data
                client.delete(entry.blob_id)
        except BlobError as exc:
            self._wedged(f"the probe failed: {type(exc).__name__}: {exc}", began)
        took = time.monotonic() - began
        if not same:
            raise BrokerBroke("(b) the probe got other bytes back than it put")
        if took > PROBE_S:
            self._wedged("the probe's round trip was slow", began)

    def _wedged(self, what: str, began: float) -> None:
        self.check_alive("while the probe ran")
        took = time.monotonic() - began
        self.wedged = True
        self.failures.append(f"broker wedged: {what}")
        raise BrokerBroke(f"(b) {what} after {took:.2f} s")

    def settle(self, before: Measure, before_fds: dict[int, str], blobs: set[uuid.UUID]) -> None:
        """(c): once every fuzz client is gone and its blobs deleted, nothing is left."""
        began = time.monotonic()
        deadline = began + SETTLE_S
        try:
            while self.watcher.stats().clients != before.clients:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            for blob_id in self.blob_ids(include_deleted=False) - blobs:
                try:
                    self.watcher.delete(blob_id)
                except BlobError:
                    pass  # gone meanwhile: a lease ran out
            last, last_change = self.measure(), time.monotonic()
            while last != before:
                now = time.monotonic()
                if now > deadline or (
                    now - last_change > STABLE_S and last.clients == before.clients
                ):
                    break
                time.sleep(0.02)
                current = self.measure()
                if current != last:
                    last, last_change = current, time.monotonic()
        except BlobError as exc:
            self.check_alive("while settling")
            self.wedged = True
            self.failures.append(f"broker wedged: the watcher failed: {exc}")
            raise BrokerBroke(f"(b) the watcher failed: {type(exc).__name__}: {exc}") from exc
        if last == before:
            return
        extra = {fd: target for fd, target in self.fd_targets().items() if fd not in before_fds}
        took = time.monotonic() - began
        message = (
            f"(c) {took:.2f} s after the fuzz clients left: {', '.join(last.differences(before))}"
            + (f"; fds not there before: {extra}" if extra else "")
        )
        if last.fds != before.fds:
            raise BrokerLeaked("fds: " + message)
        raise BrokerLeaked("accounting: " + message)

    def check_log(self) -> None:
        """(d): no request ended in an internal error."""
        text = self.new_log()
        for marker in ("internal_error", "Traceback"):
            where = text.find(marker)
            if where >= 0:
                start = text.rfind("\n", 0, where) + 1
                raise BrokerBug(f"(d) the broker logged an internal error:\n{text[start:][:3000]}")


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    folder = tempfile.mkdtemp(prefix="bp-fuzz-")
    try:
        running = Harness(folder)
        try:
            yield running
        finally:
            status = running.close()
            log = running.broker.log()
        assert status == 0, f"the broker exited with status {status}\n{log[-3000:]}"
        assert not running.failures, running.failures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def play(harness: Harness, example: Example) -> None:
    """One example, then the properties (a) to (f)."""
    harness.ensure_broker()
    harness.new_log()  # what earlier examples logged is theirs
    before = harness.measure()
    before_fds = harness.fd_targets()
    blobs = harness.blob_ids(include_deleted=True)
    ours = Snapshot.take()
    game = Play(harness.broker.socket_path, harness.fd_folder, example)
    try:
        game.run()
        harness.check_alive("during the example")
        harness.probe()
    finally:
        game.close()
    harness.settle(before, before_fds, blobs)
    harness.check_alive("after the example")
    harness.check_log()
    if game.unsafe:
        # One class per kind of problem, so that Hypothesis reports (and shrinks) each.
        raise game.unsafe[0][0]("(e) " + "\n".join(message for _, message in game.unsafe))
    leaks = Snapshot.take().leaks_since(ours)
    assert not leaks, "(f) the test process leaked: " + "; ".join(leaks)


def test_random_peers_cost_the_broker_nothing(harness: Harness) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        # Not Phase.explain: it replays each failure many times more, seconds apiece here.
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
    )
    @given(example=examples)
    def fuzz(example: Example) -> None:
        play(harness, example)

    until = time.monotonic() + SECONDS
    fuzz()
    while time.monotonic() < until:
        fuzz()
