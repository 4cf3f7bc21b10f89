"""The broker's Flight endpoint: DoGet, DoPut, ListFlights, GetFlightInfo and GetSchema.

`FlightEndpoint` starts a `pyarrow.flight` server beside the broker's Unix
socket (`blobplane serve --flight grpc://HOST:PORT`). Its handlers run in
gRPC's threads and ask the broker's loop for every step through the `Bridge`.

- **DoGet** takes a JSON ticket, ``{"key": K}`` or ``{"id": UUID}``, with an
  optional ``"offset"`` and ``"length"`` (one range of the blob). The stream's
  schema carries the blob's size, id and key, and the range (`StreamInfo`);
  then come record batches of one binary row each, pointing into the blob's
  read-only mapping: the sender copies nothing.
- **DoAction "get"** takes the same ticket and answers in one call: a
  `GetAnswer` (the stream's metadata, and whether the bytes follow), then,
  for a range of at most `INLINE_GET_BYTES`, the bytes themselves, read
  with one `pread`. A larger range is only described: its bytes come with a
  DoGet. Peers fetch small blobs this way, a round of gRPC messages fewer.
- **DoPut** takes a descriptor command ``{"key": K, "size": N}`` (and
  ``"lease_ms"``), reserves the blob (key, memory limit, quota) before the
  first byte, writes the batches straight into the new memfd as they come,
  and seals and publishes it once exactly N bytes arrived. A short, long or
  interrupted upload publishes nothing and frees its memory; so does one
  that sends a message larger than ``max_message_bytes`` or nothing for the
  upload timeout (`Bridge.attach`). The answer is one metadata message,
  ``{"id", "key", "size"}``.
- **ListFlights** lists the sealed blobs (criteria: a key prefix), each
  with a ticket by id; **GetFlightInfo** and **GetSchema** describe one, by
  a descriptor path ``[key]`` or a command holding a ticket.

Every call must carry ``authorization: Bearer <token>``, a token of this
broker's key (`blobplane token create`); the rights are those of the local
socket: ``get`` for DoGet, the "get" action, GetFlightInfo and GetSchema,
``put`` for DoPut, ``list`` for ListFlights. A DoPut's token is checked as soon as its headers
arrive, before gRPC reads its first message. Refusals are Flight errors
whose extra info names the `blobplane.errors` class.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyarrow import flight

from blobplane.backends.mapping import map_readonly
from blobplane.broker import memory
from blobplane.broker.flight.address import FlightAddress
from blobplane.broker.flight.arrow import (
    batches,
    check_schema,
    chunk_view,
    keep_transfer_buffers,
    stream_schema,
    to_flight_error,
)
from blobplane.broker.flight.bridge import Bridge, Reading, Writing
from blobplane.broker.flight.config import FlightConfig
from blobplane.broker.flight.filling import MIN_PROGRESS_BYTES, Filling, allocate_unfilled
from blobplane.broker.flight.tickets import (
    GET_ACTION,
    INLINE_GET_BYTES,
    BlobTicket,
    GetAnswer,
    PutResult,
    StreamInfo,
    decode_put_command,
    decode_ticket,
    encode,
)
from blobplane.broker.logs import event
from blobplane.broker.protocol import MAX_TOKEN_CHARS
from blobplane.broker.registry import BlobInfo
from blobplane.errors import (
    BlobError,
    BrokerShutdown,
    InvalidSize,
    RemoteProtocolError,
    Timeout,
    TokenRefused,
)
from blobplane.sizes import format_size
from blobplane.types import BlobId

if TYPE_CHECKING:
    from blobplane.broker.server import BrokerServer

__all__ = ["FlightEndpoint"]

_AUTH = "auth"
_BEARER = "bearer "


class _Bearer(flight.ServerMiddleware):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token


class _BearerFactory(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Takes the bearer token of every call; the loop verifies it (`Bridge.grant`).

    An upload's token is verified here, before gRPC takes in any of its
    messages: only a bearer of a 'put' token makes the broker read one.
    """

    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self._bridge = bridge

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> _Bearer:
        for value in headers.get("authorization", ()):
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if text[: len(_BEARER)].lower() == _BEARER:
                token = text[len(_BEARER) :].strip()
                if 0 < len(token) <= MAX_TOKEN_CHARS:
                    if info.method == flight.FlightMethod.DO_PUT:
                        bridge = self._bridge
                        try:
                            bridge.call(bridge.upload_grant, token)
                        except BlobError as exc:
                            raise to_flight_error(exc) from None
                    return _Bearer(token)
        raise to_flight_error(
            TokenRefused(
                "this endpoint serves only bearers of a blobplane token: send "
                "'authorization: Bearer <token>' (mint one with `blobplane token create`)"
            )
        )


