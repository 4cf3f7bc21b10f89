"""The broker's commands of `blobplane`: serve, put, get, ls, rm, stats, token, demo-broker.

Every command but `serve` is a client of a running broker: ``--socket``
(default ``$BLOBPLANE_BROKER``, else the default socket) says which one, and
``--token`` (default ``$BLOBPLANE_TOKEN``) what to present. A `BlobError`
becomes one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

import click
import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from blobplane.broker.address import key_path_for, resolve_socket
from blobplane.cli import federation
from blobplane.cli.options import (
    client_options,
    host_port_option,
    one_line_errors,
    seconds_option,
    socket_option,
)
from blobplane.cli.tables import stats_table
from blobplane.durations import format_duration
from blobplane.errors import BlobNotFound
from blobplane.sizes import format_size, parse_size
from blobplane.types import BlobId

__all__ = ["COMMANDS", "stats_table"]

T = TypeVar("T")

# Files at least this large get a progress bar (on a terminal).
PROGRESS_BYTES = 16 << 20
_CHUNK = 4 << 20


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _duration_ms(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    seconds = seconds_option(ctx, param, value)
    return None if seconds is None else max(1, round(seconds * 1000))


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for large transfers on a terminal; yields `advance(bytes)`."""
    console = Console(stderr=True)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=total < PROGRESS_BYTES or not console.is_terminal,
    )
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.advance(task, done)


def _parse_target(text: str) -> BlobId:
    """A blob id the user typed."""
    try:
        return BlobId(uuid.UUID(text))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a blob id (a UUID)") from None


def _targets(text: str, by_id: bool) -> list[str | BlobId]:
    """A key first; then, if it reads as a UUID, the blob with that id."""
    if by_id:
        return [_parse_target(text)]
    try:
        return [text, BlobId(uuid.UUID(text))]
    except ValueError:
        return [text]


# -- serve -------------------------------------------------------------------------------


@click.command()
@socket_option
@click.option(
    "--memory-limit",
    callback=_size,
    default=None,
    metavar="SIZE",
    help=(
        "Bytes all blobs together may use (e.g. 4GiB); default: half of the memory "
        "this broker may use (its memory cgroup's limit, else the host's RAM). "
        "Pool slots count too."
    ),
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Clients served at once; more are refused with BrokerLimitReached.",
)
@click.option("--require-token", is_flag=True, help="Serve only clients that present a token.")
@click.option(
    "--evict",
    is_flag=True,
    help="When memory is short, evict idle sealed blobs (least recently used) instead of refusing.",
)
@click.option(
    "--spill-dir",
    default=None,
    metavar="DIR",
    help=(
        "When memory is short, move idle sealed blobs (least recently used) to files in "
        "DIR, and read them back when they are got. Made 0700 if missing; one broker per "
        "DIR; the files do not outlive the broker."
    ),
)
@click.option(
    "--key-file",
    default=None,
    metavar="PATH",
    help="The secret key for tokens (default: the socket path + '.key'; made if missing).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="debug logs every request.",
)
@click.option(
    "--metrics",
    callback=host_port_option,
    default=None,
    metavar="HOST:PORT",
    help=(
        "Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free one); "
        "keep it on loopback. Needs blobplane[metrics]."
    ),
)
@federation.serve_options
@one_line_errors
def serve(
    *,
    socket_path: str | None,
    memory_limit: int | None,
    max_connections: int,
    require_token: bool,
    evict: bool,
    spill_dir: str | None,
    key_file: str | None,
    log_level: str,
    metrics: tuple[str, int] | None,
    **flight: Any,
) -> None:
    """Run the broker until SIGINT or SIGTERM.

    Prints 'ready socket=PATH pid=PID' (and ' flight=URL' with --flight,
    ' metrics=URL' with --metrics) on stdout once it listens; logs go to
    stderr, one key=value line per event.
    """
    import asyncio

    from blobplane.broker import logs
    from blobplane.broker.server import BrokerConfig, BrokerServer

    logs.configure(getattr(logging, log_level.upper()))
    if metrics is not None and importlib.util.find_spec("prometheus_client") is None:
        raise click.UsageError(
            "--metrics needs prometheus-client: pip install 'blobplane[metrics]'"
        )
    config = BrokerConfig(
        socket_path=resolve_socket(socket_path),
        memory_limit=memory_limit,
        max_connections=max_connections,
        require_token=require_token,
        evict=evict,
        spill_dir=spill_dir,
        key_path=key_file,
        flight=federation.flight_config(**flight),
        metrics=metrics,
    )

    async def main() -> None:
        server = BrokerServer(config)

        def ready(path: str) -> None:
            url, metrics_url = server.flight_url, server.metrics_url
            click.echo(
                f"ready socket={path} pid={os.getpid()}"
                + (f" flight={url}" if url else "")
                + (f" metrics={metrics_url}" if metrics_url else "")
            )
            sys.stdout.flush()

        await server.run(ready)
        if server.flight is not None and server.flight.stuck:
            # Flight calls outlived the shutdown, and gRPC would wait for them forever
            # at exit: everything is closed and logged, so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    asyncio.run(main())


