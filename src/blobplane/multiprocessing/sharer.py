"""Handing an fd to whichever process unpickles it: each sending process serves its pending fds.

A pickle is bytes, and a pipe cannot carry an fd, so the fd waits in the
sending process: `FdSharer.offer` keeps a duplicate under a random 128-bit
token and returns ``(address, token)``, which go into the pickle. The
process that unpickles it connects to *address* (a Unix socket in the
abstract namespace: no file to leave behind, whatever kills the process),
sends the token and receives the fd with SCM_RIGHTS; the sender closes its
duplicate as it sends it. A process that unpickles its own pickle takes the
fd straight from the table.

The token is the capability: whoever holds the pickle may take the fd, as
they could have read the bytes had it been pickled whole. The server also
refuses peers running as another user before reading anything from them, so
only this user's processes can so much as make it wait.

Lifetime of an fd nobody takes (the pickle was dropped unread, its reader
died first, a pool was terminated with tasks queued): it stays until
`drain` releases it (`blobplane.multiprocessing.uninstall`, and the exit
of the process, call it) or the process ends. A forked child closes the
duplicates it inherited at once: they are its parent's to hand out.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass

from blobplane.errors import BlobNotFound, ConnectionClosed, ConnectionRefused, Timeout
from blobplane.fds import close_fds

__all__ = ["CLAIM_TIMEOUT_S", "SERVE_TIMEOUT_S", "FdSharer", "claim", "process_sharer"]

TOKEN_BYTES = 16
# How long a reader waits for the sender to answer: the sender's server thread
# needs the GIL, which a busy sender hands over every few milliseconds.
CLAIM_TIMEOUT_S = 60.0
# How long the server gives one connected reader to send its token: a peer that
# connects and says nothing must not stop the others from being served.
SERVE_TIMEOUT_S = 5.0
_SENT = b"\x01"
_UNKNOWN = b"\x00"
_UCRED = struct.Struct("3i")


@dataclass(slots=True)
class _Pending:
    fd: int
    size: int


def relatives_alive() -> bool:
    """Whether a multiprocessing parent or child of this process lives (someone who could claim)."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.is_alive():
        return True
    return bool(multiprocessing.active_children())


