"""The command line of federation: `serve`'s Flight options, `get --from`, `ls --peer`,
and `demo-federation`.

Kept apart from `cli.broker` so that pyarrow is imported only by the
commands that use Flight.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO, ParamSpec, TypeVar

import click
import msgspec
from rich.console import Console
from rich.table import Table

from blobplane.cli.options import seconds_option
from blobplane.sizes import format_size, parse_size
from blobplane.types import BlobId

__all__ = [
    "ENV_PEER_TOKEN",
    "flight_config",
    "need_pyarrow",
    "remote_get",
    "remote_ls",
    "remote_options",
    "serve_options",
]

P = ParamSpec("P")
T = TypeVar("T")

ENV_PEER_TOKEN = "BLOBPLANE_PEER_TOKEN"


def _tls_options(function: Callable[P, T], *, serving: bool) -> Callable[P, T]:
    cert_help = (
        "PEM certificate of the Flight endpoint (grpc+tls://), also shown to peers under --tls-ca."
        if serving
        else "PEM client certificate, for a broker that requires mutual TLS."
    )
    ca_help = (
        "PEM CA: peers and clients must present certificates it signed (mutual TLS), "
        "and peers' certificates are checked against it."
        if serving
        else "PEM CA the broker's certificate must be signed by (default: the system's)."
    )
    for option in reversed(
        (
            click.option("--tls-cert", default=None, metavar="PEM", help=cert_help),
            click.option("--tls-key", default=None, metavar="PEM", help="Its private key."),
            click.option("--tls-ca", default=None, metavar="PEM", help=ca_help),
            click.option(
                "--insecure",
                is_flag=True,
                help="Allow plain-text grpc:// on addresses other than loopback.",
            ),
        )
    ):
        function = option(function)
    return function


def _size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def serve_options(function: Callable[P, T]) -> Callable[P, T]:
    """`blobplane serve`'s Flight and federation options."""
    function = _tls_options(function, serving=True)
    for option in reversed(
        (
            click.option(
                "--flight",
                default=None,
                metavar="URL",
                help=(
                    "Also serve blobs over Arrow Flight at grpc://HOST:PORT or "
                    "grpc+tls://HOST:PORT (port 0: any free port). Needs pyarrow."
                ),
            ),
            click.option(
                "--peer",
                "peers",
                multiple=True,
                metavar="URL",
                help="Another broker's Flight endpoint; a get by key that misses here asks "
                "the peers (repeatable).",
            ),
            click.option(
                "--peers-file",
                default=None,
                metavar="PATH",
                help="A file of peers, one Flight endpoint per line ('#' starts a comment), "
                "read when the broker starts; with any --peer, all of them are peers.",
            ),
            click.option(
                "--peer-token",
                envvar=ENV_PEER_TOKEN,
                default=None,
                help=f"The token to present to peers (default: ${ENV_PEER_TOKEN}, else one "
                "minted under this broker's key, which peers sharing the key file accept).",
            ),
            click.option(
                "--cache-ttl",
                callback=seconds_option,
                default="10m",
                show_default=True,
                metavar="DURATION",
                help="How long a copy fetched from a peer is kept ('never': until evicted), "
                "at most as long as the original's lease has left.",
            ),
            click.option(
                "--peer-timeout",
                callback=seconds_option,
                default="10s",
                show_default=True,
                metavar="DURATION",
                help="A peer that does not answer, or sends less than 1 MiB, for this long "
                "is given up on.",
            ),
            click.option(
                "--upload-timeout",
                callback=seconds_option,
                default="30s",
                show_default=True,
                metavar="DURATION",
                help="A Flight upload that sends less than 1 MiB for this long is dropped, "
                "and the memory it reserved released.",
            ),
            click.option(
                "--max-message",
                callback=_size_option,
                default="256MiB",
                show_default=True,
                metavar="SIZE",
                help="The largest message a Flight upload may send (64KiB to 1GiB); an "
                "upload that sends a larger one is dropped.",
            ),
        )
    ):
        function = option(function)
    return function