# -- put, get, ls, rm, stats -------------------------------------------------------------


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--key", default=None, help="Publish it under this key.")
@click.option(
    "--lease",
    "lease_ms",
    callback=_duration_ms,
    default=None,
    metavar="DURATION",
    help="Free it after this long (e.g. 10m, 1h); default: keep it until deleted.",
)
@client_options
@one_line_errors
def put(
    file: str,
    *,
    key: str | None,
    lease_ms: int | None,
    socket_path: str | None,
    token: str | None,
) -> None:
    """Publish FILE (- for stdin) as a sealed blob; print its id."""
    from blobplane.blobs import SharedMemoryBlobs
    from blobplane.client import connect_broker
    from blobplane.types import BlobBackend

    # Opened before connecting: a file that cannot be read costs the broker nothing.
    with (
        contextlib.nullcontext(sys.stdin.buffer) if file == "-" else open(file, "rb") as source,
        connect_broker(socket_path, token, name="blobplane put") as broker,
    ):
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            # A pipe, a terminal, /proc/cpuinfo, <(cmd): no size to trust, read to the end.
            entry = broker.put_bytes(source.read(), key=key, lease_ms=lease_ms)
        else:
            # Filled here and put, rather than created by the broker: a token with the
            # 'put' right is enough.
            with (
                SharedMemoryBlobs(BlobBackend.MEMFD) as blobs,
                blobs.create(info.st_size) as blob,
            ):
                with blob.buffer as view:
                    _read_into(source, view, os.path.basename(file))
                blob.seal()
                entry = broker.put(blob, key=key, lease_ms=lease_ms)
    if entry.evicted:
        click.echo(f"note: the broker evicted {entry.evicted} idle blobs to make room", err=True)
    click.echo(str(entry.id))


def _read_into(source: BinaryIO, view: memoryview, label: str) -> None:
    with _progress(len(view), f"put {label}") as advance:
        offset = 0
        while offset < len(view):
            count = os.readv(source.fileno(), [view[offset : offset + _CHUNK]])
            if not count:
                raise click.ClickException(
                    f"{label} shrank while it was read ({offset} of {len(view)} bytes)"
                )
            offset += count
            advance(count)


@click.command()
@click.argument("key")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Where to write the blob; - for stdout (the default, unless stdout is a terminal).",
)
@click.option("--id", "by_id", is_flag=True, help="KEY is a blob id.")
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to wait for the blob to appear and be sealed.",
)
@click.option(
    "--from",
    "remote",
    default=None,
    metavar="URL",
    help="Fetch it from the broker whose Flight endpoint is at URL (no local broker needed).",
)
@federation.remote_options
@client_options
@one_line_errors
def get(
    *,
    key: str,
    output: str | None,
    by_id: bool,
    timeout: float | None,
    remote: str | None,
    socket_path: str | None,
    token: str | None,
    **tls: Any,
) -> None:
    """Write the blob under KEY (or with that id) to a file, or to stdout.

    A file appears whole or not at all: the blob goes to a temporary file in
    the same folder, renamed into place once complete.
    """
    from blobplane.client import connect_broker

    if output is None:
        if sys.stdout.isatty():
            raise click.UsageError(
                "stdout is a terminal: write the blob to a file with -o FILE "
                "(or pass -o - to print it anyway)"
            )
        output = "-"
    if remote is not None:
        federation.remote_get(
            remote,
            key,
            by_id=by_id,
            output=output,
            token=token,
            timeout=timeout,
            progress=_progress,
            **tls,
        )
        return
    with connect_broker(socket_path, token, name="blobplane get") as broker:
        mapped = _first_found(lambda target: broker.get(target, timeout=timeout), key, by_id)
        with mapped, mapped.as_slice() as view:
            if output == "-":
                _write_from(sys.stdout.buffer, view, key)
                sys.stdout.buffer.flush()
            else:
                _write_file(output, view, key)