class FdSharer:
    """The fds this process offered and nobody has taken yet, and the server that hands them out.

    The server (a socket and a daemon thread) starts with the first offer
    and stops in `drain` once nothing is pending.
    """

    def __init__(self) -> None:
        # How long the exit of the process waits for readers to take what is pending.
        self.exit_timeout = 10.0
        self._exit_hook: multiprocessing.util.Finalize | None = None
        self._reset()

    def ensure_exit_hook(self) -> None:
        """Have the exit of this process drain the pending fds (see `drain`).

        Registered ahead of any offer, not with it: multiprocessing runs only
        the finalizers registered when its exit begins, and a Queue pickles
        what was put last as that exit flushes it. A process started by
        multiprocessing clears the finalizers it inherited, then runs its
        after-fork hooks, which call this again.
        """
        hook = self._exit_hook
        if hook is None or not hook.still_active():
            self._exit_hook = multiprocessing.util.Finalize(None, _drain_at_exit, exitpriority=-10)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: dict[bytes, _Pending] = {}
        self._pending_bytes = 0
        self._server: socket.socket | None = None
        self._address: bytes | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def pending(self) -> tuple[int, int]:
        """How many fds wait to be taken, and the bytes behind them."""
        with self._lock:
            return len(self._pending), self._pending_bytes

    @property
    def serving(self) -> bool:
        return self._server is not None

    def offer(self, fd: int, size: int) -> tuple[bytes, bytes]:
        """Keep a duplicate of *fd* (of *size* bytes) for whoever presents the token.

        Returns ``(address, token)``, what a reader passes to `claim`.
        """
        with self._lock:
            if self._server is None:
                self._start()
            assert self._address is not None
            token = secrets.token_bytes(TOKEN_BYTES)
            self._pending[token] = _Pending(os.dup(fd), size)
            self._pending_bytes += size
            return self._address, token

    def fits(self, size: int, max_pending: int) -> bool:
        """Whether *size* more bytes keep the pending total within *max_pending*."""
        return self._pending_bytes + size <= max_pending

    def take(self, token: bytes) -> int | None:
        """The pending fd offered under *token*, now the caller's to close; None if none is."""
        with self._lock:
            entry = self._pending.pop(token, None)
            if entry is None:
                return None
            self._pending_bytes -= entry.size
            self._changed.notify_all()
            return entry.fd

    def local(self, address: bytes) -> bool:
        """Whether *address* is this process's own server (a pickle read where it was made)."""
        return address == self._address and os.getpid() == self._pid

    def drain(self, timeout: float, *, stop: bool = True) -> int:
        """Wait up to *timeout* s for the pending fds to be taken, release the rest.

        The wait lasts only while a multiprocessing parent or child of this
        process is alive: nobody else holds this process's pickles, so with
        none left the rest will never be taken. With *stop*, the server
        stops too (it starts again with the next offer). Returns how many
        were released untaken.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not relatives_alive():
                    break
                self._changed.wait(min(remaining, 0.05))
            released = list(self._pending.values())
            self._pending.clear()
            self._pending_bytes = 0
            server = thread = None
            if stop:
                server, self._server, self._address = self._server, None, None
                thread, self._thread = self._thread, None
        close_fds(entry.fd for entry in released)
        if server is not None:
            # shutdown() wakes the accept() the server thread blocks in.
            try:
                server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            server.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(SERVE_TIMEOUT_S + 1)
        return len(released)

    def _start(self) -> None:
        address = b"\0blobplane-mp-%d-%s" % (os.getpid(), secrets.token_hex(8).encode())
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(address)
            server.listen(128)
        except BaseException:
            server.close()
            raise
        thread = threading.Thread(
            target=self._serve, args=(server,), name="blobplane-fd-sharer", daemon=True
        )
        thread.start()
        self._server, self._address, self._thread = server, address, thread
        self.ensure_exit_hook()

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # drain() shut the socket down (or the process is going)
            with conn:
                try:
                    self._answer(conn)
                except (OSError, ValueError):
                    pass  # that reader went away or misbehaved; the next one is served

    def _answer(self, conn: socket.socket) -> None:
        _, uid, _ = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        if uid != os.getuid():
            return
        conn.settimeout(SERVE_TIMEOUT_S)
        token = _recv_exactly(conn, TOKEN_BYTES)
        fd = self.take(token)
        if fd is None:
            conn.sendall(_UNKNOWN)
            return
        try:
            socket.send_fds(conn, [_SENT], [fd])
        finally:
            os.close(fd)  # sent or not: the token was spent

    def after_fork_in_child(self) -> None:
        """Drop what the parent was serving: its fds, its socket (this copy only), its state."""
        fds = [entry.fd for entry in self._pending.values()]
        server = self._server
        self._reset()
        close_fds(fds)
        if server is not None:
            server.close()  # our copy of the parent's listening socket; the parent keeps its own


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the reader hung up before sending its token")
        data += chunk
    return data


def claim(address: bytes, token: bytes, timeout: float = CLAIM_TIMEOUT_S) -> int:
    """The fd offered at *address* under *token* (the caller closes it).

    `ConnectionRefused` when the sending process is gone, `BlobNotFound`
    when it holds no such fd any more (taken already, or released by
    `uninstall`), `Timeout` when it does not answer within *timeout* s.
    """
    own = process_sharer()
    if own.local(address):
        fd = own.take(token)
        if fd is None:
            raise BlobNotFound(_gone_message("this process"))
        return fd
    pid = address.split(b"-")[2].decode(errors="replace")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            sock.sendall(token)
            # MSG_CMSG_CLOEXEC: an exec in another thread must not inherit the fd.
            message, fds, _, _ = socket.recv_fds(sock, 1, 1, socket.MSG_CMSG_CLOEXEC)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise ConnectionRefused(
                f"process {pid}, which sent this object through shared memory, is gone; "
                "a sender must live until its objects are received"
            ) from exc
        except TimeoutError as exc:
            raise Timeout(
                f"process {pid}, which sent this object, did not hand it over in {timeout} s"
            ) from exc
        except OSError as exc:
            raise ConnectionClosed(f"receiving an object from process {pid} failed: {exc}") from exc
    if message == _SENT and len(fds) == 1:
        return fds[0]
    close_fds(fds)
    if message == _UNKNOWN:
        raise BlobNotFound(_gone_message(f"process {pid}"))
    raise ConnectionClosed(f"process {pid} hung up before handing over an object it sent")


def _gone_message(who: str) -> str:
    return (
        f"{who} no longer holds this object: each pickle made by blobplane.multiprocessing "
        "can be loaded once, and a sender releases what is still unclaimed when it "
        "uninstalls or exits"
    )


_SHARER = FdSharer()


def process_sharer() -> FdSharer:
    """This process's sharer."""
    return _SHARER


def _drain_at_exit() -> None:
    # Runs after multiprocessing's queues have flushed (their finalizers, at
    # priority -5, come first), so what they pickled last is pending here, and
    # a reader still alive gets the time to take it.
    _SHARER.drain(_SHARER.exit_timeout)


os.register_at_fork(after_in_child=_SHARER.after_fork_in_child)
multiprocessing.util.register_after_fork(_SHARER, FdSharer.ensure_exit_hook)
