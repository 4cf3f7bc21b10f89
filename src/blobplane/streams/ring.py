"""The per-subscriber frame ring: entries in shared memory, releases back, a socket of wake-ups.

Each subscriber gets, at Hello, two memfds and one end of a socket pair made
by the publisher:

- the ring, written only by the publisher and sealed like pool slots
  (``F_SEAL_FUTURE_WRITE``: the subscriber can only map it read-only)::

      0        head: how many entries the publisher has written (u64)
      64 + i*ENTRY_SIZE   entry of position p, i = (p - 1) % entries:
               position, seq, slot, generation, length, sent_ns, unsent,
               header_len (u64 each), then up to MAX_HEADER header bytes

- the release area, written by the subscriber (sealed against shrinking and
  growing only, so it can write it and the publisher can never fault on
  it)::

      0        consumed: how many entries the subscriber has taken (u64)
      64 + 8*slot         the generation of the last frame of that slot it
                          released (u64), so receipts may close in any order

- the bell, a connected Unix stream socket pair: the publisher sends a byte
  after moving the head, the subscriber one after a release. Not eventfds: an
  fd passed over SCM_RIGHTS shares its open file description, O_NONBLOCK
  included, so a peer could clear that flag and fill the counter, and the
  next eventfd write would block forever. Every send and recv on the bell
  passes MSG_DONTWAIT instead, which no peer can take away.

A slot is handed to a subscriber at most once at a time (the pool reuses it
only once every holder released it or it was taken back), so one release
mark per slot is enough, and a generation names one loan of it.

Counters (head, an entry's position, consumed, release marks) go through
memoryviews cast to "Q": one aligned 8-byte load or store each, which x86
never tears. Not `struct.pack_into`: it zeroes the bytes before writing
them, so a reader on another CPU can see 0 in between.

Ordering: the publisher writes an entry, then the head, then the bell; the
subscriber reads the head, then the entry. x86 keeps stores in order and
loads in order, and a socket send or recv is a full barrier, so a reader
that saw the head sees the entry. Nobody sleeps on a stale check: the
waiting side polls the bell, which stays readable from every send until the
waiter drains it, and re-checks the shared counters after each wake-up, so
a frame or release that lands between "nothing there" and poll() makes
poll() return at once.

An entry is rewritten in place only under DROP_OLDEST, as a seqlock: the
publisher stores position 0, the fields, then the new position; the reader
copies the fields out and accepts them only if the position it reads again
afterwards is still the one it expected.

Everything the subscriber reads from the ring is checked before use (the
publisher is a peer that may be broken): the head against what it consumed
and the ring's size, the entry's position, slot index, length, header size
and seq order. A bad entry raises `RemoteProtocolError`.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import platform
import socket
import stat
import struct
import time
from collections.abc import Callable

from blobplane.backends.checks import (
    F_SEAL_FUTURE_WRITE,
    check_received_fd,
    describe_kind,
    get_seals,
)
from blobplane.backends.mapping import map_readonly, map_writable, unmap_when_unused
from blobplane.errors import RemoteProtocolError, WrongKind, os_errors
from blobplane.pool import sealed_memfd
from blobplane.streams.protocol import MAX_HEADER, Frame
from blobplane.types import is_number

__all__ = [
    "ENTRIES_AT",
    "ENTRY",
    "ENTRY_SIZE",
    "RELEASED_WORD",
    "PublisherRing",
    "SubscriberRing",
    "answer_bell",
    "check_bell",
    "release_size",
    "require_ordered_memory",
    "ring_bell",
    "ring_entries",
    "ring_size",
    "spin",
]

WORD = 8  # every counter is one aligned u64, read and written through a "Q" memoryview
ENTRY = struct.Struct("<QQQQQqQQ")  # position seq slot generation length sent_ns unsent header_len
ENTRY_SIZE = ENTRY.size + MAX_HEADER
ENTRIES_AT = 64  # head alone on the first cache line
RELEASED_AT = 64  # consumed alone on the first cache line
RELEASED_WORD = RELEASED_AT // WORD
MADV_POPULATE_READ = 22
# Seals of the release area: fixed size (no SIGBUS for the publisher), writable by the subscriber.
RELEASE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


# Machines whose CPUs keep stores in order and loads in order (total store order).
TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686"})


def require_ordered_memory(machine: str | None = None) -> None:
    """Refuse to run the ring where its ordering argument does not hold.

    Python has no memory fences, and the ring's reader trusts that seeing the
    head means seeing the entry written before it (see the module's
    docstring). On CPUs with weaker ordering (ARM, POWER, RISC-V) that is
    not guaranteed, so a reader could take a half-visible entry.
    """
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in TSO_MACHINES:
        raise NotImplementedError(
            f"blobplane streams need an x86 CPU for now: the frame ring relies on x86's store "
            f"and load ordering, and this machine is {machine or 'unknown'!r}; pass frames "
            "with a channel and a BlobPool (ch.loan(pool), send_blob) instead"
        )


# Spinning (``spin_us=``). A look at a counter costs tens of nanoseconds, the
# clock about as much again: look at the clock only every SPIN_LOOKS looks.
SPIN_LOOKS = 32
# Past this, a spinner yields the CPU at every look at the clock. On two CPUs
# the publisher and a subscriber often share one (with a third process busy on
# the other), and a spinner that keeps the CPU keeps its peer from writing what
# it waits for: each side then spun out its whole budget every frame (a 4 KiB
# round trip of ~4x spin_us). A back-to-back frame comes well within this, so
# the common case never makes the system call.
SPIN_CALM_NS = 5_000


def spin(looks: Callable[[], bool], spin_ns: int) -> bool:
    """Call *looks* (one cheap check, no system call) until it returns True or
    *spin_ns* have passed; whether it did."""
    clock = time.monotonic_ns
    start = clock()
    end, calm = start + spin_ns, start + SPIN_CALM_NS
    tries = range(SPIN_LOOKS)
    while True:
        for _ in tries:
            if looks():
                return True
        now = clock()
        if now >= end:
            return False
        if now >= calm:
            os.sched_yield()


def _round_up(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def ring_entries(slots: int) -> int:
    """Entries per ring: under BLOCK a subscriber never has more than *slots* unread entries
    (each holds a slot); the spare ones buffer DROP_OLDEST frames for a slow subscriber."""
    return max(16, 2 * slots)


def ring_size(entries: int) -> int:
    return _round_up(ENTRIES_AT + entries * ENTRY_SIZE)


def release_size(slots: int) -> int:
    return _round_up(RELEASED_AT + WORD * slots)


def check_bell(fd: int) -> None:
    """Refuse an fd that is not a connected Unix stream socket."""
    with os_errors(f"checking fd {fd}"):
        mode = os.fstat(fd).st_mode
    if not stat.S_ISSOCK(mode):
        raise WrongKind(f"fd {fd} is {describe_kind(mode)}, not a stream's bell (a socket)")
    with socket.socket(fileno=os.dup(fd)) as sock:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise WrongKind(
                f"fd {fd} is a socket of family {sock.family.name}, type {sock.type.name}; "
                "a bell is AF_UNIX, SOCK_STREAM"
            )
        try:
            sock.getpeername()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            raise WrongKind(f"fd {fd} is a socket connected to nothing, not a bell") from None


def _bell_socket(fd: int) -> socket.socket:
    """A socket object of our own over *fd* (taken over) that never waits in Python."""
    sock = socket.socket(fileno=fd)
    # A global socket.setdefaulttimeout() would make Python poll on EAGAIN.
    sock.settimeout(None)
    return sock


def ring_bell(bell: socket.socket) -> None:
    """Wake the other side; never blocks, whatever the peer did to the socket."""
    try:
        bell.send(b"\0", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except BlockingIOError:
        pass  # full: the other side has wake-ups waiting already
    except OSError:
        pass  # its end is gone: its hang-up ends the stream (see `answer_bell`)


def answer_bell(bell: socket.socket) -> bool:
    """Drain the wake-ups sent so far; False once the other side closed its end."""
    try:
        return bool(bell.recv(4096, socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True
    except OSError:
        return False


class PublisherRing:
    """The publisher's side of one subscriber's ring: it writes entries and reads releases."""

    __slots__ = (
        "bell",
        "entries",
        "release",
        "release_fd",
        "release_words",
        "ring",
        "ring_fd",
        "seqs",
        "their_bell",
        "words",
        "written",
    )

    def __init__(self, name: str, slots: int) -> None:
        self.entries = ring_entries(slots)
        self.written = 0
        self.seqs = [0] * self.entries  # the frame in each entry
        self.ring_fd = self.release_fd = -1
        made: list[tuple[int, mmap.mmap]] = []
        try:
            made.append(sealed_memfd(f"{name}:ring", ring_size(self.entries)))
            made.append(sealed_memfd(f"{name}:release", release_size(slots), RELEASE_SEALS))
            with os_errors("creating a stream's bell"):
                self.bell, self.their_bell = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            for fd, mapped in made:
                os.close(fd)
                mapped.close()
            raise
        self.bell.settimeout(None)  # see _bell_socket
        (self.ring_fd, self.ring), (self.release_fd, self.release) = made
        self.words = memoryview(self.ring).cast("Q")
        self.release_words = memoryview(self.release).cast("Q")

    def hello_fds(self) -> tuple[int, int, int]:
        return self.ring_fd, self.release_fd, self.their_bell.fileno()

    def forget_fds(self) -> None:
        """Close what was sent: the mappings and our end of the bell are all we need."""
        for fd in (self.ring_fd, self.release_fd):
            if fd >= 0:
                os.close(fd)
        self.ring_fd = self.release_fd = -1
        self.their_bell.close()

    def full(self) -> bool:
        """Whether the next entry would overwrite one the subscriber has not taken."""
        return self.written - self.entries >= self.release_words[0]

    def next_overwritten(self) -> int:
        """The frame in the entry the next write reuses (0: none yet)."""
        return self.seqs[self.written % self.entries]

    def write(self, frame: Frame, unsent: int) -> None:
        """Put *frame* in the next entry, with *unsent* (not ``frame.unsent``: that is
        per subscriber), move the head, wake the subscriber."""
        seq, header = frame.seq, frame.header
        position = self.written + 1
        index = self.written % self.entries
        at = ENTRIES_AT + index * ENTRY_SIZE
        memory, words = self.ring, self.words
        # Position 0 first, the real one last: a reader that raced an overwrite
        # sees a position that is not the one it expected (see the module doc).
        words[at // WORD] = 0
        ENTRY.pack_into(
            memory,
            at,
            0,
            seq,
            frame.slot,
            frame.generation,
            frame.length,
            frame.sent_ns,
            unsent,
            len(header),
        )
        if header:
            memory[at + ENTRY.size : at + ENTRY.size + len(header)] = header
        words[at // WORD] = position
        self.seqs[index] = seq
        words[0] = position
        self.written = position
        ring_bell(self.bell)

    def close(self) -> None:
        if self.bell.fileno() < 0:
            return
        self.forget_fds()
        self.bell.close()
        self.words.release()
        self.release_words.release()
        unmap_when_unused(self.ring)
        unmap_when_unused(self.release)


class SubscriberRing:
    """The subscriber's side: checked entries out of the ring, release marks into its area."""

    __slots__ = (
        "_consumed",
        "_entries",
        "_last_seq",
        "_overwrites",
        "_release",
        "_release_words",
        "_ring",
        "_slot_size",
        "_slots",
        "_words",
        "bell",
    )

    def __init__(
        self,
        fds: tuple[int, ...],
        entries: int,
        slots: int,
        slot_size: int,
        *,
        overwrites: bool,
    ) -> None:
        """Map the ring and release area from Hello's fds (borrowed: the caller closes them).

        *overwrites*: the publisher may reuse unread entries whose frames it
        took back (DROP_OLDEST); under BLOCK that would be a broken publisher.
        """
        ring_fd, release_fd, bell = fds
        self._entries = entries
        self._overwrites = overwrites
        self._slots = slots
        self._slot_size = slot_size
        self._consumed = 0
        self._last_seq = 0
        self._ring: mmap.mmap | None = None
        self._release: mmap.mmap | None = None
        self._words: memoryview | None = None
        self._release_words: memoryview | None = None
        self.bell: socket.socket | None = None
        try:
            check_bell(bell)
            size = ring_size(entries)
            info = check_received_fd(ring_fd, size)
            self._ring = map_readonly(ring_fd, size, info)
            assert self._ring is not None
            try:
                self._ring.madvise(MADV_POPULATE_READ)  # no first-touch faults on the hot path
            except OSError:
                pass  # an older kernel faults the pages in as they are read
            size = release_size(slots)
            check_received_fd(release_fd, size)
            with os_errors(f"reading the seals of fd {release_fd}"):
                seals = get_seals(release_fd) or 0
            if seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                raise RemoteProtocolError(
                    f"the release area (fd {release_fd}) is sealed against writes "
                    f"(seals=0x{seals:x}): this subscriber could never release a frame"
                )
            self._release = map_writable(release_fd, size, prefault=True)
            assert self._release is not None
            self._words = memoryview(self._ring).cast("Q")
            self._release_words = memoryview(self._release).cast("Q")
            with os_errors("keeping a stream's bell"):
                self.bell = _bell_socket(os.dup(bell))
        except BaseException:
            self.close()
            raise

    def pending(self) -> bool:
        """Whether the publisher wrote an entry this subscriber has not taken yet."""
        words = self._words
        return words is not None and words[0] != self._consumed

    def spin(self, spin_ns: int) -> bool:
        """Watch the head for up to *spin_ns* (see `spin`); whether an entry came."""
        words, consumed = self._words, self._consumed
        if words is None:
            return False
        return spin(lambda: words[0] != consumed, spin_ns)

    def take(self) -> tuple[Frame | None, int]:
        """The next entry as a checked `Frame` (None when the ring is empty), and how many
        entries the publisher overwrote before this subscriber got to them."""
        ring, words, release = self._ring, self._words, self._release_words
        if ring is None or words is None or release is None:
            return None, 0
        lost = 0
        consumed = self._consumed
        head = words[0]
        if head == consumed:
            return None, lost
        if head < consumed or (head > consumed + self._entries and not self._overwrites):
            raise RemoteProtocolError(
                f"the publisher moved the ring's head to {head} with {consumed} entries "
                f"taken of a ring of {self._entries}"
            )
        if head > consumed + self._entries:
            # DROP_OLDEST: the publisher reused entries whose frames it took back.
            lost += head - self._entries - consumed
            consumed = self._consumed = head - self._entries
            release[0] = consumed
        at = ENTRIES_AT + (consumed % self._entries) * ENTRY_SIZE
        position, seq, slot, generation, length, sent_ns, unsent, header_len = ENTRY.unpack_from(
            ring, at
        )
        header = ring[at + ENTRY.size : at + ENTRY.size + min(header_len, MAX_HEADER)]
        again = words[at // WORD]
        if again != position or position != consumed + 1:
            if self._overwrites and (
                position == 0 or again == 0 or position > consumed + 1 or again > consumed + 1
            ):
                # Overwritten as we read it (seqlock). Its head moves next, and
                # the bell rings after that: wait for it, then look again.
                return None, lost
            raise RemoteProtocolError(f"ring entry {consumed + 1} holds position {again}")
        problem = ""
        if slot >= self._slots:
            problem = f"names slot {slot} of a pool of {self._slots}"
        elif length > self._slot_size:
            problem = f"is {length} bytes long, its slot {self._slot_size}"
        elif header_len > MAX_HEADER:
            problem = f"has a {header_len}-byte header, more than {MAX_HEADER}"
        elif seq <= self._last_seq:
            problem = f"has frame number {seq} after {self._last_seq}"
        elif generation == 0:
            problem = "names generation 0"
        if problem:
            raise RemoteProtocolError(f"ring entry {consumed + 1} {problem}")
        # Only now may the publisher reuse the entry: everything needed is copied out.
        self._consumed = consumed + 1
        self._last_seq = seq
        release[0] = consumed + 1
        return Frame(seq, slot, generation, length, sent_ns, unsent, header), lost

    def mark_released(self, slot: int, generation: int) -> None:
        release = self._release_words
        if release is None:
            return  # closed: the publisher takes everything back when the socket goes
        release[RELEASED_WORD + slot] = generation
        if self.bell is not None:
            ring_bell(self.bell)

    def close(self) -> None:
        if self.bell is not None:
            self.bell.close()
            self.bell = None
        for view in (self._words, self._release_words):
            if view is not None:
                view.release()
        self._words = self._release_words = None
        unmap_when_unused(self._ring)
        unmap_when_unused(self._release)
        self._ring = self._release = None


def spin_ns_of(spin_us: float) -> int:
    """The ``spin_us=`` of a publisher or subscriber, checked, in nanoseconds."""
    if not is_number(spin_us) or not spin_us >= 0:
        raise ValueError(f"spin_us must be a number >= 0, not {spin_us!r}")
    return int(spin_us * 1000)
