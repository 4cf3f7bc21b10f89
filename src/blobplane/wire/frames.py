"""Framing: cut received bytes into frames and give each frame the fds that came with it.

A frame is an 8-byte header and a payload (one encoded message)::

    magic "BP" | version u8 | fd count u8 | payload length u32 (big-endian)

Two framers share the header. `DatagramFramer` is for SOCK_SEQPACKET, where
every datagram is exactly one frame and its fds. `StreamFramer` is for
SOCK_STREAM, where frames are cut from a byte stream and the kernel hands
out fds together with the chunk of bytes that holds the first byte of the
sendmsg() they were sent with; the rule it checks is therefore "the fds of a
chunk belong to the frames that start inside that chunk, in order".

Framers own every fd they were fed until a frame hands them out; on a
violation the caller calls `close_all()`.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from blobplane.errors import RemoteProtocolError

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_FDS_PER_MESSAGE",
    "MAX_FRAME_SIZE",
    "SCM_MAX_FD",
    "VERSION",
    "DatagramFramer",
    "Frame",
    "Limits",
    "StreamFramer",
    "datagram_payload",
    "pack_header",
]

MAGIC = b"BP"
VERSION = 1
HEADER = struct.Struct(">2sBBI")
HEADER_SIZE = HEADER.size
# Control messages are small: the largest is a handoff with its metadata.
MAX_FRAME_SIZE = 64 * 1024
MAX_FDS_PER_MESSAGE = 16
# The kernel's own cap on fds in one SCM_RIGHTS message.
SCM_MAX_FD = 253

CloseFd = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits against abuse, part of the protocol: a bigger frame or more fds is an error."""

    max_frame_size: int = MAX_FRAME_SIZE
    max_fds: int = MAX_FDS_PER_MESSAGE

    def __post_init__(self) -> None:
        if not HEADER_SIZE < self.max_frame_size <= HEADER_SIZE + 2**32 - 1:
            raise ValueError(
                f"max_frame_size must be between {HEADER_SIZE + 1} and {2**32 + HEADER_SIZE - 1}"
            )
        if not 0 <= self.max_fds <= SCM_MAX_FD:
            raise ValueError(f"max_fds must be between 0 and {SCM_MAX_FD}")


def pack_header(buffer: bytearray, fd_count: int) -> None:
    """Fill the first HEADER_SIZE bytes of *buffer*; the payload is everything after them."""
    HEADER.pack_into(buffer, 0, MAGIC, VERSION, fd_count, len(buffer) - HEADER_SIZE)


def parse_header(data: bytes | bytearray | memoryview, limits: Limits) -> tuple[int, int]:
    """The fd count and payload length of the frame at the start of *data*, validated."""
    magic, version, fd_count, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RemoteProtocolError(
            f"not a blobplane frame: it starts with {bytes(data[:HEADER_SIZE])!r}, "
            f"expected the magic {MAGIC!r}"
        )
    if version != VERSION:
        raise RemoteProtocolError(
            f"protocol version mismatch: the peer speaks version {version}, "
            f"this side speaks version {VERSION}"
        )
    if fd_count > limits.max_fds:
        raise RemoteProtocolError(
            f"a frame announces {fd_count} fds, over the per-message maximum of {limits.max_fds}"
        )
    if HEADER_SIZE + length > limits.max_frame_size:
        raise RemoteProtocolError(
            f"a frame of {HEADER_SIZE + length} bytes is over the maximum frame size "
            f"of {limits.max_frame_size} bytes"
        )
    return fd_count, length


@dataclass(slots=True)
class Frame:
    """One frame's payload and the fds that rode with it (the receiver owns them now)."""

    payload: bytes | bytearray | memoryview
    fds: list[int]


def _close_each(fds: list[int], close_fd: CloseFd) -> None:
    while fds:
        fd = fds.pop()
        try:
            close_fd(fd)
        except OSError:
            pass  # already gone: closing must always complete


