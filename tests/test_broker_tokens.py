"""Capability tokens, rights and the broker's secret key file."""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobplane.broker import ALL_RIGHTS, Grant, Right, parse_rights
from blobplane.broker import tokens as tokens_module
from blobplane.broker.tokens import (
    KEY_BYTES,
    MAX_TOKEN_CHARS,
    TOKEN_PREFIX,
    TokenAuthority,
    TokenClaims,
    generate_key,
    load_key,
    load_or_create_key,
    save_key,
)
from blobplane.errors import (
    BlobError,
    InsecureKeyFile,
    InvalidRights,
    InvalidSize,
    SecretKeyError,
    TokenExpired,
    TokenRefused,
)
from blobplane.types import BlobId

B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class WallClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@pytest.fixture
def authority(clock: WallClock) -> TokenAuthority:
    return TokenAuthority(generate_key(), clock=clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- minting and verifying ---------------------------------------------------------------------


def test_a_token_round_trips_into_a_grant(authority: TokenAuthority, clock: WallClock) -> None:
    token = authority.mint("get,put,delete", ttl=3600, max_bytes=1 << 30)
    claims = authority.verify(token)
    assert set(claims.rights) == {Right.GET, Right.PUT, Right.DELETE}
    assert claims.max_bytes == 1 << 30
    assert claims.issued_at == clock.now
    assert claims.expires_at == clock.now + 3600
    assert claims.blob is None
    grant = authority.grant(token)
    assert grant == Grant(
        rights=frozenset({Right.GET, Right.PUT, Right.DELETE}),
        max_bytes=1 << 30,
        account=f"token:{claims.id}",
        expires_at=clock.now + 3600,
        key_id=authority.key_id,
    )
    assert grant.key_id is not None


def test_tokens_are_compact_and_printable(authority: TokenAuthority) -> None:
    token = authority.mint(ALL_RIGHTS, ttl=3600, max_bytes=2**40)
    assert token.startswith(TOKEN_PREFIX)
    assert re.fullmatch(r"bp1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}", token)
    assert len(token) < 160
    blob_token = authority.mint_for_blob(BlobId.new(), ttl=60)
    assert len(blob_token) < 160


def test_each_token_has_its_own_id_and_account(authority: TokenAuthority) -> None:
    first, second = (authority.grant(authority.mint("get", ttl=60)) for _ in range(2))
    assert first.account != second.account


def test_rights_may_be_given_as_names_or_rights(authority: TokenAuthority) -> None:
    by_name = authority.verify(authority.mint(["get", "list"], ttl=60))
    by_right = authority.verify(authority.mint([Right.LIST, Right.GET], ttl=60))
    assert by_name.rights == by_right.rights == (Right.GET, Right.LIST)


def test_a_token_without_ttl_never_expires(authority: TokenAuthority, clock: WallClock) -> None:
    token = authority.mint("get", ttl=None)
    clock.now += 100 * 365 * 86400
    assert authority.verify(token).expires_at is None


def test_a_per_blob_token_grants_get_of_that_blob_only(authority: TokenAuthority) -> None:
    blob = BlobId.new()
    grant = authority.grant(authority.mint_for_blob(blob, ttl=60))
    assert grant.blob == blob
    assert grant.rights == {Right.GET}
    assert grant.max_bytes is None
    with pytest.raises(InvalidRights, match="'get' of that blob only"):
        authority.mint("get,put", ttl=60, blob=blob)
    with pytest.raises(InvalidRights, match="BlobId"):
        authority.mint("get", ttl=60, blob="not-an-id")  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan")])
def test_a_ttl_must_be_positive_and_finite(authority: TokenAuthority, ttl: float) -> None:
    with pytest.raises(InvalidSize, match="ttl"):
        authority.mint("get", ttl=ttl)


def test_a_negative_quota_cannot_be_minted(authority: TokenAuthority) -> None:
    with pytest.raises(InvalidSize, match="max_bytes"):
        authority.mint("put", ttl=60, max_bytes=-1)


def test_surrounding_whitespace_is_forgiven(authority: TokenAuthority) -> None:
    token = authority.mint("get", ttl=60)
    assert authority.verify(f"  {token}\n").rights == (Right.GET,)


@given(
    rights=st.sets(st.sampled_from(list(Right)), min_size=1),
    max_bytes=st.none() | st.integers(0, 2**62),
    ttl=st.none() | st.floats(0.001, 1e9),
)
def test_any_mintable_token_verifies_to_what_was_minted(
    rights: set[Right], max_bytes: int | None, ttl: float | None
) -> None:
    authority = TokenAuthority(b"k" * KEY_BYTES, clock=lambda: 1e9)
    claims = authority.verify(authority.mint(rights, ttl=ttl, max_bytes=max_bytes))
    assert set(claims.rights) == rights
    assert claims.max_bytes == max_bytes
    assert claims.expires_at == (None if ttl is None else 1e9 + ttl)


# -- what is refused -----------------------------------------------------------------------------


def test_an_expired_token_is_refused(authority: TokenAuthority, clock: WallClock) -> None:
    token = authority.mint("get", ttl=30)
    clock.now += 29.999
    authority.verify(token)
    clock.now += 0.001
    with pytest.raises(TokenExpired, match=r"expired at 2027-01-15T08:00:30\+00:00 \(0ms ago\)"):
        authority.verify(token)
    clock.now += 3600
    with pytest.raises(TokenExpired, match=r"\(1h ago\)"):
        authority.grant(token)
    assert issubclass(TokenExpired, TokenRefused)


def test_a_token_of_another_key_is_refused(authority: TokenAuthority, clock: WallClock) -> None:
    other = TokenAuthority(generate_key(), clock=clock)
    with pytest.raises(TokenRefused, match=r"signature does not match.*another secret key"):
        authority.verify(other.mint("get", ttl=60))


def test_every_single_character_change_is_refused(authority: TokenAuthority) -> None:
    token = authority.mint("get", ttl=60, max_bytes=1000)
    for index, char in enumerate(token):
        for replacement in {"A", "B", "a", "-", "_", "9", "."} - {char}:
            altered = token[:index] + replacement + token[index + 1 :]
            with pytest.raises(TokenRefused):
                authority.verify(altered)


def test_claims_spliced_onto_another_signature_are_refused(authority: TokenAuthority) -> None:
    weak = authority.mint("get", ttl=60)
    strong = authority.mint(ALL_RIGHTS, ttl=3600)
    spliced = strong.rsplit(".", 1)[0] + "." + weak.rsplit(".", 1)[1]
    with pytest.raises(TokenRefused, match="signature does not match"):
        authority.verify(spliced)


def test_forged_claims_are_refused(authority: TokenAuthority, clock: WallClock) -> None:
    forged_claims = TokenClaims(
        id="forged",
        rights=tuple(sorted(ALL_RIGHTS)),
        max_bytes=None,
        issued_at=clock.now,
        expires_at=None,
    )
    payload = b64(msgspec.msgpack.encode(forged_claims))
    for signature in (b"\0" * 32, os.urandom(32), b"x" * 32):
        with pytest.raises(TokenRefused, match="signature does not match"):
            authority.verify(f"{TOKEN_PREFIX}{payload}.{b64(signature)}")


def test_non_canonical_base64_is_refused_even_when_it_decodes_the_same(
    authority: TokenAuthority,
) -> None:
    token = authority.mint("get", ttl=60)
    signed, mac = token.rsplit(".", 1)
    # 32 bytes take 43 characters; the last one carries 2 spare bits.
    last = B64_ALPHABET.index(mac[-1])
    sloppy = mac[:-1] + B64_ALPHABET[last ^ 1]
    assert base64.urlsafe_b64decode(sloppy + "=") == base64.urlsafe_b64decode(mac + "=")
    for variant in (f"{signed}.{sloppy}", f"{signed}.{mac}=", f"{signed}.{mac[:20]}\n{mac[20:]}"):
        with pytest.raises(TokenRefused, match="canonical unpadded base64url"):
            authority.verify(variant)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a blobplane token"),
        ("hello", "not a blobplane token"),
        ("bp2.abc.def", "not a blobplane token"),
        ("bp1.", "cut or garbled"),
        ("bp1.abc", "cut or garbled"),
        ("bp1..abc", "cut or garbled"),
        ("bp1.abc.def.ghi", "cut or garbled"),
        ("bp1.abc.", "signature does not match"),
        ("bp1.abc.!!!", "canonical"),
        ("bp1." + "A" * MAX_TOKEN_CHARS, "characters is not one"),
    ],
)
def test_garbage_is_refused_with_a_reason(
    authority: TokenAuthority, text: str, message: str
) -> None:
    with pytest.raises(TokenRefused, match=re.escape(message)):
        authority.verify(text)


