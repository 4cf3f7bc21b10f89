"""What the commands share: options (durations, addresses, the broker's socket and token
as people write them) and how a failure reaches them (`one_line_errors`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click

from blobplane.broker.address import ENV_SOCKET, ENV_TOKEN
from blobplane.durations import parse_duration
from blobplane.errors import BlobError

__all__ = [
    "client_options",
    "host_port_option",
    "one_line_errors",
    "seconds_option",
    "socket_option",
]

P = ParamSpec("P")
T = TypeVar("T")


def seconds_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Click callback: a duration for people ("10m", "never") in seconds, None for never."""
    if value is None or value.lower() in ("never", "none"):
        return None
    try:
        seconds = parse_duration(value)
    except BlobError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than zero", ctx, param)
    return seconds


def host_port_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str, int] | None:
    """Click callback: "HOST:PORT" ("127.0.0.1:9464", "[::1]:0", "localhost:9464")."""
    if value is None:
        return None
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(
            f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464; port 0: any free one)",
            ctx,
            param,
        )
    return host, int(port)


def socket_option(function: Callable[P, T]) -> Callable[P, T]:
    """--socket PATH: which broker."""
    return click.option(
        "--socket",
        "socket_path",
        envvar=ENV_SOCKET,
        default=None,
        metavar="PATH",
        help=f"The broker's socket (default: ${ENV_SOCKET}, else the default socket).",
    )(function)


def client_options(function: Callable[P, T]) -> Callable[P, T]:
    """--socket PATH and --token TOKEN: which broker, and what to present to it."""
    function = click.option(
        "--token",
        envvar=ENV_TOKEN,
        default=None,
        help=f"A token from `blobplane token create` (default: ${ENV_TOKEN}).",
    )(function)
    return socket_option(function)


def one_line_errors(function: Callable[P, T]) -> Callable[P, T]:
    """A `BlobError` or an `OSError` is a message for people: one line on stderr, status 1.

    (Usage errors stay click's: its message and status 2.)
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return function(*args, **kwargs)
        except BlobError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            what = exc.strerror or str(exc)
            where = f": {exc.filename}" if exc.filename is not None else ""
            click.echo(f"error: {what}{where}", err=True)
            sys.exit(1)

    return wrapper