def datagram_payload(
    data: bytes | bytearray | memoryview, fd_count: int, truncated: bool, limits: Limits
) -> bytes | bytearray | memoryview:
    """The payload of the datagram *data*, which *fd_count* fds came with, if it is one whole frame.

    A slice of *data* (a view, if *data* is one). Raises `RemoteProtocolError`
    saying what is wrong otherwise: cut short (*truncated*: MSG_TRUNC), too
    many fds, a bad header, a length or fd count other than the header says.
    """
    size = len(data)
    # Every datagram received comes here: the usual verdict, a whole frame,
    # first, from the checks below in one expression; anything else goes
    # through them one by one, which say what is wrong.
    if size >= HEADER_SIZE and not truncated:
        magic, version, announced, length = HEADER.unpack_from(data)
        if (
            magic == MAGIC
            and version == VERSION
            and announced == fd_count <= limits.max_fds
            and HEADER_SIZE + length == size <= limits.max_frame_size
        ):
            return data[HEADER_SIZE:]
    if truncated:
        raise RemoteProtocolError(
            f"a datagram longer than the maximum frame size of "
            f"{limits.max_frame_size} bytes (cut short: MSG_TRUNC)"
        )
    if fd_count > limits.max_fds:
        raise RemoteProtocolError(
            f"{fd_count} fds arrived with one message, over the per-message maximum "
            f"of {limits.max_fds}"
        )
    if size < HEADER_SIZE:
        raise RemoteProtocolError(
            f"truncated frame: a datagram of {size} bytes cannot hold the {HEADER_SIZE}-byte header"
        )
    announced, length = parse_header(data, limits)
    total = HEADER_SIZE + length
    if size < total:
        raise RemoteProtocolError(
            f"truncated frame: the header announces {total} bytes, the datagram holds {size}"
        )
    if size > total:
        raise RemoteProtocolError(
            f"{size - total} bytes of trailing data after a {total}-byte frame in one datagram"
        )
    if fd_count != announced:
        raise RemoteProtocolError(
            f"fd count mismatch: the frame announces {announced} fds, {fd_count} arrived with it"
        )
    return data[HEADER_SIZE:]


class DatagramFramer:
    """One frame per datagram: its length and its fds must match the header exactly."""

    def __init__(self, limits: Limits, close_fd: CloseFd) -> None:
        self._limits = limits
        self._close_fd = close_fd
        self._queue: deque[tuple[bytes, list[int], bool]] = deque()
        self._eof = False
        self._rejected: list[int] = []
        # Whether `next_frame()` has a datagram (or the end of stream) to report:
        # an attribute, as the connection asks before every datagram.
        self.has_frames = False

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._queue

    @property
    def owned_fds(self) -> int:
        return len(self._rejected) + sum(len(entry[1]) for entry in self._queue)

    def feed(self, data: bytes | bytearray | memoryview, fds: list[int], truncated: bool) -> None:
        if not data and not fds and not truncated:
            self._eof = True
        else:
            self._queue.append((bytes(data), fds, truncated))
        self.has_frames = True

    def next_frame(self) -> Frame | None:
        if not self._queue:
            return None
        data, fds, truncated = self._queue.popleft()
        self.has_frames = bool(self._queue) or self._eof
        # Owned here until the frame is handed out, so close_all() finds them on error.
        self._rejected = fds
        payload = datagram_payload(data, len(fds), truncated, self._limits)
        self._rejected = []
        return Frame(payload, fds)

    def close_all(self) -> None:
        _close_each(self._rejected, self._close_fd)
        while self._queue:
            _close_each(self._queue.popleft()[1], self._close_fd)
        self.has_frames = self._eof


@dataclass(slots=True)
class _Batch:
    """The fds received with the stream bytes [start, end)."""

    start: int
    end: int
    fds: list[int] = field(default_factory=list)


