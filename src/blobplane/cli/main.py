"""The `blobplane` command."""

from __future__ import annotations

import click
from rich.console import Console

from blobplane.cli.broker import COMMANDS as BROKER_COMMANDS
from blobplane.cli.doctor import doctor
from blobplane.cli.top import top
from blobplane.sizes import parse_size
from blobplane.streams.protocol import Backpressure
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
    "--total",
    default="2GiB",
    show_default=True,
    callback=parse_size_option,
    help="How much to stream in all.",
)
@click.option(
    "--blob-size",
    default="64MiB",
    show_default=True,
    callback=parse_size_option,
    help="Size of each blob (the last one may be smaller).",
)
@click.option(
    "--backend",
    type=click.Choice([BlobBackend.MEMFD.value]),
    default=BlobBackend.MEMFD.value,
    show_default=True,
    help="Only memfd blobs travel over a channel: the receiver checks their seals.",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Instead: publish 1080p frames from a pool to subscriber processes, shown live.",
)
@click.option("--seconds", default=5.0, show_default=True, help="With --stream: how long.")
@click.option("--subscribers", default=3, show_default=True, help="With --stream: how many.")
@click.option(
    "--policy",
    type=click.Choice([policy.value for policy in Backpressure]),
    default=Backpressure.DROP_OLDEST.value,
    show_default=True,
    help="With --stream: what the publisher does when every slot is taken.",
)
def demo(
    *,
    total: int,
    blob_size: int,
    backend: str,
    stream: bool,
    seconds: float,
    subscribers: int,
    policy: str,
) -> None:
    """Stream blobs to a second process over a Unix socket; it verifies each one in place.

    With --stream, a publisher pushes 1080p frames through a pool to several
    subscriber processes (the last one slow) and shows frames per second,
    latency percentiles and missed frames live.
    """
    if stream:
        from blobplane.cli import stream_demo

        if seconds <= 0 or subscribers <= 0:
            raise click.BadParameter("--seconds and --subscribers must be positive")
        stream_demo.run(
            Console(), seconds=seconds, subscribers=subscribers, policy=Backpressure(policy)
        )
        return
    from blobplane.cli import demo as demo_module

    if total <= 0 or blob_size <= 0:
        raise click.BadParameter("--total and --blob-size must be positive")
    demo_module.run(total, blob_size, Console(), BlobBackend(backend))


for _command in (*BROKER_COMMANDS, top, doctor):
    main.add_command(_command)


if __name__ == "__main__":
    main()