def remote_options(function: Callable[P, T]) -> Callable[P, T]:
    """The TLS options of a command that talks to a remote broker's Flight endpoint."""
    return _tls_options(function, serving=False)


def flight_config(
    *,
    flight: str | None,
    peers: tuple[str, ...],
    peers_file: str | None,
    peer_token: str | None,
    cache_ttl: float | None,
    peer_timeout: float | None,
    upload_timeout: float | None,
    max_message: int,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    insecure: bool,
) -> Any:
    """The broker's `FlightConfig`, or None without --flight and peers."""
    if peers_file is not None:
        from blobplane.broker.flight.config import read_peers_file

        peers = (*peers, *read_peers_file(peers_file))
    if flight is None and not peers:
        for name, value in (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-ca", tls_ca)):
            if value is not None:
                raise click.UsageError(f"{name} goes with --flight or --peer")
        return None
    need_pyarrow()
    from blobplane.broker.flight.config import (
        DEFAULT_PEER_TIMEOUT_S,
        DEFAULT_UPLOAD_TIMEOUT_S,
        FlightConfig,
        TlsFiles,
    )

    return FlightConfig.from_text(
        flight,
        peers,
        tls=TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca),
        insecure=insecure,
        peer_token=peer_token,
        cache_ttl=cache_ttl,
        peer_timeout=DEFAULT_PEER_TIMEOUT_S if peer_timeout is None else peer_timeout,
        upload_timeout=DEFAULT_UPLOAD_TIMEOUT_S if upload_timeout is None else upload_timeout,
        max_message_bytes=max_message,
    )


def need_pyarrow() -> None:
    try:
        import pyarrow.flight  # noqa: F401
    except ImportError:
        raise click.UsageError(
            "Flight needs pyarrow: pip install 'blobplane[federation]'"
        ) from None


def _client(
    url: str,
    *,
    token: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    insecure: bool,
) -> Any:
    need_pyarrow()
    from blobplane.broker.flight.client import FlightBlobClient
    from blobplane.broker.flight.config import TlsFiles

    tls = TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    return FlightBlobClient(url, token, tls=tls, insecure=insecure)


def remote_get(
    url: str,
    key: str,
    *,
    by_id: bool,
    output: str,
    token: str | None,
    timeout: float | None,
    progress: Callable[[int, str], contextlib.AbstractContextManager[Callable[[int], None]]],
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    insecure: bool,
) -> None:
    """`blobplane get KEY --from URL`: the blob from a broker's Flight endpoint, into *output*."""
    import uuid

    target: str | BlobId = key
    if by_id:
        try:
            target = BlobId(uuid.UUID(key))
        except ValueError:
            raise click.BadParameter(f"{key!r} is not a blob id (a UUID)") from None
    with _client(
        url, token=token, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, insecure=insecure
    ) as client:
        stream = client.open(target, timeout=timeout)
        with progress(stream.info.length, f"get {key}") as advance:

            def write(sink: BinaryIO) -> None:
                for view in stream.chunks():
                    sink.write(view)
                    advance(len(view))

            if output == "-":
                write(sys.stdout.buffer)
                sys.stdout.buffer.flush()
            else:
                _write_whole(output, write)


def _write_whole(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file beside *path*, renamed into place once complete."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as sink:
            write(sink)
            sink.flush()
            os.fsync(sink.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(partial, 0o666 & ~mask)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def remote_ls(
    url: str,
    *,
    token: str | None,
    as_json: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    insecure: bool,
) -> None:
    """`blobplane ls --peer URL`: the sealed blobs a broker's Flight endpoint lists."""
    with _client(
        url, token=token, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, insecure=insecure
    ) as client:
        entries = client.list()
    if as_json:
        rows = [{"key": e.key, "id": str(e.id.uuid), "size": e.size} for e in entries]
        click.echo(msgspec.json.encode(rows))
        return
    table = Table(title=f"{len(entries)} blobs at {url}")
    table.add_column("key", overflow="fold")
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("size", justify="right")
    for entry in entries:
        table.add_row(entry.key or "", str(entry.id.uuid), format_size(entry.size))
    Console().print(table)