class StreamFramer:
    """Frames cut from a byte stream; fds matched to frames by stream position."""

    def __init__(self, limits: Limits, close_fd: CloseFd) -> None:
        self._limits = limits
        self._close_fd = close_fd
        self._buffer = bytearray()
        self._start = 0  # stream position of _buffer[0], the next frame's first byte
        self._received = 0  # stream position after the last byte fed
        self._batches: deque[_Batch] = deque()
        self._header: tuple[int, int] | None = None
        self._claimed: list[int] = []
        self._eof = False
        # Conservatively True: a chunk may hold several frames, and checks run per frame.
        self.has_frames = True

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    @property
    def owned_fds(self) -> int:
        return len(self._claimed) + sum(len(batch.fds) for batch in self._batches)

    def feed(self, data: bytes | bytearray | memoryview, fds: list[int], truncated: bool) -> None:
        # `truncated` cannot happen on a stream; nothing is cut.
        start = self._received
        self._received += len(data)
        if fds:
            self._batches.append(_Batch(start, self._received, fds))
        if not data and not fds:
            self._eof = True
        self._buffer += data

    def next_frame(self) -> Frame | None:
        self._check_batches()
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                self._orphans_up_to(self._start)
                if self._eof:
                    self._at_eof_check(HEADER_SIZE)
                return None
            fd_count, length = parse_header(self._buffer, self._limits)
            self._header = (fd_count, length)
            self._claim(fd_count, self._start + HEADER_SIZE + length)
        fd_count, length = self._header
        total = HEADER_SIZE + length
        if len(self._buffer) < total:
            if self._eof:
                self._at_eof_check(total)
            return None
        payload = bytes(self._buffer[HEADER_SIZE:total])
        del self._buffer[:total]
        self._start += total
        self._header = None
        fds, self._claimed = self._claimed, []
        return Frame(payload, fds)

    def _check_batches(self) -> None:
        pending = len(self._claimed)
        for batch in self._batches:
            if len(batch.fds) > self._limits.max_fds:
                raise RemoteProtocolError(
                    f"{len(batch.fds)} fds arrived with one chunk of the stream, over the "
                    f"per-message maximum of {self._limits.max_fds}"
                )
            pending += len(batch.fds)
        # A legitimate peer has at most the fds of two messages in flight here.
        if pending > 2 * max(self._limits.max_fds, 1):
            raise RemoteProtocolError(
                f"{pending} fds arrived that no complete frame has claimed yet "
                f"(more than two messages' worth of {self._limits.max_fds})"
            )

    def _claim(self, fd_count: int, frame_end: int) -> None:
        self._orphans_up_to(self._start)
        if fd_count:
            head = self._batches[0] if self._batches else None
            if head is None or not head.start <= self._start < head.end:
                raise RemoteProtocolError(
                    f"fd count mismatch: the frame at stream byte {self._start} announces "
                    f"{fd_count} fds, none arrived with its first byte"
                )
            if len(head.fds) < fd_count:
                raise RemoteProtocolError(
                    f"fd count mismatch: the frame at stream byte {self._start} announces "
                    f"{fd_count} fds, {len(head.fds)} arrived with it"
                )
            self._claimed = head.fds[:fd_count]
            del head.fds[:fd_count]
        # Fds that came with bytes ending inside this frame cannot belong to a later one.
        self._orphans_up_to(frame_end)

    def _orphans_up_to(self, position: int) -> None:
        while self._batches and self._batches[0].end <= position:
            batch = self._batches[0]
            if batch.fds:
                raise RemoteProtocolError(
                    f"fd count mismatch: {len(batch.fds)} fds arrived with stream bytes "
                    f"{batch.start}-{batch.end} that no frame announced"
                )
            self._batches.popleft()
        # Batches later in the queue may still hold fds for a frame not parsed yet.

    def _at_eof_check(self, expected: int) -> None:
        if self._buffer:
            what = "header" if self._header is None else "frame"
            raise RemoteProtocolError(
                f"truncated frame: the stream ended {len(self._buffer)} bytes into "
                f"a {expected}-byte {what}"
            )
        self._orphans_up_to(self._received + 1)

    def close_all(self) -> None:
        _close_each(self._claimed, self._close_fd)
        while self._batches:
            _close_each(self._batches.popleft().fds, self._close_fd)
