"""Control channels: typed messages and file descriptors between processes over Unix sockets.

``blobplane.channel`` is the blocking flavour; ``blobplane.channel.aio`` has
the same names for asyncio (``await ch.recv_blob()``). Both drive the
sans-I/O protocol in ``blobplane.wire``::

    from blobplane import channel

    with channel.listen(path) as listener, listener.accept() as ch:   # consumer
        with ch.recv_blob(timeout=5) as mapped:
            use(mapped.as_slice())

    with channel.connect(path) as ch:                                # producer
        with blobs.create(size) as blob:
            blob.write_all(data)
            blob.seal()
            ch.send_blob(blob)          # returns once the consumer has mapped it

On Linux a channel is a ``SOCK_SEQPACKET`` socket: every message arrives
whole, with its fds. ``transport="stream"`` selects ``SOCK_STREAM`` where
SEQPACKET is missing; ``connect()`` follows whichever the listener uses.
The listening socket is created 0600 in a private 0700 folder, and both
ends refuse a peer of another uid unless ``allowed_uids=`` says otherwise;
``ch.peer_credentials`` gives the peer's pid, uid and gid.

Who owns what after a handoff
-----------------------------

``send_blob(blob)`` sends the blob's fd with ``SCM_RIGHTS``. The kernel
gives the receiver its own fd for the same memfd, so from that moment the
memory has two independent owners, and it is freed only when both are done.

- The sender keeps its ``ProducerBlob``, and may clean it up (or exit, or
  be killed) as soon as ``send_blob`` returns, even with ``wait=False``: an
  fd in flight in the socket holds the memory as firmly as an open one.
  What the receiver maps stays valid whatever the sender does next.
- The receiver owns what ``recv_blob()`` returns, a read-only
  ``MappedRead``, and frees its side with ``close()`` (or ``with``). The
  received fd itself is closed before ``recv_blob`` returns, as soon as
  the mapping exists, so holding many blobs does not use up fds beyond the
  one that Python's ``mmap`` keeps per mapping.
- Nobody can change the bytes under the receiver: only sealed memfds may be
  sent (``NotSendable`` otherwise), and the receiver checks again before
  mapping: a regular file of at least the token's size, with
  ``F_SEAL_SHRINK | F_SEAL_GROW``. A pipe, socket, directory, ``/dev/shm``
  file, memfd made without ``MFD_ALLOW_SEALING``, unsealed or too short
  memfd is closed unmapped; the sender gets an ``ErrorReply`` (its
  ``send_blob`` raises ``PeerRefused``), the receiver's ``recv_blob``
  raises the check's ``UnsafeDescriptor`` subclass, and the channel
  carries on.
- ``recv()`` is the low-level way: it returns any message with its fds,
  and then the caller owns those fds (close them) and must answer a
  ``BlobHandoff`` with an ``Ack`` or ``ErrorReply`` itself. Fds passed to
  ``send(message, fds)`` are only borrowed: the caller still closes them.
- The channel owns every fd it received and has not handed out; closing the
  channel, or any failure, closes them.

Behaviour
---------

- Timeouts: every blocking call takes ``timeout=`` in seconds (``None``:
  wait forever; default: the channel's ``timeout``, 30 s) and raises
  ``blobplane.errors.Timeout`` when it runs out. A timeout leaves the
  channel usable, except a ``SOCK_STREAM`` send cut off in mid-message,
  which breaks the stream (``BrokenResource`` from then on).
- Closed: after ``close()`` every call raises ``BlobClosed``; closing twice
  is fine. Closing an asyncio channel wakes the tasks waiting on it, which
  raise ``BlobClosed``. (A sync call blocked in another thread is not
  woken; it ends at its timeout.)
- Peer gone: end of stream or ``ECONNRESET``, including a peer killed in
  the middle of a message, raises ``ConnectionClosed``, and so does every
  later call. A send that finds the peer gone (``EPIPE``) raises
  ``ConnectionClosed`` for that and every later send, while what the peer
  sent before it left can still be received, up to the end of stream. A
  blob already mapped stays readable.
- Peer misbehaving: a malformed or oversized frame, wrong fds, a version
  mismatch raise ``RemoteProtocolError``; the peer is sent an ``ErrorReply``
  saying why, and the channel is closed (the same error every later call).
  Fds that came with the bad message are closed.
- Fd exhaustion: if the kernel drops fds that came with a message
  (``MSG_CTRUNC``), usually because this process is at ``RLIMIT_NOFILE``,
  the call raises ``TooManyOpenFiles`` naming the limit, and the channel
  is closed.
- Busy: one receiver and one sender at a time. A second task (or thread)
  receiving while another does (``recv``, ``recv_blob``, ``send_blob``
  awaiting its reply) gets ``BlobBusy``, and so does a second sender while a
  send waits for room in the socket. Nothing is queued silently.
- ``send_blob`` waits for the peer's reply: ``Ack`` (mapped) returns, an
  ``ErrorReply`` raises ``PeerRefused``. Other messages arriving meanwhile
  are kept, in order, for ``recv()``. Two peers that ``send_blob`` to each
  other at the same time both wait for a reply nobody sends until their
  timeouts: use ``wait=False`` for pipelining and read replies with
  ``recv()``.
- ``recv_blob`` receives only a handoff: anything else is left for
  ``recv()`` and ``UnexpectedMessage`` is raised. ``recv_handoff()`` is the
  same with the token, the sender's ``meta`` bytes (``send_blob(blob,
  meta=...)``, up to 4 KiB) and the request id beside the mapping.
- Each ``send`` returns the message's request id; replies name it in
  ``reply_to``. ``send_payload(data, fds)`` sends bytes already encoded by
  the caller as a ``UserPayload``; ``try_send_payload(data, fds)`` does so
  only if the socket takes it whole at once (True), and otherwise sends
  nothing (False), for code that must never wait, such as an event loop's
  callback.
"""

from blobplane.channel.base import DEFAULT
from blobplane.channel.core import DEFAULT_TIMEOUT
from blobplane.channel.ops import Handoff
from blobplane.channel.sync import Channel, Listener, connect, from_socket, listen, socketpair
from blobplane.channel.transport import ALL_UIDS, PeerCredentials, Transport

__all__ = [
    "ALL_UIDS",
    "DEFAULT",
    "DEFAULT_TIMEOUT",
    "Channel",
    "Handoff",
    "Listener",
    "PeerCredentials",
    "Transport",
    "connect",
    "from_socket",
    "listen",
    "socketpair",
]
