"""Tables for people: what the broker's stats look like on a terminal."""

from __future__ import annotations

from rich.table import Table

from blobplane.broker.protocol import StatsEntry
from blobplane.durations import format_duration
from blobplane.sizes import format_size

__all__ = ["stats_table"]


def stats_table(totals: StatsEntry) -> Table:
    """The broker's stats for people."""
    limit = "none" if totals.memory_limit is None else format_size(totals.memory_limit)
    table = Table(
        title=f"broker pid {totals.pid}, up {format_duration(totals.uptime_s)}",
        show_header=False,
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("clients connected", str(totals.clients)),
        (
            "blobs",
            f"{totals.blobs} ({totals.sealed} sealed, {totals.allocated} being filled, "
            f"{totals.deleted} deleted but still read, {totals.pooled} pooled)",
        ),
        ("bytes", f"{format_size(totals.bytes)} of {limit}"),
        ("of which pool slots", format_size(totals.pooled_bytes)),
        ("references held", str(totals.references)),
        ("gets waiting", str(totals.waiting_gets)),
        ("evictions / expired leases", f"{totals.evictions} / {totals.expirations}"),
        ("open fds in the broker", str(totals.open_fds)),
        ("tokens required / evict", f"{totals.token_required} / {totals.evict}"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    for account in totals.accounts:
        quota = "" if account.max_bytes is None else f" of {format_size(account.max_bytes)}"
        table.add_row(
            f"account {account.name}",
            f"{format_size(account.bytes)}{quota} in {account.blobs} blobs, "
            f"{account.clients} clients",
        )
    return table