def _write_file(path: str, view: memoryview, label: str) -> None:
    """Write *view* to *path* through a temporary file beside it, renamed when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as sink:
            _write_from(sink, view, label)
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(partial, 0o666 & ~_umask())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_found(action: Callable[[str | BlobId], T], text: str, by_id: bool) -> T:
    targets = _targets(text, by_id)
    for target in targets[:-1]:
        try:
            return action(target)
        except BlobNotFound:
            continue
    return action(targets[-1])


def _write_from(sink: BinaryIO, view: memoryview, label: str) -> None:
    with _progress(len(view), f"get {label}") as advance:
        for start in range(0, len(view), _CHUNK):
            part = view[start : start + _CHUNK]
            sink.write(part)
            advance(len(part))


@click.command(name="ls")
@click.option("--all", "include_deleted", is_flag=True, help="Also deleted blobs still read.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="For scripts: a JSON array of objects, one per blob, with the fields of `BlobEntry`.",
)
@click.option("--wide", is_flag=True, help="Never wrap: as wide as the table needs.")
@click.option(
    "--peer",
    default=None,
    metavar="URL",
    help="List the sealed blobs of the broker whose Flight endpoint is at URL instead.",
)
@federation.remote_options
@client_options
@one_line_errors
def ls(
    *,
    include_deleted: bool,
    as_json: bool,
    wide: bool,
    peer: str | None,
    socket_path: str | None,
    token: str | None,
    **tls: Any,
) -> None:
    """List the broker's blobs (ids are never cut: other columns wrap first)."""
    from blobplane.client import connect_broker

    if peer is not None:
        federation.remote_ls(peer, token=token, as_json=as_json, **tls)
        return

    with connect_broker(socket_path, token, name="blobplane ls") as broker:
        entries = broker.list(include_deleted=include_deleted)
    if as_json:
        click.echo(msgspec.json.encode(entries))
        return
    table = Table(title=f"{len(entries)} blobs")
    table.add_column("key", overflow="fold")
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("size", "state", "refs", "lease left", "idle"):
        table.add_column(column, justify="right" if column in ("size", "refs") else "left")
    for entry in entries:
        left = "-"
        if entry.expires_in_ms is not None:
            left = format_duration(max(0, entry.expires_in_ms) / 1000)
        table.add_row(
            entry.key or "",
            str(entry.id),
            format_size(entry.size),
            entry.state + (" (pooled)" if entry.pooled else ""),
            str(entry.references),
            left,
            format_duration(entry.idle_ms / 1000),
        )
    console = Console()
    if wide:
        needed = console.measure(table, options=console.options.update(max_width=1 << 20))
        console = Console(width=max(console.width, needed.maximum))
    console.print(table)


@click.command()
@click.argument("key")
@click.option("--id", "by_id", is_flag=True, help="KEY is a blob id.")
@client_options
@one_line_errors
def rm(key: str, by_id: bool, socket_path: str | None, token: str | None) -> None:
    """Delete the blob under KEY (or with that id).

    Readers that hold it keep reading; its memory goes with the last of them.
    """
    from blobplane.client import connect_broker

    with connect_broker(socket_path, token, name="blobplane rm") as broker:
        _first_found(broker.delete, key, by_id)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@client_options
