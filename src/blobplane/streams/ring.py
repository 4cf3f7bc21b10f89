"""The per-subscriber frame ring: entries in shared memory, releases back, eventfd wake-ups.

Each subscriber gets, at Hello, two memfds and two eventfds made by the
publisher:

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

- the frame-ready eventfd (the publisher writes it after moving the head)
  and the released eventfd (the subscriber writes it after a release).

A slot is handed to a subscriber at most once at a time (the pool reuses it
only once every holder released it or it was taken back), so one release
mark per slot is enough, and a generation names one loan of it.

Counters (head, an entry's position, consumed, release marks) go through
memoryviews cast to "Q": one aligned 8-byte load or store each, which x86
never tears. Not `struct.pack_into`: it zeroes the bytes before writing
them, so a reader on another CPU can see 0 in between.

Ordering: the publisher writes an entry, then the head, then the eventfd; the
subscriber reads the head, then the entry. x86 keeps stores in order and
loads in order, and an eventfd write or read is a full barrier, so a reader
that saw the head sees the entry. Nobody sleeps on a stale check: the
waiting side polls the eventfd, whose counter stays non-zero from every write
until the waiter drains it, and re-checks the shared counters after each
wake-up, so a frame or release that lands between "nothing there" and
poll() makes poll() return at once.

Everything the subscriber reads from the ring is checked before use (the
publisher is a peer that may be broken): the head against what it consumed
and the ring's size, the entry's position, slot index, length, header size
and seq order. A bad entry raises `RemoteProtocolError`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from blobplane.backends.checks import check_received_fd
from blobplane.backends.mapping import map_readonly, map_writable, unmap_when_unused
from blobplane.errors import RemoteProtocolError, os_errors
from blobplane.pool import sealed_memfd
from blobplane.streams.protocol import MAX_HEADER, Frame

__all__ = [
    "ENTRIES_AT",
    "ENTRY",
    "ENTRY_SIZE",
    "PublisherRing",
    "SubscriberRing",
    "check_eventfd",
    "release_size",
    "ring_entries",
    "ring_size",
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


def check_eventfd(fd: int) -> None:
    """Refuse an fd that is not a non-blocking eventfd (a write to anything else could block)."""
    with os_errors(f"checking fd {fd}"):
        target = os.readlink(f"/proc/self/fd/{fd}")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if target != "anon_inode:[eventfd]" or not flags & os.O_NONBLOCK:
        raise RemoteProtocolError(f"fd {fd} is {target}, not a non-blocking eventfd")


def wake(fd: int) -> None:
    """Add one to an eventfd; a full counter (EAGAIN) already wakes the other side."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class PublisherRing:
    """The publisher's side of one subscriber's ring: it writes entries and reads releases."""

    __slots__ = (
        "entries",
        "ready",
        "release",
        "release_fd",
        "release_words",
        "released",
        "ring",
        "ring_fd",
        "seqs",
        "words",
        "written",
    )

    def __init__(self, name: str, slots: int) -> None:
        self.entries = ring_entries(slots)
        self.written = 0
        self.seqs = [0] * self.entries  # the frame in each entry
        self.ring_fd = self.release_fd = self.ready = self.released = -1
        made: list[tuple[int, mmap.mmap]] = []
        try:
            made.append(sealed_memfd(f"{name}:ring", ring_size(self.entries)))
            made.append(sealed_memfd(f"{name}:release", release_size(slots), RELEASE_SEALS))
            with os_errors("creating a stream's eventfds"):
                flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
                self.ready = os.eventfd(0, flags)
                self.released = os.eventfd(0, flags)
        except BaseException:
            for fd, mapped in made:
                os.close(fd)
                mapped.close()
            if self.ready >= 0:
                os.close(self.ready)
            raise
        (self.ring_fd, self.ring), (self.release_fd, self.release) = made
        self.words = memoryview(self.ring).cast("Q")
        self.release_words = memoryview(self.release).cast("Q")

    def hello_fds(self) -> tuple[int, int, int, int]:
        return self.ring_fd, self.release_fd, self.ready, self.released

    def forget_fds(self) -> None:
        """Close the memfds once sent: the mappings are all the publisher needs of them."""
        for fd in (self.ring_fd, self.release_fd):
            if fd >= 0:
                os.close(fd)
        self.ring_fd = self.release_fd = -1

    def close(self) -> None:
        if self.released < 0:
            return
        self.forget_fds()
        os.close(self.ready)
        os.close(self.released)
        self.ready = self.released = -1
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
        "ready",
        "released",
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
        ring_fd, release_fd, ready, released = fds
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
        self.ready = self.released = -1
        try:
            check_eventfd(ready)
            check_eventfd(released)
            size = ring_size(entries)
            check_received_fd(ring_fd, size)
            self._ring = map_readonly(ring_fd, size)
            assert self._ring is not None
            try:
                self._ring.madvise(MADV_POPULATE_READ)  # no first-touch faults on the hot path
            except OSError:
                pass  # an older kernel faults the pages in as they are read
            size = release_size(slots)
            check_received_fd(release_fd, size)
            self._release = map_writable(release_fd, size, prefault=True)
            assert self._release is not None
            self._words = memoryview(self._ring).cast("Q")
            self._release_words = memoryview(self._release).cast("Q")
            with os_errors("keeping a stream's eventfds"):
                self.ready = os.dup(ready)
                self.released = os.dup(released)
        except BaseException:
            self.close()
            raise

    def pending(self) -> bool:
        """Whether the publisher wrote an entry this subscriber has not taken yet."""
        words = self._words
        return words is not None and words[0] != self._consumed

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
                # the eventfd is written after that: wait for it, then look again.
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
        wake(self.released)

    def close(self) -> None:
        for fd in (self.ready, self.released):
            if fd >= 0:
                os.close(fd)
        self.ready = self.released = -1
        for view in (self._words, self._release_words):
            if view is not None:
                view.release()
        self._words = self._release_words = None
        unmap_when_unused(self._ring)
        unmap_when_unused(self._release)
        self._ring = self._release = None
