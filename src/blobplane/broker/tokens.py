"""Capability tokens: what a broker lets a client do, signed with the broker's secret key.

A token is ``bp1.<claims>.<mac>``: the claims (`TokenClaims`, msgpack) and an
HMAC-SHA256 over ``bp1.<claims>``, both in unpadded base64url, so a token is
one printable word that survives a shell, an environment variable and a URL.
The MAC covers the version prefix too, so a token cannot be passed off as
another format. Verification checks the MAC with `hmac.compare_digest` before
it decodes a single claim, and accepts only the canonical base64 spelling, so
no two strings verify as the same token.

Tokens are not stored anywhere: the broker keeps only its 32-byte key, in a
0600 file. Replacing the key revokes every token minted under it, on a running
broker too: an authority made with `TokenAuthority.from_key_file` looks at the
file (one `lstat`) each time it verifies or mints a token or checks a grant,
and reads it again when it is another file or was changed (`replace_key`
swaps in a fresh key in one rename). A key file that is gone is made anew,
with a fresh key; one that can no longer be used (another owner, a mode that
lets others in, garbage) makes the authority refuse every token until it is
fixed. Expiry is wall-clock time (`time.time`), since a token outlives
processes and restarts. A token minted for the bearer of another token
(`not_after`) expires no later than that token.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from blobplane.broker.rights import Grant, Right, parse_rights
from blobplane.durations import format_duration
from blobplane.errors import (
    BlobError,
    InsecureKeyFile,
    InvalidRights,
    InvalidSize,
    SecretKeyError,
    TokenExpired,
    TokenRefused,
    os_errors,
)
from blobplane.types import BlobId, is_number

__all__ = [
    "KEY_BYTES",
    "MAX_TOKEN_CHARS",
    "TOKEN_PREFIX",
    "TokenAuthority",
    "TokenClaims",
    "generate_key",
    "load_key",
    "load_or_create_key",
    "replace_key",
    "save_key",
]

TOKEN_PREFIX = "bp1."
KEY_BYTES = 32
# Far above any real token (about 120 characters), far below what would cost
# the broker anything to reject.
MAX_TOKEN_CHARS = 2048

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class TokenClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """What a token says. `id` names the token in logs and is the quota account."""

    id: str
    rights: tuple[Right, ...]
    max_bytes: NonNegative | None
    issued_at: float
    expires_at: float | None
    blob: uuid.UUID | None = None

    def grant(self, key_id: str | None = None) -> Grant:
        """The grant a connection presenting this token gets; *key_id*: the key that verified it."""
        return Grant(
            rights=frozenset(self.rights),
            max_bytes=self.max_bytes,
            account=f"token:{self.id}",
            blob=None if self.blob is None else BlobId(self.blob),
            expires_at=self.expires_at,
            key_id=key_id,
        )


# Verified tokens remembered (`TokenAuthority._verified`); past it, all are forgotten.
_MAX_VERIFIED = 1024

_ENCODER = msgspec.msgpack.Encoder(uuid_format="bytes")
_DECODER = msgspec.msgpack.Decoder(TokenClaims)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class TokenAuthority:
    """Mints and verifies tokens under one secret key; *clock* is wall-clock seconds.

    Made from a key, it keeps that key. Made with `from_key_file`, its key is
    whatever the file holds: see the module doc.
    """

    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._key: bytes | None = _check_key(key)
        self._key_id: str | None = _key_id(self._key)
        self._clock = clock
        self._path: str | None = None
        self._seen: _Identity | None = None  # of the key file `_key` was read from
        # The file changed so lately that a change in the same clock tick would
        # leave its times as they are: it is read again until that is past.
        self._racy = False
        self._broken = ""  # why the key file cannot be used, while `_key` is None
        # Tokens whose signature checked out under the key `_verified_by`: a bearer that
        # shows the same token at every call (a Flight client, a peer broker) costs a
        # look-up, its expiry still checked each time. Emptied when the key changes.
        self._verified: dict[str, TokenClaims] = {}
        self._verified_by: bytes | None = None

    @classmethod
    def from_key_file(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> TokenAuthority:
        """An authority that uses the key in the file at *path*, made there if missing.

        It follows the file from then on: a replaced, changed or deleted key
        file takes effect at the next token it verifies or mints (a deleted
        one is made anew, with a fresh key), and every token minted under the
        key before is refused from then on. Raises if the file is unusable now.
        """
        target = os.fspath(path)
        key, info = _load_or_create(target)
        authority = cls(key, clock=clock)
        authority._path = target
        authority._seen = _identity(info)
        authority._racy = _racy(info)
        return authority

    @property
    def key_id(self) -> str | None:
        """A fingerprint of the key in use (not the key); None while the key file is unusable."""
        self._refresh()
        return self._key_id

    def mint(
        self,
        rights: Iterable[Right | str] | str,
        *,
        ttl: float | None,
        max_bytes: int | None = None,
        blob: BlobId | None = None,
        not_after: float | None = None,
    ) -> str:
        """A token for *rights* ('get,put' or names), valid for *ttl* seconds (None: forever).

        *ttl* must be a positive, finite number; however small, the token's
        time runs out. *not_after* (wall-clock seconds) caps the expiry: the
        token lapses then at the latest, whatever *ttl* says; a token minted
        for the bearer of another token gets that token's expiry here.
        With *blob*, the token grants `get` of that one blob only, and
        *rights* must be just `get`.
        """
        chosen = parse_rights(rights if isinstance(rights, str) else [str(r) for r in rights])
        _check_ttl(ttl)
        if blob is not None and not isinstance(blob, BlobId):
            raise InvalidRights(f"a per-blob token needs a BlobId, got {type(blob).__name__}")
        grant = Grant(rights=chosen, max_bytes=max_bytes, blob=blob)  # checks the combination
        key = self._signing_key()
        now = self._clock()
        expires_at = None if ttl is None else now + ttl
        if not_after is not None:
            if not is_number(not_after) or not math.isfinite(not_after):
                raise InvalidSize(f"not_after must be a finite wall-clock time, got {not_after!r}")
            if now >= not_after:
                raise TokenExpired(
                    f"the minter's own token expired at {_when(not_after)} "
                    f"({format_duration(now - not_after)} ago): it can mint no more tokens; "
                    "connect again with a new one"
                )
            expires_at = not_after if expires_at is None else min(expires_at, not_after)
        claims = TokenClaims(
            id=secrets.token_urlsafe(9),
            rights=tuple(sorted(grant.rights)),
            max_bytes=grant.max_bytes,
            issued_at=now,
            expires_at=expires_at,
            blob=None if blob is None else blob.uuid,
        )
        signed = TOKEN_PREFIX + _b64encode(_ENCODER.encode(claims))
        return f"{signed}.{_b64encode(_hmac(key, signed))}"

    def mint_for_blob(
        self, blob: BlobId, *, ttl: float | None, not_after: float | None = None
    ) -> str:
        """A token that lets its bearer get *blob* and do nothing else (see `mint`)."""
        return self.mint([Right.GET], ttl=ttl, blob=blob, not_after=not_after)

    def verify(self, token: str) -> TokenClaims:
        """The claims of an authentic, unexpired token; `TokenRefused` otherwise."""
        return self._verify(token)[0]

    def grant(self, token: str) -> Grant:
        """`verify()` and turn the claims into the connection's grant."""
        claims, key_id = self._verify(token)
        return claims.grant(key_id)

    def check_current(self, grant: Grant) -> None:
        """Raise unless *grant* (made by `grant()`) holds still.

        `TokenExpired` once its token's time is up; `TokenRefused` once the
        key that verified it is no longer this authority's key (the token
        was revoked). A grant made without a token always holds.
        """
        if grant.key_id is not None:
            self._refresh()
            if grant.key_id != self._key_id:
                raise TokenRefused(
                    f"the token of this connection ({grant.account}) was revoked: the broker's "
                    "secret key was replaced after it was checked; connect again with a new token"
                )
        if grant.expires_at is not None:
            now = self._clock()
            if now >= grant.expires_at:
                raise TokenExpired(
                    f"the token of this connection ({grant.account}) expired at "
                    f"{_when(grant.expires_at)} ({format_duration(now - grant.expires_at)} ago); "
                    "connect again with a new one"
                )

    def _verify(self, token: str) -> tuple[TokenClaims, str]:
        if not isinstance(token, str):
            raise TokenRefused(f"a token is a string, got {type(token).__name__}")
        token = token.strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRefused(
                f"a token of {len(token)} characters is not one this broker minted "
                f"(they are far shorter than {MAX_TOKEN_CHARS})"
            )
        if not token.isascii() or not token.startswith(TOKEN_PREFIX):
            raise TokenRefused(
                f"this is not a blobplane token (they start with {TOKEN_PREFIX!r}); "
                "mint one with `blobplane token create`"
            )
        key, key_id = self._verifying_key()
        if key != self._verified_by:
            self._verified.clear()
            self._verified_by = key
        claims = self._verified.get(token)
        if claims is None:
            claims = _authentic_claims(token, key)
            if len(self._verified) >= _MAX_VERIFIED:
                self._verified.clear()
            self._verified[token] = claims
        now = self._clock()
        if claims.expires_at is not None and now >= claims.expires_at:
            raise TokenExpired(
                f"token {claims.id} expired at {_when(claims.expires_at)} "
                f"({format_duration(now - claims.expires_at)} ago); ask for a new one"
            )
        return claims, key_id

    def _mac(self, signed: str) -> bytes:
        """The signature a token with the text *signed* carries under the key in use."""
        return _hmac(self._signing_key(), signed)

    # -- following the key file --------------------------------------------------------------

    def _verifying_key(self) -> tuple[bytes, str]:
        self._refresh()
        if self._key is None or self._key_id is None:
            raise TokenRefused(f"the broker cannot check any token now: {self._broken}")
        return self._key, self._key_id

    def _signing_key(self) -> bytes:
        self._refresh()
        if self._key is None:
            raise SecretKeyError(f"no token can be minted now: {self._broken}")
        return self._key

    def _refresh(self) -> None:
        """Take up what the key file holds now, if it is another file or changed."""
        path = self._path
        if path is None:
            return
        try:
            found: os.stat_result | None = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            found = None  # deleted: a fresh key is made below
        except OSError as exc:
            self._unusable(f"the key file {path} cannot be looked at ({exc.strerror})", None)
            return
        if found is not None and _identity(found) == self._seen and not self._racy:
            return
        try:
            key, info = _load_or_create(path)
        except BlobError as exc:
            self._unusable(str(exc), found)
            return
        self._key, self._key_id = key, _key_id(key)
        self._seen = _identity(info)
        self._racy = _racy(info)
        self._broken = ""

    def _unusable(self, reason: str, found: os.stat_result | None) -> None:
        # No key at all rather than the old one: tokens minted under a key that
        # was replaced by something unusable must not go on verifying.
        self._key = self._key_id = None
        # An unusable file is looked at again once it changes.
        self._seen = None if found is None else _identity(found)
        self._racy = found is not None and _racy(found)
        self._broken = reason


