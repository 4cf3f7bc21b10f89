"""Closing fds that were handed to us: the one helper every layer uses.

Closing always completes: an fd that is already gone (a callback closed it,
the peer's message was half taken apart) must not keep the rest open, so an
`OSError` from one fd does not stop the others and is not raised.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["close_fds"]


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd in *fds*, whatever happens to one of them."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