def test_a_token_that_is_not_a_string_is_refused(authority: TokenAuthority) -> None:
    with pytest.raises(TokenRefused, match="string"):
        authority.verify(b"bp1.abc.def")  # type: ignore[arg-type]


def test_authentic_but_unreadable_claims_are_refused(authority: TokenAuthority) -> None:
    # Only a holder of the key can produce these: another version's tokens.
    for payload in (b"\xc1", msgspec.msgpack.encode(["x", ["get"], None, 1.0, None, None, 7])):
        signed = TOKEN_PREFIX + b64(payload)
        token = f"{signed}.{b64(authority._mac(signed))}"
        with pytest.raises(TokenRefused, match="authentic but its claims cannot be read"):
            authority.verify(token)


def test_a_signed_per_blob_token_with_more_rights_is_refused(
    authority: TokenAuthority, clock: WallClock
) -> None:
    claims = TokenClaims("odd", (Right.GET, Right.PUT), None, clock.now, None, BlobId.new().uuid)
    signed = TOKEN_PREFIX + b64(msgspec.msgpack.encode(claims))
    with pytest.raises(TokenRefused, match="per-blob token may only grant 'get'"):
        authority.verify(f"{signed}.{b64(authority._mac(signed))}")


@given(st.text(max_size=200))
def test_random_text_never_verifies(text: str) -> None:
    authority = TokenAuthority(b"k" * KEY_BYTES)
    with pytest.raises(TokenRefused):
        authority.verify(TOKEN_PREFIX + text)