@one_line_errors
def stats(as_json: bool, socket_path: str | None, token: str | None) -> None:
    """The broker's totals: blobs, bytes, references."""
    from blobplane.client import connect_broker

    with connect_broker(socket_path, token, name="blobplane stats") as broker:
        totals = broker.stats()
    if as_json:
        click.echo(msgspec.json.encode(totals))
        return
    Console().print(stats_table(totals))


# -- tokens ------------------------------------------------------------------------------


@click.group()
def token() -> None:
    """Capability tokens for a broker started with --require-token."""


@token.command(name="create")
@click.option(
    "--rights",
    default="get",
    show_default=True,
    help="Comma-separated: get, put, create, delete, renew, list, stats (or all).",
)
@click.option(
    "--max-bytes",
    callback=_size,
    default=None,
    metavar="SIZE",
    help="Bytes the bearer's blobs may use together (e.g. 1GiB); default: no quota.",
)
@click.option(
    "--ttl",
    "ttl_ms",
    callback=_duration_ms,
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="How long the token is valid (e.g. 30m, 1h, 7d; 'never' for no expiry).",
)
@click.option("--blob", "blob", default=None, help="Only allow getting this one blob (id).")
@socket_option
@click.option(
    "--key-file",
    default=None,
    metavar="PATH",
    help="The broker's secret key (default: the socket path + '.key').",
)
@one_line_errors
def create_token(
    *,
    rights: str,
    max_bytes: int | None,
    ttl_ms: int | None,
    blob: str | None,
    socket_path: str | None,
    key_file: str | None,
) -> None:
    """Mint a token with exactly these rights and limits; prints it on stdout.

    Needs read access to the broker's key file: run it as the broker's user.
    """
    from blobplane.broker.tokens import TokenAuthority, load_key

    path = key_file or key_path_for(resolve_socket(socket_path))
    authority = TokenAuthority(load_key(path))
    seconds = None if ttl_ms is None else ttl_ms / 1000
    if blob is not None:
        minted = authority.mint_for_blob(_parse_target(blob), ttl=seconds)
    else:
        minted = authority.mint(rights, ttl=seconds, max_bytes=max_bytes)
    click.echo(minted)
    if seconds is not None:
        click.echo(f"valid for {format_duration(seconds)}", err=True)


@token.command(name="revoke-all")
@socket_option
@click.option(
    "--key-file",
    default=None,
    metavar="PATH",
    help="The broker's secret key (default: the socket path + '.key').",
)
@one_line_errors
def revoke_all(*, socket_path: str | None, key_file: str | None) -> None:
    """Revoke every token: replace the broker's secret key with a fresh one.

    The new key replaces the old file in one rename (mode 0600). A running
    broker takes it up at once: a client that connects with a token minted
    before is refused, and a connection opened with one is refused its next
    request and closed. Mint new tokens with `token create`. Run it as the
    broker's user.
    """
    from blobplane.broker.tokens import replace_key

    path = key_file or key_path_for(resolve_socket(socket_path))
    replace_key(path)
    click.echo(f"new secret key in {path}: every token minted before is revoked", err=True)


# -- the demo ----------------------------------------------------------------------------


@click.command(name="demo-broker")
@one_line_errors
def demo_broker() -> None:
    """A broker, a producer and two consumers of frames."""
    from blobplane.cli import broker_demo

    broker_demo.run(Console())


@click.command(name="demo-federation")
@click.option(
    "--size",
    callback=_size,
    default="256MiB",
    show_default=True,
    metavar="SIZE",
    help="The size of each blob.",
)
@click.option("--count", type=click.IntRange(1, 64), default=4, show_default=True)
@one_line_errors
def demo_federation(size: int | None, count: int) -> None:
    """Two brokers on this machine: blobs put on one, got from the other over Flight."""
    from blobplane.cli import federation_demo

    federation.need_pyarrow()
    federation_demo.run(Console(), size=size or 1, count=count)


COMMANDS: tuple[click.Command, ...] = (
    serve,
    put,
    get,
    ls,
    rm,
    stats,
    token,
    demo_broker,
    demo_federation,
)
