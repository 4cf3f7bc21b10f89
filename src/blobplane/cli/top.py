"""`blobplane top`: a live view of a broker, refreshed in place.

Memory in use against the broker's limit, the largest and the most
referenced blobs, and the accounts (one per token, or per client without
one) with their bytes. Each frame is one `stats` and one `list` request, as
`blobplane stats` and `blobplane ls` make; the token needs both rights.

A frame fits the terminal: its tables get as many rows as leave it no taller
than the screen. Keys are shown as escaped text, never as markup or control
sequences: whoever put a blob chose its key.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass

import click
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from blobplane.broker.protocol import BlobEntry, StatsEntry
from blobplane.cli.options import client_options, one_line_errors
from blobplane.durations import format_duration
from blobplane.sizes import format_size

__all__ = ["frame", "top"]

# Rows per table at most, however tall the terminal.
MAX_ROWS = 10


@click.command()
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Time between frames.",
)
@client_options
@one_line_errors
def top(*, once: bool, interval: float, socket_path: str | None, token: str | None) -> None:
    """A live view of the broker: memory, the busiest blobs, the accounts and their bytes.

    Ctrl-C ends it.
    """
    from blobplane.client import connect_broker

    console = Console()
    try:
        with connect_broker(socket_path, token, name="blobplane top") as broker:
            if once:
                console.print(frame(broker.stats(), broker.list(), console))
                return
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    live.update(frame(broker.stats(), broker.list(), console), refresh=True)
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass  # how a live view ends: the last frame stays on the screen


def frame(stats: StatsEntry, blobs: list[BlobEntry], console: Console) -> RenderableType:
    """One frame, with as many rows as fit *console*'s height (at least one per table)."""
    largest = heapq.nlargest(MAX_ROWS, blobs, key=lambda b: b.size)
    referenced = heapq.nlargest(
        MAX_ROWS, (b for b in blobs if b.references), key=lambda b: (b.references, b.size)
    )
    busy = sum(1 for b in blobs if b.references)
    rows = MAX_ROWS
    while True:
        view = Group(
            _header(stats),
            _memory(stats),
            _blob_table("largest blobs", largest, len(blobs), rows),
            _blob_table("most referenced", referenced, busy, rows)
            if referenced
            else Text("most referenced: no blob is being read"),
            _accounts(stats, rows),
        )
        if rows == 1:
            return view
        lines = console.render_lines(view, console.options, pad=False)
        if len(lines) <= console.size.height - 1:  # and the line the cursor waits on
            return view
        rows -= 1


def _header(stats: StatsEntry) -> Text:
    return Text(
        f"broker pid {stats.pid}, up {format_duration(stats.uptime_s)} · "
        f"{stats.clients} clients · {stats.references} references · "
        f"{stats.waiting_gets} gets waiting\n"
        f"{stats.blobs} blobs: {stats.sealed} sealed, {stats.allocated} filling, "
        f"{stats.deleted} deleted, {stats.pooled} pooled · "
        f"{stats.evictions} evicted · {stats.expirations} expired"
    )


def _memory(stats: StatsEntry) -> RenderableType:
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column("label", no_wrap=True)
    grid.add_column("bar", ratio=1)
    grid.add_column("amount", no_wrap=True, justify="right")
    used = format_size(stats.bytes)
    if stats.memory_limit is None:
        grid.add_row("memory", "", f"{used} (no limit)")
        return grid
    share = stats.bytes / stats.memory_limit if stats.memory_limit else 1.0
    grid.add_row(
        "memory", _Meter(share), f"{used} of {format_size(stats.memory_limit)} ({share:.0%})"
    )
    return grid


@dataclass(frozen=True)
class _Meter:
    """A bar as wide as it is given, *share* of it filled; readable without colours too."""

    share: float

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        filled = round(width * min(max(self.share, 0.0), 1.0))
        full, empty = ("#", "-") if options.ascii_only else ("█", "░")
        colour = "red" if self.share >= 0.9 else "yellow" if self.share >= 0.75 else "green"
        yield Text.assemble((full * filled, colour), (empty * (width - filled), "dim"))


def _blob_table(title: str, blobs: Iterable[BlobEntry], count: int, rows: int) -> Table:
    table = _table(title)
    table.add_column("key", ratio=1, no_wrap=True, overflow="ellipsis", min_width=8)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("refs", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("account", no_wrap=True, overflow="ellipsis", max_width=16)
    table.add_column("idle", justify="right", no_wrap=True)
    shown = 0
    for blob in blobs:
        if shown == rows:
            break
        table.add_row(
            _key(blob),
            format_size(blob.size),
            str(blob.references),
            blob.state + (" (pool)" if blob.pooled else ""),
            _plain(blob.account),
            format_duration(blob.idle_ms / 1000),
        )
        shown += 1
    if count > shown:
        table.caption = f"{count - shown} more"
    return table


def _accounts(stats: StatsEntry, rows: int) -> Table:
    table = _table("accounts (a token's, or a client's without one)")
    table.add_column("account", ratio=1, no_wrap=True, overflow="ellipsis", min_width=8)
    table.add_column("clients", justify="right", no_wrap=True)
    table.add_column("blobs", justify="right", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("quota", justify="right", no_wrap=True)
    for account in stats.accounts[:rows]:
        quota = "-"
        if account.max_bytes is not None:
            share = account.bytes / account.max_bytes if account.max_bytes else 1.0
            quota = f"{format_size(account.max_bytes)} ({share:.0%})"
        table.add_row(
            _plain(account.name),
            str(account.clients),
            str(account.blobs),
            format_size(account.bytes),
            quota,
        )
    hidden = len(stats.accounts) - min(rows, len(stats.accounts)) + stats.accounts_omitted
    if hidden:
        table.caption = f"{hidden} more"
    return table


def _table(title: str) -> Table:
    return Table(
        title=title,
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        expand=True,
        pad_edge=False,
        show_edge=False,
    )


def _key(blob: BlobEntry) -> Text:
    if blob.key is None:
        return Text(f"(no key) {blob.id}", style="dim", no_wrap=True, overflow="ellipsis")
    return _plain(blob.key)


def _plain(text: str) -> Text:
    """*text* as it reads, escaped where it would not print (control codes, line breaks)."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return Text(shown, no_wrap=True, overflow="ellipsis")
