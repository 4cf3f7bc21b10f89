"""Capability tokens: what a broker lets a client do, signed with the broker's secret key.

A token is ``bp1.<claims>.<mac>``: the claims (`TokenClaims`, msgpack) and an
HMAC-SHA256 over ``bp1.<claims>``, both in unpadded base64url, so a token is
one printable word that survives a shell, an environment variable and a URL.
The MAC covers the version prefix too, so a token cannot be passed off as
another format. Verification checks the MAC with `hmac.compare_digest` before
it decodes a single claim, and accepts only the canonical base64 spelling, so
no two strings verify as the same token.

Tokens are not stored anywhere: the broker keeps only its 32-byte key, in a
0600 file. Replacing the key revokes every token minted under it. Expiry is
wall-clock time (`time.time`), since a token outlives processes and restarts.
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
    InsecureKeyFile,
    InvalidRights,
    InvalidSize,
    SecretKeyError,
    TokenExpired,
    TokenRefused,
    os_errors,
)
from blobplane.types import BlobId

__all__ = [
    "KEY_BYTES",
    "MAX_TOKEN_CHARS",
    "TOKEN_PREFIX",
    "TokenAuthority",
    "TokenClaims",
    "generate_key",
    "load_key",
    "load_or_create_key",
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

    def grant(self) -> Grant:
        """The grant a connection presenting this token gets."""
        return Grant(
            rights=frozenset(self.rights),
            max_bytes=self.max_bytes,
            account=f"token:{self.id}",
            blob=None if self.blob is None else BlobId(self.blob),
        )


_ENCODER = msgspec.msgpack.Encoder(uuid_format="bytes")
_DECODER = msgspec.msgpack.Decoder(TokenClaims)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class TokenAuthority:
    """Mints and verifies tokens under one secret key; *clock* is wall-clock seconds."""

    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._key = _check_key(key)
        self._clock = clock

    def mint(
        self,
        rights: Iterable[Right | str] | str,
        *,
        ttl: float | None,
        max_bytes: int | None = None,
        blob: BlobId | None = None,
    ) -> str:
        """A token for *rights* ('get,put' or names), valid for *ttl* seconds (None: forever).

        With *blob*, the token grants `get` of that one blob only, and
        *rights* must be just `get`.
        """
        chosen = parse_rights(rights if isinstance(rights, str) else [str(r) for r in rights])
        if ttl is not None and (not math.isfinite(ttl) or ttl <= 0):
            raise InvalidSize(f"a token's ttl must be a positive number of seconds, got {ttl!r}")
        if blob is not None and not isinstance(blob, BlobId):
            raise InvalidRights(f"a per-blob token needs a BlobId, got {type(blob).__name__}")
        grant = Grant(rights=chosen, max_bytes=max_bytes, blob=blob)  # checks the combination
        now = self._clock()
        claims = TokenClaims(
            id=secrets.token_urlsafe(9),
            rights=tuple(sorted(grant.rights)),
            max_bytes=grant.max_bytes,
            issued_at=now,
            expires_at=None if ttl is None else now + ttl,
            blob=None if blob is None else blob.uuid,
        )
        signed = TOKEN_PREFIX + _b64encode(_ENCODER.encode(claims))
        return f"{signed}.{_b64encode(self._mac(signed))}"

    def mint_for_blob(self, blob: BlobId, *, ttl: float | None) -> str:
        """A token that lets its bearer get *blob* and do nothing else."""
        return self.mint([Right.GET], ttl=ttl, blob=blob)

    def verify(self, token: str) -> TokenClaims:
        """The claims of an authentic, unexpired token; `TokenRefused` otherwise."""
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
        signed, dot, mac_text = token.rpartition(".")
        payload_text = signed[len(TOKEN_PREFIX) :]
        if not dot or not payload_text or "." in payload_text:
            raise TokenRefused(
                f"the token is cut or garbled: expected {TOKEN_PREFIX}<claims>.<signature>"
            )
        mac = _b64decode(mac_text)
        if not hmac.compare_digest(mac, self._mac(signed)):
            raise TokenRefused(
                "the token's signature does not match: it was altered, forged, or minted by "
                "a broker with another secret key; ask for a new token"
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
        now = self._clock()
        if claims.expires_at is not None and now >= claims.expires_at:
            when = datetime.fromtimestamp(claims.expires_at, UTC).isoformat(timespec="seconds")
            raise TokenExpired(
                f"token {claims.id} expired at {when} ({format_duration(now - claims.expires_at)} "
                "ago); ask for a new one"
            )
        return claims

    def grant(self, token: str) -> Grant:
        """`verify()` and turn the claims into the connection's grant."""
        return self.verify(token).grant()

    def _mac(self, signed: str) -> bytes:
        return hmac.new(self._key, signed.encode("ascii"), hashlib.sha256).digest()


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

    Never overwrites: another key file there means tokens depend on it.
    The file appears complete or not at all (written aside, then linked).
    """
    _check_key(key)
    target = os.fspath(path)
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
            try:
                os.link(aside, target)
            except FileExistsError:
                raise SecretKeyError(
                    f"a key file already exists at {target}; load it, or remove it first "
                    "(every token minted under the old key then stops working)"
                ) from None
        finally:
            os.unlink(aside)


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The key in the file at *path*, refusing a file that others could read or replace."""
    key = _read_key(os.fspath(path))
    if key is None:
        raise SecretKeyError(
            f"there is no key file at {os.fspath(path)}; the broker creates one on first start"
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


def _read_key(path: str) -> bytes | None:
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
            "delete it to have a new one made (tokens minted under it stop working)"
        )
    return bytes.fromhex(text)


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
            "consider a new key (delete the file) and new tokens"
        )
