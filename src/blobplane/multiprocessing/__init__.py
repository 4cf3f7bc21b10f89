"""multiprocessing and concurrent.futures without pickling megabytes through a pipe.

``blobplane.multiprocessing.install()`` registers reducers with
multiprocessing's pickler (``multiprocessing.reduction.ForkingPickler``,
which Pool, ProcessPoolExecutor, Queue and Pipe use), so that numpy arrays,
pandas frames, series and indexes, pyarrow buffers, arrays and tables, and
memoryviews of at least *threshold* bytes travel as sealed memfds instead of
bytes in the pickle: each is packed once into a fresh memfd (as
`blobplane.objects.pack` does), the memfd is handed to the process that
unpickles it (see `sharer`), and that process maps it and gets read-only
views of the same memory: numpy arrays come with ``writeable=False``.

``bytes`` and ``bytearray`` cannot be caught that way (CPython's pickler
writes them itself, before it consults any reducer): wrap one in `share` to
send it through shared memory; it arrives as the same type, copied out once.

Child processes: a process started by multiprocessing while this is
installed installs it too (a forked child inherits it; a spawned or
forkserver child installs it as it unpickles its Process object, with the
same settings), so a Pool's or executor's results come back the same way.
For a child whose process class is your own subclass, pass
``initializer=blobplane.multiprocessing.install`` to the Pool or executor.

Trust: multiprocessing already unpickles without restriction between the
processes of one program; this changes nothing there. A received fd is
refused unless it is a memfd sealed against writing, shrinking and growing,
with every page allocated (`blobplane.backends.checks`), so no sender can
change the data under the reader or make it fault.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import mmap
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.context import ForkServerProcess, SpawnProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

from blobplane.backends.checks import F_SEAL_FUTURE_WRITE, get_seals
from blobplane.backends.mapping import physical_memory
from blobplane.backends.memfd import create_sealable_memfd, seal_memfd
from blobplane.backends.memlimit import check_can_allocate
from blobplane.blobs import map_descriptor
from blobplane.errors import BlobError, NotSealed
from blobplane.multiprocessing.sharer import claim, process_sharer
from blobplane.objects import ObjectHeader, loads
from blobplane.objects.reducers import OutOfBandPickler
from blobplane.types import UnixFd

__all__ = [
    "DEFAULT_THRESHOLD",
    "Shared",
    "install",
    "installed",
    "is_installed",
    "share",
    "unclaimed",
    "uninstall",
]

# Below this, pickling through the pipe is as fast as a memfd handoff, which costs
# a memfd, a socket round trip to the sender and a mapping (bench/executors.py
# --crossover measures both; docs/guide/multiprocessing.md has the figures).
DEFAULT_THRESHOLD = 1 << 20
DEFAULT_EXIT_TIMEOUT_S = 10.0
# Inside a shared object, buffers of at least this size (or the threshold, if lower)
# are laid out page-aligned and come back as views; smaller ones are copied out of
# the pickle stream, which saves a page of padding each.
_INNER_THRESHOLD = 64 * 1024
# The protocol of the reduction an object gets when it is not shared: what pickle
# itself uses for multiprocessing up to Python 3.13, and valid under 5 (3.14 on).
_PLAIN_PROTOCOL = 4

_PAGE = mmap.PAGESIZE
_MODULES = ("numpy", "pandas", "pyarrow")


@dataclass(frozen=True, slots=True)
class _Settings:
    threshold: int
    max_pending: int
    exit_timeout: float


# ForkingPickler.register() fills this table; there is no unregister(), so uninstall
# removes its entries here, and install notes what it replaces to put it back.
_FORKING_REDUCERS: dict[type, Any] = ForkingPickler._extra_reducers  # type: ignore[attr-defined]  # noqa: SLF001
_lock = threading.RLock()
_settings: _Settings | None = None
# Each type we registered, with the reducer it had before (None: it had none).
_replaced: dict[type, Any] = {}
_covered: set[str] = set()  # which of _MODULES have their types registered
_warned = False


def install(
    threshold: int | None = None,
    *,
    max_pending: int | None = None,
    exit_timeout: float | None = None,
) -> None:
    """Send large arrays, frames, tables and memoryviews through shared memory from now on.

    *threshold*: the smallest object (in bytes) that travels as a memfd
    (`DEFAULT_THRESHOLD`, 1 MiB); smaller ones are pickled as before.
    *max_pending*: at most this many bytes of sent objects may wait for
    their readers (a quarter of the RAM by default); beyond it, objects are
    pickled as before, so a Pool that queues every task at once cannot
    double the memory it uses. *exit_timeout*: how long the exit of this
    process (or `uninstall`) waits for readers to take what it sent (10 s).

    Calling it again changes the settings given; it is also a valid Pool or
    executor ``initializer``. It registers the types of numpy (imported
    here if it is installed), and of pandas and pyarrow if they are
    imported: import them first, or call it again after.
    """
    global _settings
    with _lock:
        current = _settings
        if threshold is None:
            threshold = current.threshold if current else DEFAULT_THRESHOLD
        if max_pending is None:
            max_pending = current.max_pending if current else physical_memory() // 4
        if exit_timeout is None:
            exit_timeout = current.exit_timeout if current else DEFAULT_EXIT_TIMEOUT_S
        if threshold < 0 or max_pending < 0 or exit_timeout < 0:
            raise ValueError("threshold, max_pending and exit_timeout cannot be negative")
        _settings = _Settings(threshold, max_pending, exit_timeout)
        process_sharer().exit_timeout = exit_timeout
        process_sharer().ensure_exit_hook()
        if current is None:
            _register(memoryview, _reduce_memoryview)
            _register(SpawnProcess, _reduce_process)
            _register(ForkServerProcess, _reduce_process)
            try:
                import numpy  # noqa: F401
            except ImportError:
                pass
        _cover_imported()


def uninstall(timeout: float | None = None) -> int:
    """Pickle as multiprocessing does by default again; release what nobody received.

    Objects already sent stay available to their readers for up to
    *timeout* s (the *exit_timeout* of `install` by default) while a
    multiprocessing parent or child of this process lives; then those still
    pending are released, and loading their pickles fails. Returns how many
    were released that way. Processes started meanwhile keep it installed.
    """
    global _settings
    with _lock:
        current = _settings
        _settings = None
        for tp, previous in _replaced.items():
            if previous is None:
                _FORKING_REDUCERS.pop(tp, None)
            else:
                ForkingPickler.register(tp, previous)
        _replaced.clear()
        _covered.clear()
    if timeout is None:
        timeout = current.exit_timeout if current else DEFAULT_EXIT_TIMEOUT_S
    return process_sharer().drain(timeout)


@contextlib.contextmanager
def installed(
    threshold: int | None = None,
    *,
    max_pending: int | None = None,
    exit_timeout: float | None = None,
) -> Iterator[None]:
    """`install` for the ``with`` block; on leaving it, the previous state comes back.

    If it was not installed before, leaving it is `uninstall`: objects sent
    in the block that nobody has received are released (after the wait
    `uninstall` describes), so nothing outlives the block.
    """
    global _settings
    with _lock:
        before = _settings
    install(threshold, max_pending=max_pending, exit_timeout=exit_timeout)
    try:
        yield
    finally:
        if before is None:
            uninstall()
        else:
            with _lock:
                _settings = before
                process_sharer().exit_timeout = before.exit_timeout


def is_installed() -> bool:
    return _settings is not None


def unclaimed() -> tuple[int, int]:
    """How many objects this process sent are waiting for their readers, and their bytes."""
    return process_sharer().pending


class Shared:
    """An object that travels through shared memory whatever its size, installed or not.

    The reader gets the object itself (not a `Shared`): `bytes` and
    `bytearray` copied out of the mapping once, anything else as `install`
    describes. Made by `share`.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __reduce__(self) -> tuple[Any, ...]:
        obj = self.obj
        if type(obj) is bytes:
            shared = _shared(memoryview(obj), ("bytes",))
        elif type(obj) is bytearray:
            shared = _shared(memoryview(obj), ("bytearray",))
        elif type(obj) is memoryview:
            shared = _share_memoryview(obj)
        else:
            shared = _shared(obj)
        return shared if shared is not None else (_identity, (obj,))

    def __repr__(self) -> str:
        return f"share({self.obj!r})"


