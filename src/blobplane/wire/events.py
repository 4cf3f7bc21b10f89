"""What `Connection.next_event()` returns."""

from __future__ import annotations

from dataclasses import dataclass

from blobplane.wire.messages import Message

__all__ = ["NEED_DATA", "Event", "NeedData", "PeerClosed", "Received"]


@dataclass(frozen=True, slots=True)
class Received:
    """A message and the fds that rode with it; whoever takes this event owns the fds."""

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