@pytest.mark.parametrize("key", [b"", b"short", b"k" * 31, b"k" * 33, "k" * 32])
def test_an_authority_needs_a_key_of_32_bytes(key: object) -> None:
    with pytest.raises(SecretKeyError, match="32 bytes"):
        TokenAuthority(key)  # type: ignore[arg-type]


def test_token_errors_are_blob_errors_but_not_os_errors() -> None:
    # A server's `except OSError` around its socket must never swallow a refusal.
    for error in (TokenRefused, TokenExpired, SecretKeyError, InsecureKeyFile, InvalidRights):
        assert issubclass(error, BlobError)
        assert not issubclass(error, OSError)


# -- rights ---------------------------------------------------------------------------------------


def test_parse_rights() -> None:
    assert parse_rights("get,put") == {Right.GET, Right.PUT}
    assert parse_rights(" GET , list ") == {Right.GET, Right.LIST}
    assert parse_rights("all") == ALL_RIGHTS
    assert parse_rights(["stats", "renew"]) == {Right.STATS, Right.RENEW}
    assert {right.value for right in ALL_RIGHTS} == {
        "get",
        "put",
        "create",
        "delete",
        "renew",
        "list",
        "stats",
    }


@pytest.mark.parametrize("text", ["", "get,write", ",", "get;put"])
def test_unknown_rights_are_refused_with_the_known_ones(text: str) -> None:
    with pytest.raises(InvalidRights, match=r"get|at least one"):
        parse_rights(text)


def test_grant_checks_itself() -> None:
    with pytest.raises(InvalidSize, match="max_bytes"):
        Grant(max_bytes=-1)
    with pytest.raises(InvalidRights, match="'get' of that blob only"):
        Grant(blob=BlobId.new())
    assert Grant.for_blob(blob := BlobId.new()).blob == blob
    assert Grant().allows(Right.DELETE)
    assert not Grant(rights=frozenset({Right.GET})).allows(Right.PUT)


# -- the key file ----------------------------------------------------------------------------------


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "broker.key"


def test_a_saved_key_loads_back_from_a_0600_file(key_path: Path) -> None:
    key = generate_key()
    assert len(key) == KEY_BYTES
    save_key(key_path, key)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_text() == key.hex() + "\n"
    assert load_key(key_path) == key
    assert load_key(str(key_path)) == key
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["broker.key"]  # no leftovers


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o777)
    yield
    os.umask(old)


