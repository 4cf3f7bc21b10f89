"""What `Connection.next_event()` returns."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from blobplane.wire.messages import Message

__all__ = ["NEED_DATA", "Event", "NeedData", "PeerClosed", "Received"]


class Received(msgspec.Struct, frozen=True, gc=False):
    """A message and the fds that rode with it; whoever takes this event owns the fds.

    A Struct for its constructor in C: one is made for every message received.
    (It holds no cycles, so the garbage collector need not track it.)
    """

    message: Message
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer ended the stream cleanly, between two frames."""


class NeedData:
    """Nothing complete yet: feed more with `receive_data()`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

Event = Received | PeerClosed | NeedData
