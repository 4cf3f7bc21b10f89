"""The control protocol, sans-I/O: frames, typed messages, and which fds ride with which.

Drivers (`blobplane.channel`) own the sockets; this package owns the rules.
See `state` for the theory of operation, `frames` for the byte layout and
`messages` for the message types.
"""

from blobplane.wire.connection import Connection, Framing
from blobplane.wire.events import NEED_DATA, Event, NeedData, PeerClosed, Received
from blobplane.wire.frames import HEADER_SIZE, MAX_FDS_PER_MESSAGE, MAX_FRAME_SIZE, VERSION
from blobplane.wire.messages import (
    Ack,
    BlobHandoff,
    ErrorCode,
    ErrorReply,
    Message,
    SlotRef,
    UserPayload,
)
from blobplane.wire.state import MAX_OPEN_HANDOFFS, State

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS_PER_MESSAGE",
    "MAX_FRAME_SIZE",
    "MAX_OPEN_HANDOFFS",
    "NEED_DATA",
    "VERSION",
    "Ack",
    "BlobHandoff",
    "Connection",
    "ErrorCode",
    "ErrorReply",
    "Event",
    "Framing",
    "Message",
    "NeedData",
    "PeerClosed",
    "Received",
    "SlotRef",
    "State",
    "UserPayload",
]
