"""Options the commands share: durations and sizes as people write them."""

from __future__ import annotations

import click

from blobplane.durations import parse_duration
from blobplane.errors import BlobError

__all__ = ["seconds_option"]


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