def share(obj: object) -> Shared:
    """Wrap *obj* so that pickling it sends it through shared memory (any picklable object)."""
    return Shared(obj)


# --------------------------------------------------------------------------- registration


def _register(tp: type, reducer: Callable[[Any], Any]) -> None:
    if tp not in _replaced:
        _replaced[tp] = _FORKING_REDUCERS.get(tp)
    ForkingPickler.register(tp, reducer)


def _cover_imported() -> None:
    """Register the types of whichever of numpy, pandas and pyarrow are imported by now."""
    if _settings is None or len(_covered) == len(_MODULES):
        return
    with _lock:
        if _settings is None:
            return
        for name in _MODULES:
            module = sys.modules.get(name)
            if name in _covered or module is None:
                continue
            try:
                reducers = _REDUCERS_OF[name](module)
            except AttributeError:
                continue  # imported halfway (another thread is importing it): next time
            for tp, reducer in reducers.items():
                _register(tp, reducer)
            _covered.add(name)


def _subclasses(tp: type) -> set[type]:
    found = {tp}
    sub: type
    for sub in tp.__subclasses__():
        found |= _subclasses(sub)
    return found


def _numpy_reducers(np: Any) -> dict[type, Callable[[Any], Any]]:
    return {np.ndarray: _reduce_ndarray}