def _token(context: Any) -> str | None:
    bearer = context.get_middleware(_AUTH)
    return bearer.token if isinstance(bearer, _Bearer) else None


class _Service(flight.FlightServerBase):  # type: ignore[misc]
    def __init__(
        self, location: str, bridge: Bridge, config: FlightConfig, stopping: threading.Event
    ) -> None:
        cert, key, ca = config.tls.read()
        tls = cert is not None and key is not None and location.startswith("grpc+tls:")
        super().__init__(
            location,
            tls_certificates=[(cert, key)] if tls else None,
            # Mutual TLS: a client must show a certificate signed by the CA.
            verify_client=tls and ca is not None,
            root_certificates=ca if tls else None,
            middleware={_AUTH: _BearerFactory(bridge)},
        )
        self._bridge = bridge
        self._chunk = config.chunk_bytes
        self._max_message = config.max_message_bytes
        self._stopping = stopping

    # -- DoGet ---------------------------------------------------------------------------

    def _start_get(self, context: Any, raw_ticket: bytes) -> tuple[Reading, int, int]:
        """The blob a ticket names, referenced, with the range's offset and length.

        Refused (a Flight error) as the local socket would refuse the get;
        then nothing is held. Else the caller closes the reading's fd and
        disconnects its client.
        """
        bridge = self._bridge
        try:
            wanted = decode_ticket(raw_ticket)
            reading = bridge.read(_token(context), wanted.target)
        except BlobError as exc:
            raise _refused("get", context, exc) from None
        try:
            length = wanted.length_in(reading.info.size)
        except BlobError as exc:
            os.close(reading.fd)
            bridge.post(bridge.disconnect, reading.client)
            raise _refused("get", context, exc) from None
        return reading, wanted.offset, length

    def do_get(self, context: Any, ticket: Any) -> Any:
        bridge = self._bridge
        reading, offset, length = self._start_get(context, ticket.ticket)
        info = reading.info
        try:
            mapped = map_readonly(reading.fd, info.size) if length else None
        except BlobError as exc:
            bridge.post(bridge.disconnect, reading.client)
            raise _refused("get", context, exc) from None
        except BaseException:
            bridge.post(bridge.disconnect, reading.client)
            raise
        finally:
            os.close(reading.fd)
        schema = stream_schema(
            StreamInfo(info.size, info.id, info.key, offset, length, reading.lease_left_ms)
        )
        if mapped is None:
            bridge.post(bridge.disconnect, reading.client)
            table = schema.empty_table()
        else:
            # The batches point into the mapping, and gRPC drops them once they are sent
            # (or the call ends): the reference goes back with the mapping's last user.
            weakref.finalize(mapped, bridge.post, bridge.disconnect, reading.client)
            buffer = pa.py_buffer(mapped)
            table = pa.Table.from_batches(
                list(batches(buffer, offset, offset + length, self._chunk, schema)), schema=schema
            )
            del buffer, mapped
        event(
            "flight.get",
            logging.DEBUG,
            peer=context.peer(),
            blob=info.id,
            key=info.key,
            offset=offset,
            length=length,
        )
        # Sent by Arrow's C++ without coming back to Python for each batch.
        return flight.RecordBatchStream(table)

    # -- DoAction "get" -------------------------------------------------------------------

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [
            (
                GET_ACTION,
                'body: a DoGet ticket; results: {"size", "id", "key", "offset", "length", '
                '"lease_left_ms", "inline"}, then the bytes if inline (a range of at most '
                f"{INLINE_GET_BYTES} bytes); else DoGet the ticket",
            )
        ]

    def do_action(self, context: Any, action: Any) -> Iterator[bytes]:
        """A blob in one answer: a peer's fetch of a small blob takes one call, not a stream."""
        if action.type != GET_ACTION:
            unknown = f"this endpoint has one action, {GET_ACTION!r}, not {action.type!r}"
            raise _refused("action", context, RemoteProtocolError(unknown))
        body = action.body
        reading, offset, length = self._start_get(
            context, b"" if body is None else body.to_pybytes()
        )
        info = reading.info
        inline = length <= INLINE_GET_BYTES
        try:
            data = memory.read_range(reading.fd, offset, length) if inline else b""
        except BlobError as exc:
            raise _refused("get", context, exc) from None
        finally:
            os.close(reading.fd)
            self._bridge.post(self._bridge.disconnect, reading.client)
        event(
            # Too large to come inline, the bytes are got with a DoGet: that is the get.
            "flight.get" if inline else "flight.info",
            logging.DEBUG,
            blob=info.id,
            key=info.key,
            offset=offset,
            length=length,
            inline=inline,
        )
        answer = GetAnswer(
            size=info.size,
            id=info.id.uuid,
            key=info.key,
            offset=offset,
            length=length,
            lease_left_ms=reading.lease_left_ms,
            inline=inline,
        )
        return iter([encode(answer), data] if inline else [encode(answer)])

    # -- DoPut ---------------------------------------------------------------------------

    def do_put(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        bridge = self._bridge
        try:
            if descriptor.descriptor_type != flight.DescriptorType.CMD:
                raise RemoteProtocolError(
                    'an upload names its blob with a command descriptor: {"key": K, "size": N}'
                )
            command = decode_put_command(descriptor.command)
            writing = bridge.call(
                bridge.open_write,
                _token(context),
                command,
                undo=lambda w: bridge.disconnect(w.client),
            )
        except BlobError as exc:
            raise _refused("put", context, exc) from None
        published = False
        try:
            info = self._receive(writing, reader)
            published = True
        except BlobError as exc:
            raise _refused("put", context, exc) from None
        finally:
            if not published:
                # Everything it reserved goes: the blob, its bytes, its key.
                bridge.post(bridge.disconnect, writing.client)
        event(
            "flight.put",
            logging.DEBUG,
            peer=context.peer(),
            blob=info.id,
            key=info.key,
            size=info.size,
        )
        writer.write(
            pa.py_buffer(encode(PutResult(id=info.id.uuid, key=command.key, size=info.size)))
        )

    def _receive(self, writing: Writing, reader: Any) -> BlobInfo:
        bridge = self._bridge
        size = writing.info.size
        fd = allocate_unfilled(size, f"blobplane-broker:{writing.info.id}")
        filling_fd = bridge.call(bridge.attach, writing, fd, undo=os.close)
        filling = Filling(filling_fd, size)
        try:
            try:
                check_schema(reader.schema)
            except (pa.ArrowException, flight.FlightError) as exc:
                raise RemoteProtocolError(f"the upload sent no schema: {exc}") from None
            out = filling.writer(0, size)
            while True:
                if self._stopping.is_set():
                    raise BrokerShutdown("the broker is shutting down; the upload was dropped")
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                except (pa.ArrowException, flight.FlightError) as exc:
                    raise RemoteProtocolError(f"the upload broke off: {exc}") from None
                if writing.stalled:
                    raise Timeout(
                        f"the upload sent less than {format_size(MIN_PROGRESS_BYTES)} in "
                        f"{bridge.upload_timeout} s; it was dropped and its memory released"
                    )
                received = _message_bytes(chunk)
                if received > self._max_message:
                    raise InvalidSize(
                        f"a message of {format_size(received)} is larger than the "
                        f"{format_size(self._max_message)} this endpoint takes in one message: "
                        "send smaller record batches; nothing was published"
                    )
                writing.received += received
                if chunk.data is not None:
                    out.append(chunk_view(chunk.data))
            if not out.complete:
                raise InvalidSize(
                    f"the upload ended after {out.position} of the {size} bytes it declared; "
                    "nothing was published"
                )
            filling.finish()
            info: BlobInfo = bridge.call(bridge.commit, writing)
            return info
        finally:
            os.close(filling_fd)

    # -- listing -------------------------------------------------------------------------

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[Any]:
        bridge = self._bridge
        try:
            prefix = bytes(criteria or b"").decode("utf-8")
            infos = bridge.call(bridge.listing, _token(context), prefix)
        except UnicodeDecodeError:
            raise _refused(
                "list", context, RemoteProtocolError("criteria: a key prefix in UTF-8")
            ) from None
        except BlobError as exc:
            raise _refused("list", context, exc) from None
        return iter([_flight_info(info) for info in infos])

    def get_flight_info(self, context: Any, descriptor: Any) -> Any:
        return _flight_info(self._describe(context, descriptor))

    def get_schema(self, context: Any, descriptor: Any) -> Any:
        info = self._describe(context, descriptor)
        return flight.SchemaResult(
            stream_schema(StreamInfo(info.size, info.id, info.key, 0, info.size))
        )

    def _describe(self, context: Any, descriptor: Any) -> BlobInfo:
        bridge = self._bridge
        try:
            target: BlobId | str
            if descriptor.descriptor_type == flight.DescriptorType.PATH:
                path = descriptor.path or []
                if len(path) != 1:
                    raise RemoteProtocolError("a descriptor path names one key")
                raw = path[0]
                target = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                decode_ticket(encode_key_ticket(target))  # the checks of a key
            else:
                target = decode_ticket(descriptor.command).target
            info: BlobInfo = bridge.call(bridge.describe, _token(context), target)
        except UnicodeDecodeError:
            raise _refused("describe", context, RemoteProtocolError("a key is UTF-8")) from None
        except BlobError as exc:
            raise _refused("describe", context, exc) from None
        return info


def _message_bytes(chunk: Any) -> int:
    """What one received Flight message held: its record batch's buffers and its metadata."""
    size = 0 if chunk.data is None else chunk.data.get_total_buffer_size()
    return size + (0 if chunk.app_metadata is None else chunk.app_metadata.size)


def encode_key_ticket(key: str) -> bytes:
    return encode(BlobTicket(key=key))


def _flight_info(info: BlobInfo) -> Any:
    ticket = encode(BlobTicket(id=info.id.uuid))
    if info.key is not None:
        descriptor = flight.FlightDescriptor.for_path(info.key)
    else:
        descriptor = flight.FlightDescriptor.for_command(ticket)
    schema = stream_schema(StreamInfo(info.size, info.id, info.key, 0, info.size))
    endpoint = flight.FlightEndpoint(ticket, [])  # no location: this same endpoint
    return flight.FlightInfo(schema, descriptor, [endpoint], 1, info.size)


def _refused(op: str, context: Any, exc: BlobError) -> Exception:
    event(
        "flight.refused",
        logging.DEBUG,
        op=op,
        peer=context.peer(),
        error=type(exc).__name__,
        reason=exc,
    )
    return to_flight_error(exc)


class FlightEndpoint:
    """The Flight server of a broker: started in `start()`, stopped (bounded) by `stop()`."""

    def __init__(self, server: BrokerServer, config: FlightConfig, address: FlightAddress) -> None:
        keep_transfer_buffers()
        self._config = config
        self._address = address
        self._stopping = threading.Event()
        self.bridge = Bridge(server, asyncio.get_running_loop(), config.upload_timeout)
        self._service: _Service | None = None
        self.address = address
        # Calls outlived the shutdown's grace: gRPC would wait for them at interpreter
        # exit, forever for a client that stopped reading, so the process must end
        # without that wait (`os._exit`, as `blobplane serve` does).
        self.stuck = False

    def start(self) -> FlightAddress:
        """Listen (port 0 picks one); returns the address it listens on."""
        self._service = _Service(self._address.url, self.bridge, self._config, self._stopping)
        port = self._service.port
        self.address = self._address.with_port(port)
        event(
            "flight.started",
            url=self.address.url,
            tls=self.address.tls,
            mutual_tls=self._config.tls.ca is not None,
        )
        return self.address

    async def stop(self, grace: float) -> None:
        """Refuse new calls, end the streams in flight, and shut gRPC down within *grace*.

        gRPC's shutdown waits for every call to end, and a client that stops
        reading holds its call open: past *grace* the broker stops without it.
        """
        self._stopping.set()
        self.bridge.closed = True
        self.bridge.stop()
        service, self._service = self._service, None
        if service is None:
            return
        done = asyncio.get_running_loop().create_future()

        def shut() -> None:
            try:
                service.shutdown()
            finally:
                done.get_loop().call_soon_threadsafe(_set_done, done)

        threading.Thread(target=shut, name="blobplane-flight-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), grace)
        except TimeoutError:
            # Only leaving the process ends those calls (see `stuck`).
            self.stuck = True
            event("flight.stop_timeout", logging.WARNING, grace_s=grace)
        event("flight.stopped", url=self.address.url)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