@pytest.mark.usefixtures("strict_umask")
def test_the_key_file_is_0600_whatever_the_umask(key_path: Path) -> None:
    save_key(key_path, generate_key())
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_save_never_overwrites_a_key(key_path: Path) -> None:
    first = generate_key()
    save_key(key_path, first)
    with pytest.raises(SecretKeyError, match="already exists"):
        save_key(key_path, generate_key())
    assert load_key(key_path) == first
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["broker.key"]


def test_save_refuses_a_key_of_the_wrong_length(key_path: Path) -> None:
    with pytest.raises(SecretKeyError, match="32 bytes"):
        save_key(key_path, b"short")
    assert not key_path.exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_a_key_file_others_can_read_or_write_is_refused(key_path: Path, mode: int) -> None:
    save_key(key_path, generate_key())
    key_path.chmod(mode)
    with pytest.raises(InsecureKeyFile, match=f"mode {mode:04o}.*chmod 600"):
        load_key(key_path)
    with pytest.raises(InsecureKeyFile):
        load_or_create_key(key_path)  # nor is it replaced behind the owner's back


def test_a_key_file_behind_a_symlink_is_refused(key_path: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    save_key(real, generate_key())
    key_path.symlink_to(real)
    with pytest.raises(InsecureKeyFile, match="symbolic link"):
        load_key(key_path)


def test_a_directory_or_fifo_is_not_a_key_file(key_path: Path) -> None:
    key_path.mkdir(mode=0o700)
    with pytest.raises(InsecureKeyFile, match="not a regular file"):
        load_key(key_path)
    fifo = key_path.parent / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InsecureKeyFile, match="not a regular file"):
        load_key(fifo)  # and it does not hang waiting for a writer


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_a_key_file_of_another_user_is_refused(key_path: Path) -> None:
    save_key(key_path, generate_key())
    os.chown(key_path, 65534, 65534)
    with pytest.raises(InsecureKeyFile, match="belongs to uid 65534"):
        load_key(key_path)


@pytest.mark.parametrize(
    "content", [b"", b"zz" * KEY_BYTES, b"ab" * (KEY_BYTES - 1), b"ab" * (KEY_BYTES + 1), b"\xff"]
)
def test_a_malformed_key_file_is_refused(key_path: Path, content: bytes) -> None:
    key_path.write_bytes(content)
    key_path.chmod(0o600)
    with pytest.raises(SecretKeyError, match="does not hold a key"):
        load_key(key_path)


def test_a_missing_key_file(key_path: Path) -> None:
    with pytest.raises(SecretKeyError, match="no key file"):
        load_key(key_path)


def test_load_or_create_makes_the_key_once(key_path: Path) -> None:
    key = load_or_create_key(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_or_create_key(key_path) == key
    assert load_key(key_path) == key


def test_load_or_create_uses_the_key_of_a_broker_that_won_the_race(
    key_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = generate_key()
    real_read = tokens_module._read_key

    def read_then_lose_the_race(path: str) -> bytes | None:
        # Nothing there when we look; the other broker saves before we do.
        monkeypatch.setattr(tokens_module, "_read_key", real_read)
        save_key(path, theirs)
        return None

    monkeypatch.setattr(tokens_module, "_read_key", read_then_lose_the_race)
    assert load_or_create_key(key_path) == theirs


def test_tokens_survive_a_reload_of_the_key(key_path: Path, clock: WallClock) -> None:
    token = TokenAuthority(load_or_create_key(key_path), clock=clock).mint("get", ttl=60)
    assert TokenAuthority(load_key(key_path), clock=clock).verify(token).rights == (Right.GET,)


def test_a_token_verified_before_is_refused_once_the_key_file_holds_another_key(
    key_path: Path, clock: WallClock
) -> None:
    authority = TokenAuthority.from_key_file(key_path, clock=clock)
    token = authority.mint("get", ttl=60)
    for _ in range(2):  # the second time from what the first remembered
        assert authority.grant(token).allows(Right.GET)
    key_path.unlink()
    save_key(key_path, generate_key())
    with pytest.raises(TokenRefused, match="signature does not match"):
        authority.verify(token)
    assert authority.verify(authority.mint("get", ttl=60)).rights == (Right.GET,)
