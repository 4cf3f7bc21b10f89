"""Every error blobplane raises on purpose, rooted at `BlobError`.

The tree follows the failures a caller can act on. Three shapes recur, after
trio: *closed* (you closed it yourself), *broken* (the peer or the OS failed;
the original exception is kept as ``__cause__``) and *busy* (two users of one
resource at once). Protocol errors come in two kinds, after h11: a local one
(this side asked for something illegal) and a remote one (the peer sent
something illegal).

OS errors are translated in one place, `os_errors`, so that call sites stay
free of errno tables.
"""

from __future__ import annotations

import errno
from types import TracebackType


class BlobError(Exception):
    """Root of every error blobplane raises on purpose."""


# -- naming and bookkeeping -------------------------------------------------


class BlobNotFound(BlobError, KeyError):
    """The token names no blob this allocator knows (never created, or cleaned up)."""

    def __str__(self) -> str:
        # KeyError would wrap the message in quotes.
        return str(self.args[0]) if self.args else "blob not found"


class DescriptorMismatch(BlobError):
    """A descriptor was presented with a token it does not belong to."""


class MalformedMetadata(BlobError, ValueError):
    """A serialized token or descriptor could not be decoded or failed validation."""


# -- sizes and bounds -------------------------------------------------------


class InvalidSize(BlobError, ValueError):
    """A size is negative, not an integer, or larger than this host can back."""


class OutOfBounds(BlobError, IndexError):
    """A read or write reaches outside the blob."""


class NotBytesLike(BlobError, TypeError):
    """Data to write is not a buffer of bytes (bytes, bytearray, memoryview, array, ndarray)."""


# -- state ------------------------------------------------------------------


class BlobClosed(BlobError):
    """The object was closed or cleaned up by its owner and cannot be used any more."""


class BlobSealed(BlobError):
    """The blob is sealed: its contents can no longer be written."""


class BlobBusy(BlobError):
    """The resource is in use in a way that forbids the operation (live views, concurrent use)."""


class LeaseExpired(BlobError):
    """The blob's lease ran out; it is (or will be) reclaimed."""


# -- what a reader refuses ----------------------------------------------------


class UnsafeDescriptor(BlobError):
    """A received descriptor cannot be mapped safely; it was refused before mapping."""


class WrongKind(UnsafeDescriptor):
    """The fd is not a regular file or memfd (a pipe, socket, directory, device...)."""


class NotSealed(UnsafeDescriptor):
    """The fd lacks F_SEAL_SHRINK and F_SEAL_GROW, so its owner could truncate it under us."""


class DescriptorTooShort(UnsafeDescriptor):
    """The object behind the descriptor is smaller than its token says."""


class SparseBlob(UnsafeDescriptor):
    """The memfd's pages are not all allocated: reading it would allocate them in the reader.

    Refused unless the call was made with ``allow_sparse=True``.
    """


class UnsafePath(UnsafeDescriptor):
    """A `FilePath` or `Named` leads outside the blob folders, or through a symbolic link."""


# -- resources of the host -------------------------------------------------------


class BrokenResource(BlobError):
    """The OS or the peer failed underneath us; ``__cause__`` holds the original error."""


class OutOfSharedMemory(BrokenResource):
    """The host could not back the blob with memory (full tmpfs, memory limit)."""


class TooManyOpenFiles(BrokenResource):
    """The process hit its file-descriptor limit (RLIMIT_NOFILE)."""


class ConnectionClosed(BrokenResource):
    """The peer went away (or closed its end) before the exchange completed."""


class QuotaExceeded(BlobError):
    """The request would exceed a byte quota."""


class Timeout(BlobError, TimeoutError):
    """A blocking call did not complete within its timeout."""


# -- control protocol ---------------------------------------------------------------