def _pandas_reducers(pd: Any) -> dict[type, Callable[[Any], Any]]:
    types = {pd.DataFrame, pd.Series, *_subclasses(pd.Index)}
    return dict.fromkeys(types, _reduce_pandas)


def _pyarrow_reducers(pa: Any) -> dict[type, Callable[[Any], Any]]:
    types = {pa.Buffer, pa.Table, pa.RecordBatch, pa.ChunkedArray, *_subclasses(pa.Array)}
    return dict.fromkeys(types, _reduce_pyarrow)


_REDUCERS_OF: dict[str, Callable[[Any], dict[type, Callable[[Any], Any]]]] = {
    "numpy": _numpy_reducers,
    "pandas": _pandas_reducers,
    "pyarrow": _pyarrow_reducers,
}


# --------------------------------------------------------------------------- reducers


def _large(nbytes: int) -> bool:
    settings = _settings
    return settings is not None and nbytes >= settings.threshold


def _reduce_ndarray(array: Any) -> Any:
    if not array.dtype.hasobject and _large(array.nbytes):
        shared = _shared(array)
        if shared is not None:
            return shared
    return array.__reduce_ex__(_PLAIN_PROTOCOL)


def _pandas_nbytes(obj: Any) -> int:
    usage = obj.memory_usage(deep=False)
    return int(usage if isinstance(usage, int) else usage.sum())


def _reduce_pandas(obj: Any) -> Any:
    try:
        nbytes = _pandas_nbytes(obj)
    except (AttributeError, TypeError, ValueError):
        nbytes = 0
    if _large(nbytes):
        shared = _shared(obj)
        if shared is not None:
            return shared
    return obj.__reduce_ex__(_PLAIN_PROTOCOL)


def _reduce_pyarrow(obj: Any) -> Any:
    # A Buffer says its size as .size; arrays, chunked arrays, batches and tables as .nbytes.
    nbytes = obj.nbytes if hasattr(obj, "nbytes") else obj.size
    if _large(int(nbytes)):
        shared = _shared(obj)
        if shared is not None:
            return shared
    return obj.__reduce_ex__(_PLAIN_PROTOCOL)


def _reduce_memoryview(view: memoryview) -> Any:
    # A memoryview has no pickling of its own: a small one travels as bytes in the stream.
    if _large(view.nbytes):
        shared = _share_memoryview(view)
        if shared is not None:
            return shared
    return _rebuild_memoryview, (view.tobytes(), view.format, view.shape)


def _share_memoryview(view: memoryview) -> Any:
    return _shared(view, ("memoryview", view.format, view.shape))


def _reduce_process(process: Any) -> Any:
    """A Process pickled for a spawn or forkserver start: the child installs this as it loads it."""
    func, args, *rest = process.__reduce_ex__(_PLAIN_PROTOCOL)
    settings = _settings
    if settings is None:
        return (func, args, *rest)
    wanted = (settings.threshold, settings.max_pending, settings.exit_timeout, sorted(_covered))
    return (_install_then, (wanted, func, args), *rest)