_Identity = tuple[int, int, int, int, int, int, int]


def _identity(info: os.stat_result) -> _Identity:
    """What tells one state of the key file from another, without reading it."""
    return (
        info.st_dev,
        info.st_ino,
        info.st_mtime_ns,
        info.st_ctime_ns,
        info.st_size,
        info.st_mode,
        info.st_uid,
    )


# File times move in clock ticks (a few ms); well past one, a rewrite shows.
_RACY_S = 1.0


def _racy(info: os.stat_result) -> bool:
    """Whether a rewrite of the file might not show in its times yet."""
    return time.time() - max(info.st_mtime, info.st_ctime) < _RACY_S


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"blobplane key id\0" + key).hexdigest()[:16]


def _hmac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def _check_ttl(ttl: float | None) -> None:
    if ttl is None:
        return
    if not is_number(ttl) or not math.isfinite(ttl) or ttl <= 0:
        raise InvalidSize(
            f"a token's ttl must be a positive number of seconds (or None: no expiry), got {ttl!r}"
        )


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # b64decode skips characters outside the alphabet and ignores the spare
    # bits of the last one; refusing every spelling but the canonical one
    # means an edited token never verifies.
    if _BASE64URL.fullmatch(text) and len(text) % 4 != 1:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        if _b64encode(data) == text:
            return data
    raise TokenRefused("the token is garbled: it is not in canonical unpadded base64url")


