"""The Arrow side of the Flight endpoint: the stream's schema, chunks as record batches, errors.

A blob travels as record batches of one ``binary`` column named ``data``, one
row per chunk of at most `config.DEFAULT_CHUNK_BYTES`: a Flight message may
not exceed 2 GiB, and 8-16 MiB batches are the fastest measured. A sender's
batch points straight into the blob's read-only mapping (`pyarrow.py_buffer`
over the `mmap`): nothing is copied before gRPC writes it to the socket. A
receiver accepts any number of rows per batch (a stock client may send a
table), of ``binary`` or ``large_binary``, without nulls, and reads their
bytes where Arrow put them (`chunk_view`).

Errors cross as Flight errors whose extra info names the `blobplane.errors`
class (`ErrorInfo`); the other side raises that class again.

gRPC takes a stream in through buffers it mallocs and frees for every few
MiB; with glibc's default thresholds those come fresh from the kernel each
time, and each of their pages is faulted in and zeroed before the bytes are
copied over. A broker that speaks Flight keeps them instead
(`keep_transfer_buffers`): 7 to 20% less CPU per GiB moved, both brokers
of a transfer together, measured on a 2-core VM.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from pyarrow import flight

from blobplane import errors
from blobplane.broker.flight.tickets import (
    ErrorInfo,
    StreamInfo,
    decode_error,
    decode_stream_info,
    encode,
    encode_stream_info,
)
from blobplane.broker.protocol import MAX_TEXT
from blobplane.errors import (
    BlobError,
    BlobNotFound,
    BrokerShutdown,
    PeerRefused,
    PeerUnreachable,
    RemoteProtocolError,
    RightMissing,
    Timeout,
    TokenRefused,
)

__all__ = [
    "FIELD",
    "batches",
    "chunk_view",
    "from_flight_error",
    "keep_transfer_buffers",
    "stream_info",
    "stream_schema",
    "to_flight_error",
]

FIELD = "data"
_TYPES = (pa.binary(), pa.large_binary())


def stream_schema(info: StreamInfo | None = None) -> Any:
    """The schema of a blob's stream; with *info*, carrying the blob's size, id and range."""
    metadata = None if info is None else encode_stream_info(info)
    return pa.schema([pa.field(FIELD, pa.binary(), nullable=False)], metadata=metadata)


def stream_info(schema: Any) -> StreamInfo:
    """What a DoGet stream's schema says; `RemoteProtocolError` unless it is one of ours."""
    check_schema(schema)
    return decode_stream_info(schema.metadata)


def check_schema(schema: Any) -> None:
    if len(schema) != 1 or schema.field(0).type not in _TYPES:
        raise RemoteProtocolError(
            f"a blob travels as one binary column named {FIELD!r}, not as {schema}"
        )


def batches(buffer: Any, start: int, end: int, chunk: int, schema: Any) -> Iterator[Any]:
    """Record batches of one row each over *buffer*[start:end], *chunk* bytes at most, no copy."""
    for offset in range(start, end, chunk):
        length = min(chunk, end - offset)
        offsets = pa.py_buffer(b"\0\0\0\0" + length.to_bytes(4, "little"))
        array = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, buffer.slice(offset, length)])
        yield pa.RecordBatch.from_arrays([array], schema=schema)


def chunk_view(batch: Any) -> memoryview:
    """The bytes of a received batch, where Arrow holds them; refuses what is not a chunk.

    The array is validated in full first (offsets in order and inside the data
    buffer), so a hostile sender's offsets cannot point the copy elsewhere.
    """
    if batch.num_columns != 1:
        raise RemoteProtocolError(f"a chunk has one column, not {batch.num_columns}")
    array = batch.column(0)
    if array.type not in _TYPES:
        raise RemoteProtocolError(f"a chunk is binary, not {array.type}")
    if len(array) == 0:
        return memoryview(b"")
    if array.null_count:
        raise RemoteProtocolError("a chunk holds no nulls")
    try:
        array.validate(full=True)
    except pa.ArrowException as exc:
        raise RemoteProtocolError(f"a malformed chunk: {exc}") from None
    _, offsets, data = array.buffers()
    if data is None:
        return memoryview(b"")
    # The rows lie back to back in the data buffer, from the first offset to the last.
    width = 4 if array.type == pa.binary() else 8
    raw = memoryview(offsets).cast("B")
    start = array.offset * width
    end = start + len(array) * width
    first = int.from_bytes(raw[start : start + width], "little", signed=True)
    last = int.from_bytes(raw[end : end + width], "little", signed=True)
    return memoryview(data).cast("B")[first:last]


