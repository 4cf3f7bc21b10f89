"""Private folders for file-backed blobs: created 0700, verified, swept of orphans.

A blob file is named ``<pid>-<128 random bits>``: the name cannot be guessed,
and the pid lets a later process reclaim the files of a producer that died
without cleaning up (SIGKILL), which `multiprocessing.shared_memory` cannot.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
import threading

from blobplane.errors import BrokenResource, os_errors

_swept: set[str] = set()
_sweep_lock = threading.Lock()


def ensure_private_dir(path: str) -> str:
    """Create *path* as a 0700 folder of this user, or verify the one that exists."""
    with os_errors(f"creating the private folder {path}"):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise BrokenResource(
            f"{path} exists but is not a private folder of uid {os.getuid()} "
            f"(a directory, owned by us, mode 0700); remove it or set BLOBPLANE_DIR"
        )
    return path


def temp_root() -> str:
    """Folder for temp-file blobs: $BLOBPLANE_DIR, else $XDG_RUNTIME_DIR, else the temp dir."""
    explicit = os.environ.get("BLOBPLANE_DIR")
    if explicit:
        return ensure_private_dir(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
    return ensure_private_dir(os.path.join(base, f"blobplane-{os.getuid()}"))


SHM_ROOT = "/dev/shm"


def shm_root() -> str:
    """This user's private folder inside /dev/shm ($BLOBPLANE_SHM_DIR), home of named segments.

    A `Named` descriptor is a name inside this folder, so producer and
    consumer must agree on it: same user, same environment.
    """
    explicit = os.environ.get("BLOBPLANE_SHM_DIR")
    if explicit:
        return ensure_private_dir(explicit)
    return ensure_private_dir(os.path.join(SHM_ROOT, f"blobplane-{os.getuid()}"))


def new_blob_name() -> str:
    return f"{os.getpid()}-{secrets.token_hex(16)}"


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(folder: str) -> list[str]:
    """Unlink the blob files in *folder* whose creating process is gone; return their names."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        pid_text, _, _ = name.partition("-")
        if not pid_text.isdigit() or _pid_is_alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def sweep_once(folder: str) -> None:
    """Sweep *folder* the first time this process uses it."""
    with _sweep_lock:
        if folder in _swept:
            return
        _swept.add(folder)
    sweep_orphans(folder)
