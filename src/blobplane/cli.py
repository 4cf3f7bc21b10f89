"""The `blobplane` command."""

from __future__ import annotations

import click
from rich.console import Console

from blobplane.sizes import parse_size
from blobplane.types import BlobBackend


def parse_size_option(ctx: click.Context, param: click.Parameter, value: str | int) -> int:
    """Click callback: sizes written for people ("64MiB", "1GB")."""
    if isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.group()
@click.version_option(package_name="blobplane")
def main() -> None:
    """Move large binary payloads between processes through shared memory."""


@main.command()
@click.option(
    "--size", default="256MiB", show_default=True, callback=parse_size_option, help="Blob size."
)
@click.option(
    "--backend",
    type=click.Choice([b.value for b in BlobBackend if b is not BlobBackend.WINDOWS]),
    default=BlobBackend.PLATFORM_DEFAULT.value,
    show_default=True,
)
def demo(size: int, backend: str) -> None:
    """Fill and seal one blob, and let a second process verify it in place."""
    from blobplane import demo as demo_module

    demo_module.run(size, BlobBackend(backend), Console())


if __name__ == "__main__":
    main()
