"""The connection's states, what may be sent or received in each, and request bookkeeping.

Theory of operation
-------------------

A connection is two independent directions, ours (what we send) and theirs
(what we receive). Both peers play the same role: either may hand blobs to
the other. Each direction is in one of three states::

    OPEN --end of stream (their side) / close() (our side)--> CLOSED
    OPEN --a violation by that side---------------------------> ERROR

ERROR is sticky: once the peer broke the protocol every later `next_event()`
raises the same `RemoteProtocolError`, and once we tried to send something
illegal every later `send()` raises `LocalProtocolError`. After the peer's
violation we may still send exactly one kind of message, an `ErrorReply`
saying why we are hanging up.

Requests. Every message has an id, strictly increasing per direction, so a
duplicate or replayed message is caught with O(1) memory. A `BlobHandoff`
opens a request that the other side answers exactly once, with an `Ack` or
an `ErrorReply`; at most `max_open_handoffs` may be open per direction. An
`ErrorReply` may also answer any earlier id (a payload), or 0 for the
connection as a whole. `UserPayload` expects no answer.

Fds. The header of every frame says how many fds ride with it and the framer
checks that exactly those arrived. The message then says how many it needs
(`FD_RULES`): a handoff the number its descriptor kind uses, a payload any
number up to the per-message maximum, replies none.

Limits (see `frames.Limits`): frames of at most 64 KiB including the header,
at most 16 fds per message (the kernel's cap is 253), at most 1024 open
handoffs per direction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from blobplane.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from blobplane.wire.messages import (
    FDS_PER_KIND,
    Ack,
    BlobHandoff,
    ErrorReply,
    Message,
    UserPayload,
)

__all__ = ["MAX_OPEN_HANDOFFS", "Direction", "State"]

MAX_OPEN_HANDOFFS = 1024


class State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"

    # Members are singletons: identity hashing keeps the table lookups cheap.
    __hash__ = object.__hash__


# What each state lets a direction do. A missing entry is an error naming the
# message, the direction and the state.
SEND_ALLOWED: dict[tuple[State, State], frozenset[type[Message]]] = {
    # (our state, their state) -> messages we may send
    (State.OPEN, State.OPEN): frozenset({BlobHandoff, Ack, ErrorReply, UserPayload}),
    (State.OPEN, State.CLOSED): frozenset({BlobHandoff, Ack, ErrorReply, UserPayload}),
    (State.OPEN, State.ERROR): frozenset({ErrorReply}),
}


def fd_rule(message: Message, max_fds: int) -> tuple[int, int]:
    """How many fds *message* must carry: (at least, at most)."""
    if isinstance(message, BlobHandoff):
        return (message.fds, message.fds)
    if isinstance(message, UserPayload):
        return (0, max_fds)
    return (0, 0)  # replies


def describe(message: Message) -> str:
    return f"{type(message).__name__} {message.id}"


@dataclass(slots=True)
class Direction:
    """One direction's request ids and the handoffs it opened that the other has not answered."""

    name: str  # "this side" / "the peer", for error messages
    error: type[ProtocolError]
    state: State = State.OPEN
    last_id: int = 0
    open_handoffs: set[int] = field(default_factory=set)
    max_open_handoffs: int = MAX_OPEN_HANDOFFS

    def check(self, message: Message, fd_count: int, other: Direction, max_fds: int) -> None:
        """Raise this direction's protocol error if it may not send *message* now."""
        if message.id <= self.last_id:
            raise self.error(
                f"{self.name} sent request id {message.id} after {self.last_id}; ids must increase"
            )
        low, high = fd_rule(message, max_fds)
        if not low <= fd_count <= high:
            wanted = f"{low}" if low == high else f"{low} to {high}"
            raise self.error(
                f"fd count mismatch: {describe(message)} needs {wanted} fds, "
                f"{fd_count} came with it"
            )
        if isinstance(message, UserPayload):
            return
        if isinstance(message, BlobHandoff):
            if message.fds != FDS_PER_KIND[message.kind]:
                raise self.error(
                    f"{describe(message)} says {message.fds} fds ride with it; "
                    f"a {message.kind} descriptor takes {FDS_PER_KIND[message.kind]}"
                )
            if len(self.open_handoffs) >= self.max_open_handoffs:
                raise self.error(
                    f"{self.name} has {len(self.open_handoffs)} handoffs waiting for an "
                    f"answer, the most allowed; wait for replies before sending more"
                )
        elif isinstance(message, Ack):
            if message.reply_to not in other.open_handoffs:
                raise self.error(
                    f"{describe(message)} acknowledges request {message.reply_to}, which is "
                    f"not a handoff from {other.name} waiting for an answer"
                )
        elif message.reply_to > other.last_id:
            raise self.error(
                f"{describe(message)} answers request {message.reply_to}, but {other.name} "
                f"has sent ids up to {other.last_id} only"
            )

    def commit(self, message: Message, other: Direction) -> None:
        """Record *message* as sent by this direction (after `check` passed)."""
        self.last_id = message.id
        if isinstance(message, BlobHandoff):
            self.open_handoffs.add(message.id)
        elif isinstance(message, Ack | ErrorReply):
            other.open_handoffs.discard(message.reply_to)


def check_send_state(message: Message, ours: Direction, theirs: Direction) -> None:
    if ours.state is State.OPEN and theirs.state is State.OPEN:
        return  # the common case, and everything may be sent
    allowed = SEND_ALLOWED.get((ours.state, theirs.state), frozenset())
    if type(message) not in allowed:
        raise LocalProtocolError(
            f"cannot send {describe(message)}: this side is {ours.state.value} and "
            f"the peer is {theirs.state.value}"
        )


def new_directions(max_open_handoffs: int) -> tuple[Direction, Direction]:
    ours = Direction("this side", LocalProtocolError, max_open_handoffs=max_open_handoffs)
    theirs = Direction("the peer", RemoteProtocolError, max_open_handoffs=max_open_handoffs)
    return ours, theirs