# -- the secret key --------------------------------------------------------------------------


def generate_key() -> bytes:
    """A fresh random secret key of `KEY_BYTES` bytes."""
    return secrets.token_bytes(KEY_BYTES)


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise SecretKeyError(
            f"the broker's secret key must be {KEY_BYTES} bytes (generate_key() makes one), "
            f"got {len(key) if isinstance(key, bytes) else type(key).__name__}"
        )
    return key


def save_key(path: str | os.PathLike[str], key: bytes) -> None:
    """Write *key* to a new file at *path*, mode 0600, as one line of hex.

    Never overwrites: another key file there means tokens depend on it
    (`replace_key` is the way to revoke them). The file appears complete or
    not at all (written aside, then linked).
    """
    _check_key(key)
    target = os.fspath(path)
    aside = _write_aside(target, key)
    try:
        with os_errors(f"writing the secret key file {target}"):
            try:
                os.link(aside, target)
            except FileExistsError:
                raise SecretKeyError(
                    f"a key file already exists at {target}; load it, or replace it with "
                    "`blobplane token revoke-all` (every token minted under it then stops working)"
                ) from None
    finally:
        os.unlink(aside)


def replace_key(path: str | os.PathLike[str]) -> None:
    """Put a fresh key in the file at *path* in one step: every token minted before is revoked.

    The new key is written aside (0600) and renamed over the old file, so a
    broker reading the file sees the old key or the new one, never a part.
    A broker made with `TokenAuthority.from_key_file` takes the new key up at
    the next token it checks. Refuses to replace anything but a regular file
    of this user (made if missing).
    """
    target = os.fspath(path)
    try:
        info = os.stat(target, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise InsecureKeyFile(
                f"{target} is not a key file of this user (a regular file owned by uid "
                f"{os.geteuid()}); run this as the broker's user, with its --key-file"
            )
    aside = _write_aside(target, generate_key())
    try:
        with os_errors(f"replacing the secret key file {target}"):
            os.replace(aside, target)
    except BaseException:
        os.unlink(aside)
        raise
    _sync_folder(os.path.dirname(os.path.abspath(target)))


def _write_aside(target: str, key: bytes) -> str:
    """A new 0600 file beside *target* holding *key*, flushed to disk; its path."""
    folder = os.path.dirname(os.path.abspath(target))
    aside = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(8)}.tmp")
    with os_errors(f"writing the secret key file {target}"):
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # the umask may have taken the owner's bits too
                os.write(fd, key.hex().encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            os.unlink(aside)
            raise
    return aside


def _sync_folder(folder: str) -> None:
    """Make a rename in *folder* survive a crash (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The key in the file at *path*, refusing a file that others could read or replace."""
    key = _read_key(os.fspath(path))
    if key is None:
        raise SecretKeyError(
            f"there is no key file at {os.fspath(path)}; the broker creates one when it starts "
            "or checks a token"
        )
    return key


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """The key at *path*; a new one, saved there, if there is no file yet."""
    target = os.fspath(path)
    key = _read_key(target)
    if key is not None:
        return key
    key = generate_key()
    try:
        save_key(target, key)
    except SecretKeyError:
        # Another broker created it in the meantime: use theirs.
        return load_key(target)
    return key


def _load_or_create(path: str) -> tuple[bytes, os.stat_result]:
    """`load_or_create_key`, with the `fstat` of the file the key was read from."""
    found = _read_key_file(path)
    if found is None:
        try:
            save_key(path, generate_key())
        except SecretKeyError:
            pass  # another process made it in the meantime: use theirs
        found = _read_key_file(path)
        if found is None:
            raise SecretKeyError(f"the key file {path} was deleted again as soon as it was made")
    return found


def _read_key(path: str) -> bytes | None:
    found = _read_key_file(path)
    return None if found is None else found[0]


def _read_key_file(path: str) -> tuple[bytes, os.stat_result] | None:
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the broker.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # what O_NOFOLLOW says of a symbolic link
            raise InsecureKeyFile(
                f"the key file {path} is a symbolic link; point the broker at the file itself"
            ) from exc
        with os_errors(f"opening the secret key file {path}"):
            raise
    try:
        with os_errors(f"reading the secret key file {path}"):
            info = os.fstat(fd)
        _check_key_file(path, info)
        with os_errors(f"reading the secret key file {path}"):
            data = os.read(fd, 4 * KEY_BYTES)
    finally:
        os.close(fd)
    text = data.decode("ascii", "replace").strip()
    if len(text) != 2 * KEY_BYTES or not re.fullmatch(r"[0-9a-f]+", text):
        raise SecretKeyError(
            f"the key file {path} does not hold a key ({2 * KEY_BYTES} hex digits on one line); "
            "replace it with `blobplane token revoke-all` (tokens minted under it stop working)"
        )
    return bytes.fromhex(text), info


def _check_key_file(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise InsecureKeyFile(
            f"the key file {path} is not a regular file; remove it and let the broker "
            "create its key there"
        )
    if info.st_uid != os.geteuid():
        raise InsecureKeyFile(
            f"the key file {path} belongs to uid {info.st_uid}, not to this user "
            f"({os.geteuid()}); the broker uses only a key file of its own"
        )
    if info.st_mode & 0o077:
        raise InsecureKeyFile(
            f"the key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: other users could "
            f"read or replace it; run `chmod 600 {path}`, and since the key may have leaked, "
            "consider a new key (`blobplane token revoke-all`) and new tokens"
        )


def _authentic_claims(token: str, key: bytes) -> TokenClaims:
    """The claims of *token* (stripped, of a sane length) if *key* signed it; `TokenRefused`."""
    signed, dot, mac_text = token.rpartition(".")
    payload_text = signed[len(TOKEN_PREFIX) :]
    if not dot or not payload_text or "." in payload_text:
        raise TokenRefused(
            f"the token is cut or garbled: expected {TOKEN_PREFIX}<claims>.<signature>"
        )
    mac = _b64decode(mac_text)
    if not hmac.compare_digest(mac, _hmac(key, signed)):
        raise TokenRefused(
            "the token's signature does not match: it was altered, forged, minted by "
            "a broker with another secret key, or revoked (the key was replaced since); "
            "ask for a new token"
        )
    try:
        claims = _DECODER.decode(_b64decode(payload_text))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Only a broker holding this key can have signed it: a version mismatch.
        raise TokenRefused(
            f"the token is authentic but its claims cannot be read ({exc}); "
            "mint a new one with this version of blobplane"
        ) from exc
    if claims.blob is not None and set(claims.rights) != {Right.GET}:
        raise TokenRefused("a per-blob token may only grant 'get'; this one is refused")
    return claims