def _install_then(wanted: tuple[Any, ...], func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    threshold, max_pending, exit_timeout, modules = wanted
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            pass
    install(threshold, max_pending=max_pending, exit_timeout=exit_timeout)
    return func(*args)


def _shared(obj: object, restore: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """The reduction that sends *obj* as a memfd; None when it cannot (pickle it as usual).

    *restore* says what the reader turns the rebuilt object into (see `_rebuild`).
    """
    settings = _settings
    max_pending = settings.max_pending if settings else physical_memory() // 4
    server = process_sharer()
    try:
        inner = min(settings.threshold, _INNER_THRESHOLD) if settings else _INNER_THRESHOLD
        written = _write_memfd(obj, inner, lambda size: server.fits(size, max_pending))
        if written is None:
            return None
        fd, size, header = written
        try:
            address, token = server.offer(fd, size)
        finally:
            os.close(fd)  # the sharer holds its own duplicate
    except (BlobError, OSError) as exc:
        _warn_once(exc)
        return None
    _cover_imported()
    return _rebuild, (address, token, size, header, restore)


def _write_memfd(
    obj: object, inner: int, room: Callable[[int], bool]
) -> tuple[int, int, bytes] | None:
    """Pickle *obj* into a new sealed memfd: ``(fd, size, encoded ObjectHeader)``.

    The layout is `blobplane.objects.pack`'s without its trailer (the header
    travels in the pickle instead): every large buffer at a page-aligned
    offset, then the pickle stream. It is written with pwrite, not through a
    mapping: the kernel then copies each page once as it allocates it,
    where fallocate, a pre-faulted mapping and a copy into it touch every
    page three times (about 40% slower at 64 MiB). Every page is written,
    padding included, so the reader finds the memfd fully allocated.
    Buffers of at least *inner* bytes are laid out that way (and come back
    as views); smaller ones stay in the stream (and come back as copies).
    None when *room* refuses the size.
    """
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    OutOfBandPickler(stream, inner, buffers).dump(obj)
    pieces: list[tuple[int, memoryview]] = []
    offsets, lengths, end = [], [], 0
    data = stream.getbuffer()
    try:
        for buffer in buffers:
            raw = buffer.raw()
            start = -(-end // _PAGE) * _PAGE
            offsets.append(start)
            lengths.append(raw.nbytes)
            pieces.append((start, raw))
            end = start + raw.nbytes
        header = ObjectHeader(b"", offsets, lengths, end, end, len(data))
        size = end + len(data)
        if not room(size):
            return None
        check_can_allocate(size, "an object sent through shared memory")
        fd = create_sealable_memfd("blobplane:mp")
        try:
            written = 0
            for start, raw in [*pieces, (end, data)]:
                if start > written:
                    _pwrite_all(fd, memoryview(bytes(start - written)), written)  # padding
                _pwrite_all(fd, raw, start)
                written = start + raw.nbytes
            seal_memfd(fd, "an object sent through shared memory")
        except BaseException:
            os.close(fd)
            raise
    finally:
        for _, raw in pieces:
            raw.release()
        data.release()
    return fd, size, header.to_msgpack()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _warn_once(exc: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"blobplane.multiprocessing could not put an object in shared memory ({exc}); "
            "it is pickled the usual way instead (this warning is shown once)",
            RuntimeWarning,
            stacklevel=2,
        )


# --------------------------------------------------------------------------- the reading side


def _rebuild(
    address: bytes, token: bytes, size: int, header: bytes, restore: tuple[Any, ...] = ()
) -> Any:
    """Take the memfd from its sender, check and map it, and rebuild the object over it.

    *restore* turns the rebuilt memoryview back into what was sent: ``("bytes",)``,
    ``("bytearray",)`` (copied out once), ``("memoryview", format, shape)``.
    """
    fd = claim(address, token)
    try:
        seals = get_seals(fd)
        if seals is None or not seals & (F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_WRITE):
            raise NotSealed(
                f"the memfd of a received object is not sealed against writing (seals={seals}); "
                "its sender could change it while we read"
            )
        mapped = map_descriptor(UnixFd(fd), size)  # refuses what check_received_fd refuses
    finally:
        os.close(fd)  # the mapping keeps the memfd alive
    obj = loads(ObjectHeader.from_msgpack(header), mapped)
    _cover_imported()  # results sent back from here should travel the same way
    match restore:
        case ("bytes",):
            return bytes(obj)
        case ("bytearray",):
            return bytearray(obj)
        case ("memoryview", fmt, shape):
            return _shaped(obj, fmt, shape)
    return obj


def _rebuild_memoryview(data: bytes, fmt: str, shape: tuple[int, ...]) -> memoryview:
    return _shaped(memoryview(data), fmt, shape)


def _shaped(view: memoryview, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """*view* (flat bytes) with the format and shape it was sent with, where cast() allows it."""
    flat: Any = view.cast("B")  # Any: cast() is typed for literal formats only
    try:
        view = flat.cast(fmt, shape)
    except (TypeError, ValueError):
        pass  # a format cast() does not know (a struct): flat bytes it stays
    return view.toreadonly()


def _identity(obj: object) -> object:
    return obj


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()  # another thread of the parent may have held it


os.register_at_fork(after_in_child=_reset_after_fork)
