"""Revoking every token takes effect on a running broker: `blobplane token revoke-all`, a
deleted key file, a key file rewritten in place, and a key file that can no longer be trusted.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobplane.broker import Grant, Right
from blobplane.broker.tokens import (
    KEY_BYTES,
    TokenAuthority,
    generate_key,
    load_key,
    replace_key,
    save_key,
)
from blobplane.client import connect_broker
from blobplane.errors import (
    ConnectionClosed,
    InsecureKeyFile,
    SecretKeyError,
    TokenExpired,
    TokenRefused,
)
from brokers import DEADLINE_S, Broker, broker_folder, run_cli, running_broker, start, wait_until

pytestmark = pytest.mark.timeout(60)


class WallClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "broker.sock.key"


@pytest.fixture
def followed(key_path: Path) -> TokenAuthority:
    return TokenAuthority.from_key_file(key_path, clock=WallClock())


def no_leftovers(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


# -- the authority follows its key file --------------------------------------------------------


def test_the_key_file_is_made_when_missing_0600(key_path: Path, followed: TokenAuthority) -> None:
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    token = followed.mint("get", ttl=60)
    assert TokenAuthority(load_key(key_path), clock=WallClock()).verify(token).rights == (
        Right.GET,
    )


def test_replace_key_revokes_what_was_minted_and_checked(
    key_path: Path, followed: TokenAuthority
) -> None:
    old_token = followed.mint("get,put", ttl=60)
    old_grant = followed.grant(old_token)
    old_id = followed.key_id
    followed.check_current(old_grant)
    inode = key_path.stat().st_ino

    replace_key(key_path)

    assert key_path.stat().st_ino != inode
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    no_leftovers(key_path.parent)
    with pytest.raises(TokenRefused, match="signature does not match"):
        followed.verify(old_token)
    with pytest.raises(TokenRefused, match="was revoked"):
        followed.check_current(old_grant)
    assert followed.key_id not in (None, old_id)
    fresh = followed.mint("get", ttl=60)
    followed.check_current(followed.grant(fresh))
    assert TokenAuthority(load_key(key_path), clock=WallClock()).verify(fresh)


def test_replace_key_makes_a_missing_file_and_ignores_the_umask(key_path: Path) -> None:
    old = os.umask(0)
    try:
        replace_key(key_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(load_key(key_path)) == KEY_BYTES


def test_a_deleted_key_file_revokes_and_is_made_anew(
    key_path: Path, followed: TokenAuthority
) -> None:
    old_token = followed.mint("get", ttl=60)
    old_grant = followed.grant(old_token)
    old_key = load_key(key_path)
    key_path.unlink()
    with pytest.raises(TokenRefused, match="signature does not match"):
        followed.verify(old_token)
    assert key_path.exists()
    assert load_key(key_path) != old_key
    with pytest.raises(TokenRefused, match="was revoked"):
        followed.check_current(old_grant)
    assert followed.verify(followed.mint("get", ttl=60)).rights == (Right.GET,)


def test_a_key_rewritten_in_place_at_once_is_taken_up(
    key_path: Path, followed: TokenAuthority
) -> None:
    """Same file, same size, maybe the same times (one clock tick): the new key still counts."""
    old_token = followed.mint("get", ttl=60)
    new_key = generate_key()
    with open(key_path, "r+b") as same_file:
        same_file.write(new_key.hex().encode() + b"\n")
    with pytest.raises(TokenRefused, match="signature does not match"):
        followed.verify(old_token)
    assert followed.verify(TokenAuthority(new_key, clock=WallClock()).mint("get", ttl=60))


@pytest.mark.parametrize(
    "spoil",
    [
        lambda path: path.chmod(0o644),
        lambda path: path.chmod(0o620),
        lambda path: path.write_text("not a key\n"),
    ],
    ids=["readable by others", "writable by the group", "garbage"],
)
def test_a_key_file_that_cannot_be_trusted_refuses_every_token_until_fixed(
    key_path: Path, followed: TokenAuthority, spoil: object
) -> None:
    token = followed.mint("get", ttl=60)
    grant = followed.grant(token)
    key = load_key(key_path)
    assert callable(spoil)
    spoil(key_path)
    with pytest.raises(TokenRefused, match="cannot check any token now"):
        followed.verify(token)
    with pytest.raises(TokenRefused, match="was revoked"):
        followed.check_current(grant)
    with pytest.raises(SecretKeyError, match="no token can be minted now"):
        followed.mint("get", ttl=60)
    assert followed.key_id is None
    # Put right (the same key, 0600): the tokens of that key hold again.
    key_path.unlink()
    save_key(key_path, key)
    assert followed.verify(token).rights == (Right.GET,)
    followed.check_current(grant)


def test_a_key_file_swapped_for_a_link_is_refused(
    key_path: Path, followed: TokenAuthority, tmp_path: Path
) -> None:
    token = followed.mint("get", ttl=60)
    elsewhere = tmp_path / "elsewhere.key"
    save_key(elsewhere, load_key(key_path))
    key_path.unlink()
    key_path.symlink_to(elsewhere)
    with pytest.raises(TokenRefused, match="symbolic link"):
        followed.verify(token)


def test_replace_key_refuses_what_is_not_a_key_file_of_ours(key_path: Path) -> None:
    key_path.mkdir()
    with pytest.raises(InsecureKeyFile, match="not a key file of this user"):
        replace_key(key_path)
    assert key_path.is_dir()
    no_leftovers(key_path.parent)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_replace_key_refuses_another_users_key_file(key_path: Path) -> None:
    save_key(key_path, generate_key())
    os.chown(key_path, 65534, 65534)
    with pytest.raises(InsecureKeyFile, match="run this as the broker's user"):
        replace_key(key_path)
    assert key_path.stat().st_uid == 65534


def test_an_authority_of_a_fixed_key_never_looks_at_files(tmp_path: Path) -> None:
    authority = TokenAuthority(generate_key(), clock=WallClock())
    token = authority.mint("get", ttl=60)
    assert authority.verify(token)
    assert list(tmp_path.iterdir()) == []


def test_a_grant_without_a_token_always_holds(followed: TokenAuthority, key_path: Path) -> None:
    replace_key(key_path)
    followed.check_current(Grant())


def test_check_current_refuses_an_expired_grant(followed: TokenAuthority) -> None:
    clock = WallClock()
    authority = TokenAuthority(generate_key(), clock=clock)
    grant = authority.grant(authority.mint("get", ttl=10))
    authority.check_current(grant)
    clock.now += 10
    with pytest.raises(TokenExpired, match="connect again"):
        authority.check_current(grant)


# -- a running broker --------------------------------------------------------------------------


@pytest.fixture
def guarded(no_leaks: None) -> Iterator[Broker]:
    with running_broker("--require-token") as broker:
        before = broker.fds()
        yield broker
        wait_until(lambda: broker.fds() == before, "the broker's fds to come back")


def token_create(broker: Broker, *extra: str) -> str:
    created = run_cli(
        "token", "create", "--rights", "all", *extra, env={"BLOBPLANE_BROKER": broker.socket_path}
    )
    assert created.returncode == 0, created.stderr.decode()
    return created.stdout.decode().strip()


def revoke_all(broker: Broker, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli("token", "revoke-all", *extra, env={"BLOBPLANE_BROKER": broker.socket_path})


def test_revoke_all_refuses_tokens_on_the_running_broker(guarded: Broker) -> None:
    old = token_create(guarded)
    with connect_broker(guarded.socket_path, token=old) as before_revoke:
        entry = before_revoke.put_bytes(b"x", key="kept across the revocation")
        inode = os.stat(guarded.key_path).st_ino

        revoked = revoke_all(guarded)
        assert revoked.returncode == 0, revoked.stderr.decode()
        assert b"every token minted before is revoked" in revoked.stderr
        assert os.stat(guarded.key_path).st_ino != inode
        assert stat.S_IMODE(os.stat(guarded.key_path).st_mode) == 0o600

        with pytest.raises(TokenRefused, match="signature does not match"):
            connect_broker(guarded.socket_path, token=old)
        # Open with the old token: its next request is refused, then it is closed.
        with pytest.raises(TokenRefused, match="revoked"):
            before_revoke.mint_read_token("kept across the revocation", ttl=60)
        with pytest.raises(ConnectionClosed):
            before_revoke.stats()

        new = token_create(guarded)
        with connect_broker(guarded.socket_path, token=new) as after:
            with after.get(entry.blob_id) as mapped:  # the blobs are untouched
                assert bytes(mapped.as_slice()) == b"x"
            after.delete(entry.blob_id)
    assert "event=client.refused" in guarded.log()


def test_revoke_all_with_a_key_file_of_its_own(no_leaks: None) -> None:
    with broker_folder() as folder:
        key_file = os.path.join(folder, "elsewhere.key")
        broker = start(folder, "--require-token", "--key-file", key_file)
        try:
            old = token_create(broker, "--key-file", key_file)
            connect_broker(broker.socket_path, token=old).close()
            revoked = revoke_all(broker, "--key-file", key_file)
            assert revoked.returncode == 0, revoked.stderr.decode()
            assert not os.path.exists(broker.key_path)  # not the default one
            with pytest.raises(TokenRefused):
                connect_broker(broker.socket_path, token=old)
            connect_broker(
                broker.socket_path, token=token_create(broker, "--key-file", key_file)
            ).close()
        finally:
            assert broker.stop() == 0, broker.log()


def test_deleting_the_key_file_revokes_on_the_running_broker(guarded: Broker) -> None:
    old = token_create(guarded)
    connect_broker(guarded.socket_path, token=old).close()
    os.unlink(guarded.key_path)
    with pytest.raises(TokenRefused, match="signature does not match"):
        connect_broker(guarded.socket_path, token=old)
    assert stat.S_IMODE(os.stat(guarded.key_path).st_mode) == 0o600  # made anew
    connect_broker(guarded.socket_path, token=token_create(guarded)).close()


def test_a_key_file_opened_to_others_refuses_every_token_until_fixed(guarded: Broker) -> None:
    token = token_create(guarded)
    os.chmod(guarded.key_path, 0o644)
    try:
        with pytest.raises(TokenRefused, match="mode 0644"):
            connect_broker(guarded.socket_path, token=token)
        refused = run_cli("token", "create", env={"BLOBPLANE_BROKER": guarded.socket_path})
        assert refused.returncode == 1
        assert b"mode 0644" in refused.stderr
    finally:
        os.chmod(guarded.key_path, 0o600)
    connect_broker(guarded.socket_path, token=token).close()  # the same key: good again


def test_revoke_all_refuses_a_directory_in_one_line(guarded: Broker) -> None:
    folder = os.path.join(guarded.folder, "a-folder")
    os.mkdir(folder)
    result = revoke_all(guarded, "--key-file", folder)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert "not a key file of this user" in err
    assert os.path.isdir(folder)


def test_tokens_keep_working_while_nothing_changes(guarded: Broker) -> None:
    token = token_create(guarded)
    started = time.monotonic()
    for _ in range(20):
        connect_broker(guarded.socket_path, token=token).close()
    assert time.monotonic() - started < DEADLINE_S
