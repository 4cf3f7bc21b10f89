"""A peer names the blob by path or name: the reader opens only what a blob file could be.

The hostile peer sends a `FilePath` or `Named` that leads to a FIFO (an
open() that waits forever for a writer), to a file outside the blob folders
(/etc/shadow, an ssh key), through a symbolic link, or to a device. The reader
refuses each one before it reads a byte, and never waits.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobplane import FilePath, Named, map_descriptor, read_blob_contents
from blobplane.backends.files import check_blob_name, resolve_file_path
from blobplane.backends.private_dir import new_blob_name, shm_root, temp_root
from blobplane.errors import BlobNotFound, SparseBlob, UnsafeDescriptor, UnsafePath, WrongKind
from children import run_python

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]

# A child reads what the peer named; a reader that waits is killed after this long.
READ_TIMEOUT_S = 15

READ_IN_CHILD = """
import sys
from blobplane import decode_descriptor, read_blob_contents
try:
    read_blob_contents(decode_descriptor(sys.argv[1]), int(sys.argv[2]))
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("read")
"""


@pytest.fixture
def in_blob_folder() -> Iterator[list[str]]:
    """Paths to remove after the test: whatever a test puts in the blob folders."""
    made: list[str] = []
    yield made
    for path in made:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass


def _read_in_child(descriptor: FilePath | Named, size: int) -> str:
    result = run_python(
        READ_IN_CHILD, descriptor.to_json().decode(), str(size), timeout=READ_TIMEOUT_S
    )
    return result.stdout.strip()


@pytest.mark.parametrize("where", ["temp", "shm"])
def test_a_fifo_is_refused_without_waiting(where: str, in_blob_folder: list[str]) -> None:
    name = new_blob_name()
    folder = temp_root() if where == "temp" else shm_root()
    path = os.path.join(folder, name)
    os.mkfifo(path, 0o600)
    in_blob_folder.append(path)
    descriptor: FilePath | Named = FilePath(path) if where == "temp" else Named(name)
    # In a child, so that a reader that blocks in open() fails this test instead of hanging it.
    answer = _read_in_child(descriptor, 16)
    assert answer.startswith("WrongKind"), answer
    assert "a pipe" in answer
    with pytest.raises(WrongKind, match="a pipe"):
        map_descriptor(descriptor, 16)


def test_a_file_outside_the_blob_folders_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "id_ed25519"
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    for path in (str(secret), "/etc/passwd", "/proc/self/environ"):
        answer = _read_in_child(FilePath(path), 8)
        assert answer.startswith("UnsafePath"), answer
        with pytest.raises(UnsafePath, match="outside the blob folders") as refused:
            read_blob_contents(FilePath(path), 8)
        assert isinstance(refused.value, UnsafeDescriptor)


def test_dot_dot_and_relative_paths_are_refused(tmp_path: Path) -> None:
    outside = os.path.join(os.path.dirname(temp_root()), f"outside-{os.getpid()}")
    for path in (
        os.path.join(temp_root(), "..", os.path.basename(outside)),
        os.path.join(temp_root(), "sub", "..", "..", "x"),
        "relative/blob",
        new_blob_name(),
        temp_root() + "/",
        temp_root() + "/..",
    ):
        with pytest.raises(UnsafePath):
            map_descriptor(FilePath(path), 1)


def test_a_symbolic_link_in_the_blob_folder_is_not_followed(
    tmp_path: Path, in_blob_folder: list[str]
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"not a blob" * 10)
    link = os.path.join(temp_root(), new_blob_name())
    os.symlink(target, link)
    in_blob_folder.append(link)
    with pytest.raises(UnsafePath, match="symbolic link"):
        read_blob_contents(FilePath(link), 10)
    # The same through a linked folder: its real parent is outside.
    folder_link = os.path.join(temp_root(), new_blob_name())
    os.symlink(tmp_path, folder_link)
    in_blob_folder.append(folder_link)
    with pytest.raises(UnsafePath, match="outside the blob folders"):
        read_blob_contents(FilePath(os.path.join(folder_link, "target")), 10)
    name = new_blob_name()
    shm_link = os.path.join(shm_root(), name)
    os.symlink(target, shm_link)
    in_blob_folder.append(shm_link)
    with pytest.raises(UnsafePath, match="symbolic link"):
        read_blob_contents(Named(name), 10)


def test_a_directory_or_a_device_is_not_a_blob(in_blob_folder: list[str]) -> None:
    directory = os.path.join(temp_root(), new_blob_name())
    os.mkdir(directory, 0o700)
    in_blob_folder.append(directory)
    with pytest.raises(WrongKind, match="a directory"):
        map_descriptor(FilePath(directory), 1)
    device = os.path.join(temp_root(), new_blob_name())
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    in_blob_folder.append(device)
    assert _read_in_child(FilePath(device), 1).startswith("WrongKind")
    with pytest.raises(WrongKind, match="a character device"):
        map_descriptor(FilePath(device), 1)


def test_allowed_dirs_names_the_folders_a_file_path_may_use(
    tmp_path: Path, in_blob_folder: list[str]
) -> None:
    elsewhere = tmp_path / "blobs"
    elsewhere.mkdir()
    blob = elsewhere / "frame-1"
    blob.write_bytes(b"from elsewhere")
    assert read_blob_contents(FilePath(str(blob)), 14, allowed_dirs=[elsewhere]) == (
        b"from elsewhere"
    )
    # A link to the folder is as good as the folder: both sides are resolved.
    alias = tmp_path / "alias"
    alias.symlink_to(elsewhere)
    assert read_blob_contents(FilePath(str(alias / "frame-1")), 4, allowed_dirs=[alias]) == (
        b"from"
    )
    # Given, the list replaces the default: the temp-file folder is no longer allowed.
    ours = os.path.join(temp_root(), new_blob_name())
    Path(ours).write_bytes(b"ours")
    in_blob_folder.append(ours)
    assert read_blob_contents(FilePath(ours), 4) == b"ours"
    with pytest.raises(UnsafePath):
        read_blob_contents(FilePath(ours), 4, allowed_dirs=[elsewhere])
    with pytest.raises(UnsafePath):
        read_blob_contents(FilePath(str(blob)), 4, allowed_dirs=[])
    assert resolve_file_path(str(blob), [elsewhere]) == (str(elsewhere.resolve()), "frame-1")


def test_a_missing_file_is_not_found() -> None:
    with pytest.raises(BlobNotFound):
        map_descriptor(FilePath(os.path.join(temp_root(), new_blob_name())), 1)
    with pytest.raises(BlobNotFound):
        map_descriptor(Named(new_blob_name()), 1)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc/passwd", "a\0b"])
def test_a_name_is_one_path_component(name: str) -> None:
    with pytest.raises(UnsafePath, match="does not name a file of its own"):
        check_blob_name(name, "the Named blob")


def test_a_sparse_file_in_memory_is_refused(tmp_path: Path, in_blob_folder: list[str]) -> None:
    """Reading a hole of a tmpfs file allocates it in the reader, as for a memfd."""
    name = new_blob_name()
    path = os.path.join(shm_root(), name)
    with open(path, "wb") as file:
        file.truncate(1 << 20)
    in_blob_folder.append(path)
    with pytest.raises(SparseBlob):
        read_blob_contents(Named(name), 1 << 20)
    # A FilePath on tmpfs too (an allowed folder under /dev/shm).
    with pytest.raises(SparseBlob):
        read_blob_contents(FilePath(path), 1 << 20, allowed_dirs=[shm_root()])
    assert os.stat(path).st_blocks == 0  # the refusals touched nothing
    assert read_blob_contents(Named(name), 1 << 20, allow_sparse=True) == bytes(1 << 20)
    # What opting in costs: the reader allocated every page it read.
    assert os.stat(path).st_blocks * 512 >= 1 << 20
