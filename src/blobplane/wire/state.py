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
checks that exactly those arrived. The message then says how many it needs:
a handoff the number its descriptor kind uses, a payload any number up to
the per-message maximum, replies none.

Every message, sent or received, passes `Direction.record` once: the rules
above, checked, and the message recorded if it passes.

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
_REPLIES = (Ack, ErrorReply)


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

    def record(self, message: Message, fd_count: int, other: Direction, max_fds: int) -> None:
        """Record *message*, with *fd_count* fds, as sent by this direction, if it may send it now.

        Raises this direction's protocol error, with nothing recorded, if not.
        The one check of every message, sent or received: each message type's
        usual case is one test, and `_refusal` says what is wrong otherwise.
        """
        kind = type(message)
        if message.id <= self.last_id or fd_count > max_fds:
            raise self._refusal(message, fd_count, other, max_fds)
        # Then what the message's type says: the fds it needs (a handoff those of
        # its descriptor kind, a payload any number, replies none) and the open
        # handoffs it opens or answers.
        if kind is BlobHandoff:
            if (
                fd_count != message.fds  # type: ignore[union-attr]
                or fd_count != FDS_PER_KIND[message.kind]  # type: ignore[union-attr]
                or len(self.open_handoffs) >= self.max_open_handoffs
            ):
                raise self._refusal(message, fd_count, other, max_fds)
            self.open_handoffs.add(message.id)
        elif kind is Ack:
            if fd_count or message.reply_to not in other.open_handoffs:  # type: ignore[union-attr]
                raise self._refusal(message, fd_count, other, max_fds)
            other.open_handoffs.discard(message.reply_to)  # type: ignore[union-attr]
        elif kind is ErrorReply:
            if fd_count or message.reply_to > other.last_id:  # type: ignore[union-attr]
                raise self._refusal(message, fd_count, other, max_fds)
            other.open_handoffs.discard(message.reply_to)  # type: ignore[union-attr]
        elif fd_count and kind is not UserPayload:
            raise self._refusal(message, fd_count, other, max_fds)
        self.last_id = message.id

    def _refusal(
        self, message: Message, fd_count: int, other: Direction, max_fds: int
    ) -> ProtocolError:
        """Why `record` refuses *message*: the first of its checks that fails, in words."""
        if message.id <= self.last_id:
            return self.error(
                f"{self.name} sent request id {message.id} after {self.last_id}; ids must increase"
            )
        if fd_count > max_fds:
            return self.error(
                f"{self.name} sent {fd_count} fds with one message; "
                f"the per-message maximum is {max_fds}"
            )
        if isinstance(message, BlobHandoff):
            if fd_count != message.fds:
                return self._fd_mismatch(message, message.fds, fd_count)
            if message.fds != FDS_PER_KIND[message.kind]:
                return self.error(
                    f"{describe(message)} says {message.fds} fds ride with it; "
                    f"a {message.kind} descriptor takes {FDS_PER_KIND[message.kind]}"
                )
            return self.error(
                f"{self.name} has {len(self.open_handoffs)} handoffs waiting for an "
                f"answer, the most allowed; wait for replies before sending more"
            )
        if fd_count:
            return self._fd_mismatch(message, 0, fd_count)
        if isinstance(message, Ack):
            return self.error(
                f"{describe(message)} acknowledges request {message.reply_to}, which is "
                f"not a handoff from {other.name} waiting for an answer"
            )
        assert isinstance(message, ErrorReply)
        return self.error(
            f"{describe(message)} answers request {message.reply_to}, but {other.name} "
            f"has sent ids up to {other.last_id} only"
        )

    def _fd_mismatch(self, message: Message, wanted: int, fd_count: int) -> ProtocolError:
        return self.error(
            f"fd count mismatch: {describe(message)} needs {wanted} fds, {fd_count} came with it"
        )


def may_send(ours: Direction, theirs: Direction) -> frozenset[type[Message]]:
    """The messages `SEND_ALLOWED` lets this side send in the directions' states."""
    return SEND_ALLOWED.get((ours.state, theirs.state), frozenset())


def send_state_error(message: Message, ours: Direction, theirs: Direction) -> LocalProtocolError:
    """Why *message* may not be sent in these states (not in `SEND_ALLOWED`)."""
    return LocalProtocolError(
        f"cannot send {describe(message)}: this side is {ours.state.value} and "
        f"the peer is {theirs.state.value}"
    )


def new_directions(max_open_handoffs: int) -> tuple[Direction, Direction]:
    ours = Direction("this side", LocalProtocolError, max_open_handoffs=max_open_handoffs)
    theirs = Direction("the peer", RemoteProtocolError, max_open_handoffs=max_open_handoffs)
    return ours, theirs
