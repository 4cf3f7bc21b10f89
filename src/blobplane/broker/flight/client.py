"""A blocking client of a broker's Flight endpoint: what peers, the CLI and the tests use.

`FlightBlobClient(url, token)` gets a small blob in one call (`get_inline`),
opens blobs as streams (`open`, which reads the stream's schema, so the size
is known before any byte), lists a broker's blobs (`list`) and uploads
(`put`). Everything the peer sends is checked: the schema or answer must be
a blob's, the range inside the blob, every chunk a binary column within the
declared length, and the stream must end exactly at it. Messages larger than
`config.MAX_MESSAGE_BYTES` are refused by gRPC before they are taken in whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyarrow import flight

from blobplane.broker.flight.address import FlightAddress, parse_address
from blobplane.broker.flight.arrow import (
    batches,
    chunk_view,
    from_flight_error,
    stream_info,
    stream_schema,
)
from blobplane.broker.flight.config import DEFAULT_CHUNK_BYTES, MAX_MESSAGE_BYTES, TlsFiles
from blobplane.broker.flight.tickets import (
    GET_ACTION,
    INLINE_GET_BYTES,
    MAX_ANSWER_BYTES,
    BlobTicket,
    PutCommand,
    PutResult,
    StreamInfo,
    decode_get_answer,
    decode_put_result,
    encode,
)
from blobplane.broker.protocol import check_key
from blobplane.errors import (
    BlobError,
    PeerUnreachable,
    RemoteProtocolError,
)
from blobplane.types import BlobId

__all__ = ["FlightBlobClient", "RemoteBlob", "RemoteEntry"]


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    """One blob a peer lists."""

    key: str | None
    id: BlobId
    size: int


class RemoteBlob:
    """An open DoGet stream: `info` (size, id, key, range) came first; then `chunks()`."""

    def __init__(self, reader: Any, info: StreamInfo, where: str) -> None:
        self._reader = reader
        self.info = info
        self.where = where
        self.received = 0  # bytes so far: read by a watchdog in another thread
        self.cancelled = False

    def chunks(self) -> Iterator[memoryview]:
        """The bytes as they come, each a view into Arrow's buffer, which the view keeps alive.

        Raises `PeerUnreachable` (or the peer's refusal) if the stream breaks,
        `RemoteProtocolError` if it sends more or other than it declared.
        """
        expected = self.info.length
        while True:
            try:
                chunk = self._reader.read_chunk()
            except StopIteration:
                break
            except (flight.FlightError, pa.ArrowException) as exc:
                raise self._broken(exc) from None
            if chunk.data is None:
                continue
            view = chunk_view(chunk.data)
            if self.received + len(view) > expected:
                self.cancel()
                raise RemoteProtocolError(
                    f"{self.where} sent more than the {expected} bytes it declared"
                )
            self.received += len(view)
            yield view
        if self.received != expected:
            raise PeerUnreachable(
                f"{self.where} ended the stream after {self.received} of {expected} bytes"
            )

    def read_all(self) -> bytes:
        out = bytearray(self.info.length)
        position = 0
        for view in self.chunks():
            out[position : position + len(view)] = view
            position += len(view)
        return bytes(out)

    def cancel(self) -> None:
        """End the stream from any thread: a read waiting in `chunks()` raises."""
        self.cancelled = True
        try:
            self._reader.cancel()
        except (flight.FlightError, pa.ArrowException):
            pass

    def _broken(self, exc: BaseException) -> BlobError:
        if self.cancelled:
            return PeerUnreachable(
                f"{self.where}: the transfer was cancelled after {self.received} of "
                f"{self.info.length} bytes"
            )
        return from_flight_error(exc, self.where)


def _ticket(target: str | BlobId, offset: int = 0, length: int | None = None) -> BlobTicket:
    if isinstance(target, BlobId):
        return BlobTicket(id=target.uuid, offset=offset, length=length)
    return BlobTicket(key=check_key(target), offset=offset, length=length)


class FlightBlobClient:
    """A connection to one broker's Flight endpoint (gRPC connects at the first call)."""

    def __init__(
        self,
        address: str | FlightAddress,
        token: str | None = None,
        *,
        tls: TlsFiles | None = None,
        insecure: bool = False,
    ) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        self.address.check_plain_text(insecure, "the broker")
        self.token = token
        options: dict[str, Any] = {}
        if tls is not None:
            cert, key, ca = tls.read()
            if ca is not None:
                options["tls_root_certs"] = ca
            if cert is not None and key is not None and self.address.tls:
                options["cert_chain"] = cert  # mutual TLS: who this side is
                options["private_key"] = key
        self._options = options
        self._client = self._connect(MAX_MESSAGE_BYTES)
        # "get" actions go over a channel of their own, whose messages may hold the bytes
        # of a small blob and no more: a peer cannot make this side take in more than that
        # per result. (gRPC connects either at its first call.)
        self._asker = self._connect(INLINE_GET_BYTES + MAX_ANSWER_BYTES)

    def _connect(self, max_message: int) -> Any:
        """A gRPC channel to the broker that refuses messages over *max_message* before it
        takes them in."""
        limit = [("grpc.max_receive_message_length", max_message)]
        return flight.FlightClient(self.address.url, generic_options=limit, **self._options)

    @property
    def where(self) -> str:
        return f"the broker at {self.address.url}"

    def options(self, token: str | None = None, timeout: float | None = None) -> Any:
        bearer = token if token is not None else self.token
        headers = [] if bearer is None else [(b"authorization", b"Bearer " + bearer.encode())]
        return flight.FlightCallOptions(headers=headers, timeout=timeout)

    def open(
        self,
        target: str | BlobId,
        *,
        offset: int = 0,
        length: int | None = None,
        token: str | None = None,
        timeout: float | None = None,
    ) -> RemoteBlob:
        """Open a blob (by key or id) as a stream; returns once its size is known.

        *timeout* bounds the whole call, transfer included (None: no bound).
        """
        ticket = _ticket(target, offset, length)
        try:
            reader = self._client.do_get(
                flight.Ticket(encode(ticket)), self.options(token, timeout)
            )
            schema = reader.schema
        except (flight.FlightError, pa.ArrowException) as exc:
            raise from_flight_error(exc, self.where) from None
        info = stream_info(schema)
        try:
            self._check_target(target, info, offset, length)
        except RemoteProtocolError:
            reader.cancel()
            raise
        return RemoteBlob(reader, info, self.where)

    def _check_target(
        self, target: str | BlobId, info: StreamInfo, offset: int, length: int | None
    ) -> None:
        """Refuse an answer about another blob or range than the one asked for."""
        if info.offset != offset or (length is not None and info.length != length):
            raise RemoteProtocolError(f"{self.where} sent another range than the one asked for")
        if isinstance(target, BlobId) and info.id != target:
            raise RemoteProtocolError(f"{self.where} sent blob {info.id} for {target}")
        if isinstance(target, str) and info.key != target:
            raise RemoteProtocolError(f"{self.where} sent the key {info.key!r} for {target!r}")

    def get_inline(
        self, target: str | BlobId, *, token: str | None = None, timeout: float | None = None
    ) -> tuple[StreamInfo, pa.Buffer | None]:
        """The blob's size, id and key in one call, and its bytes if it is small enough to
        come with them (`INLINE_GET_BYTES`); None: `open` it as a stream instead."""
        action = flight.Action(GET_ACTION, encode(_ticket(target)))
        try:
            results = iter(self._asker.do_action(action, self.options(token, timeout)))
            head = next(results, None)
            if head is None or head.body.size > MAX_ANSWER_BYTES:
                raise RemoteProtocolError(f"{self.where} answered a get without a valid answer")
            info, inline = decode_get_answer(head.body.to_pybytes())
            self._check_target(target, info, 0, None)
            data = next(results, None) if inline else None
            if next(results, None) is not None:
                raise RemoteProtocolError(f"{self.where} answered a get with more results")
        except (flight.FlightError, pa.ArrowException) as exc:
            raise from_flight_error(exc, self.where) from None
        if not inline:
            return info, None
        if data is None or data.body.size != info.length:
            raise RemoteProtocolError(
                f"{self.where} declared {info.length} bytes and sent "
                f"{0 if data is None else data.body.size}"
            )
        return info, data.body

    def get_bytes(self, target: str | BlobId, *, timeout: float | None = None) -> bytes:
        return self.open(target, timeout=timeout).read_all()

    def list(self, prefix: str = "", *, timeout: float | None = None) -> list[RemoteEntry]:
        """The sealed blobs of the broker (with keys starting with *prefix*)."""
        entries = []
        try:
            for info in self._client.list_flights(prefix.encode(), self.options(None, timeout)):
                stream = stream_info(info.schema)
                entries.append(RemoteEntry(stream.key, stream.id, stream.size))
        except (flight.FlightError, pa.ArrowException) as exc:
            raise from_flight_error(exc, self.where) from None
        return entries

    def put(
        self,
        data: Any,
        *,
        key: str,
        lease_ms: int | None = None,
        chunk: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> PutResult:
        """Upload *data* (any buffer) under *key*; returns once the broker sealed it."""
        buffer = pa.py_buffer(data)
        size = buffer.size
        descriptor = flight.FlightDescriptor.for_command(
            encode(PutCommand(key=check_key(key), size=size, lease_ms=lease_ms))
        )
        schema = stream_schema()
        try:
            writer, results = self._client.do_put(descriptor, schema, self.options(None, timeout))
            for batch in batches(buffer, 0, size, chunk, schema):
                writer.write_batch(batch)
            writer.done_writing()
            answer = results.read()
            writer.close()
        except (flight.FlightError, pa.ArrowException) as exc:
            raise from_flight_error(exc, self.where) from None
        if answer is None:
            raise RemoteProtocolError(f"{self.where} did not say what it published")
        return decode_put_result(answer.to_pybytes())

    def close(self) -> None:
        self._client.close()
        self._asker.close()

    def __enter__(self) -> FlightBlobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