class ProtocolError(BlobError):
    """The control protocol was violated; the connection is in an error state."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


# -- channels -------------------------------------------------------------------------


class NotSendable(BlobError, ValueError):
    """This blob cannot be handed over a channel: only sealed memfd blobs travel as fds."""


class PeerRefused(BlobError):
    """The peer answered a request with an ErrorReply (it refused a handoff, or the connection).

    ``code`` is the peer's machine-readable reason, ``reply_to`` the request id
    it answered (0: the connection as a whole).
    """

    def __init__(self, message: str, *, code: str = "", reply_to: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.reply_to = reply_to


class UnexpectedMessage(BlobError):
    """A call that expects one kind of message (a blob handoff) received another.

    The message was not consumed: the next `recv()` returns it.
    """


class ForbiddenPeer(BlobError):
    """The process on the other end runs as a user this side does not accept."""


class AddressInUse(BlobError):
    """Something else already lives at the socket path (a live listener, or not a socket)."""


class InvalidAddress(BlobError, ValueError):
    """A socket path or socket that cannot carry a channel (too long, wrong family or type)."""


class ConnectionRefused(BrokenResource):
    """Nobody listens at the socket path (no such file, or a stale socket)."""


_SPACE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EFAULT}
_FD_ERRNOS = {errno.EMFILE, errno.ENFILE}


class os_errors:  # a context manager used like a function: `with os_errors(...)`
    """Translate an `OSError` raised while *doing* something into a `BlobError`.

    The one place that knows which errno means what to a caller. A class rather
    than a @contextmanager generator because it wraps every syscall of a blob's
    life: the generator costs about 1 µs per use, this 0.3 µs.
    """

    __slots__ = ("doing",)

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not isinstance(exc, OSError):
            return
        doing = self.doing
        if exc.errno in _FD_ERRNOS:
            raise TooManyOpenFiles(
                f"{doing}: the process ran out of file descriptors ({exc.strerror}); "
                "close blobs you no longer need or raise the limit (ulimit -n)"
            ) from exc
        if exc.errno in _SPACE_ERRNOS:
            raise OutOfSharedMemory(
                f"{doing}: the host could not back the memory ({exc.strerror}); "
                "free blobs, or check the size of /dev/shm and the memory limit"
            ) from exc
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            raise ConnectionClosed(f"{doing}: the peer closed the connection") from exc
        raise BrokenResource(f"{doing}: {exc.strerror or exc}") from exc


# -- broker -------------------------------------------------------------------------------
# Appended after `os_errors` so that the file only ever grows at its end. None of
# these mixes in PermissionError: that is an OSError, and a server's
# `except OSError` around a socket must never mistake a refusal for a broken peer.


class UnknownClient(BlobError):
    """The registry knows no connected client by this id (never connected, or disconnected)."""


class DuplicateClient(BlobError):
    """A client id was connected twice; each connection needs an id of its own."""


class BlobDeleted(BlobNotFound):
    """The blob was deleted (or withdrawn): no new gets; readers that hold it keep reading."""


class KeyInUse(BlobError):
    """Another live blob already has this key; keys are unique among live blobs."""


class InvalidKey(BlobError, ValueError):
    """A blob key is empty, too long or not a string."""


class NotOwner(BlobError):
    """Only the client that created a blob may do this to it (seal it)."""


class RightMissing(BlobError):
    """The client's grant (its token) does not include the right this operation needs."""


class NotHolding(BlobError):
    """The client releases a reference to a blob it holds no reference to."""


class MemoryLimitExceeded(QuotaExceeded):
    """The broker's global memory limit leaves no room for the blob."""


class ClientQuotaExceeded(QuotaExceeded):
    """The client's own byte quota (max_bytes of its token) leaves no room for the blob."""


class BrokerLimitReached(QuotaExceeded):
    """A bound on what clients may make the broker hold was reached: connections,
    waiting gets, or the fds the broker keeps in reserve for the clients it serves."""


class TokenRefused(BlobError):
    """A capability token is malformed, forged, altered or minted under another key."""


class TokenExpired(TokenRefused):
    """A capability token is authentic but its time is up."""


class InvalidRights(BlobError, ValueError):
    """Rights that name no right the broker knows, or that cannot go together."""


class SecretKeyError(BlobError):
    """The broker's secret key (or its file) is missing, malformed or of the wrong length."""


class InsecureKeyFile(SecretKeyError):
    """The secret key file is readable or writable by others, or not a plain file of ours."""


class InvalidDuration(BlobError, ValueError):
    """A duration for people ("1h", "30m", "45s") could not be parsed."""


# -- streams ----------------------------------------------------------------------------


class StreamEnded(ConnectionClosed):
    """The publisher closed the stream or went away; no more frames will come."""


class SlotRewritten(BlobError):
    """Check mode: a pool slot changed generation while a reader held it (a producer bug)."""


# -- broker daemon and clients ------------------------------------------------------------


class BrokerShutdown(ConnectionClosed):
    """The broker is shutting down: the request was not carried out, and the connection ends."""


# -- federation ---------------------------------------------------------------------------


class PeerUnreachable(BrokenResource):
    """A peer broker (over Arrow Flight) could not be reached, refused this broker, stalled,
    or failed in the middle of a transfer; nothing of the transfer was published."""


# -- spilling -----------------------------------------------------------------------------


class BlobLost(BlobNotFound):
    """The broker spilled the blob to disk and could not read it back intact (a damaged or
    missing spill file); the blob is gone, as if deleted."""