# -- memory ----------------------------------------------------------------------------------

# glibc's mallopt parameters, and the values set: blocks up to 32 MiB (its largest mmap
# threshold) come from the heap rather than from mmap, and up to 64 MiB freed at the top of a
# heap stay there rather than going back to the kernel.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 << 20
_TRIM_THRESHOLD_BYTES = 64 << 20
_kept = False


def keep_transfer_buffers() -> None:
    """Have malloc keep the buffers gRPC frees during transfers (glibc only; once a process).

    What the process keeps is at most what it used at its peak, plus 64 MiB.
    """
    global _kept
    if _kept or not sys.platform.startswith("linux"):
        return
    _kept = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


# -- errors ----------------------------------------------------------------------------------

_ERRORS: dict[str, type[BlobError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, BlobError)
}


def to_flight_error(exc: BlobError) -> Exception:
    """The Flight error to raise in a handler for *exc*; its class name rides in extra info."""
    name = type(exc).__name__
    message = f"{name}: {exc}"[:MAX_TEXT]
    info = encode(ErrorInfo(error=name, message=str(exc)[:MAX_TEXT]))
    kind: type[Exception]
    if isinstance(exc, TokenRefused):
        kind = flight.FlightUnauthenticatedError
    elif isinstance(exc, RightMissing):
        kind = flight.FlightUnauthorizedError
    elif isinstance(exc, Timeout):
        kind = flight.FlightTimedOutError
    elif isinstance(exc, BrokerShutdown):
        kind = flight.FlightUnavailableError
    else:
        kind = flight.FlightServerError
    error: Exception = kind(message, info)
    return error


def _gist(exc: BaseException) -> str:
    """A Flight error's message without gRPC's debug context."""
    text = str(exc)
    for cut in (". Detail:", ". gRPC client debug context:", "gRPC client debug context:"):
        text = text.split(cut, 1)[0]
    return text.strip()[:500] or type(exc).__name__


def from_flight_error(exc: BaseException, where: str) -> BlobError:
    """The `BlobError` a peer's Flight error (or the transport's) stands for.

    An error the peer names (extra info) is raised as that class, unless it
    would be taken for one of this side's own errors; the transport's errors
    are `PeerUnreachable`, a timeout is `Timeout`.
    """
    raw = getattr(exc, "extra_info", None)
    info = decode_error(raw) if isinstance(raw, bytes) and raw else None
    if info is not None:
        kind = _ERRORS.get(info.error)
        if kind is not None and kind is not PeerRefused:
            return kind(f"{where}: {info.message}")
        return PeerRefused(f"{where} refused: {info.message} ({info.error})", code=info.error)
    gist = _gist(exc)
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return TokenRefused(f"{where} refused the token: {gist}")
    if isinstance(exc, flight.FlightUnauthorizedError):
        return RightMissing(f"{where} refused: {gist}")
    if isinstance(exc, flight.FlightTimedOutError):
        return Timeout(f"{where} did not answer in time: {gist}")
    if isinstance(exc, KeyError):
        return BlobNotFound(f"{where}: {gist}")
    if isinstance(exc, flight.FlightCancelledError):
        return PeerUnreachable(f"{where}: the transfer was cancelled ({gist})")
    if isinstance(exc, flight.FlightUnavailableError | flight.FlightError | pa.ArrowException):
        return PeerUnreachable(f"{where} is unreachable or failed: {gist}")
    return PeerUnreachable(f"{where} failed: {type(exc).__name__}: {gist}")
