"""What a client may do: the rights a broker operation needs and the grant a connection holds.

A `Grant` is what a token turns into (or the full grant that a process of the
broker's own uid gets when no token is required). Rights reach every blob;
on top of them, a client may always delete and renew its own blobs: those
placed under its token's account (by any connection that presented the same
token), or, for a connection without a token, those it placed itself. A
grant bound to one blob (a per-blob read token) allows `get` of that blob and
nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from blobplane.errors import InvalidRights, InvalidSize
from blobplane.types import BlobId, is_int

__all__ = ["ALL_RIGHTS", "Grant", "Right", "parse_rights"]


class Right(enum.StrEnum):
    """One kind of broker operation a grant may allow."""

    GET = "get"  # get (and release what you got)
    PUT = "put"  # hand in a sealed blob of your own, or publish a pool slot
    CREATE = "create"  # have the broker allocate a blob for you to fill and seal
    DELETE = "delete"  # delete anyone's blob (your own you may always delete)
    RENEW = "renew"  # renew anyone's lease (your own you may always renew)
    LIST = "list"
    STATS = "stats"


ALL_RIGHTS: frozenset[Right] = frozenset(Right)


def parse_rights(text: str | Iterable[str]) -> frozenset[Right]:
    """'get,put' -> {GET, PUT}; 'all' -> every right. Also takes an iterable of names."""
    names = text.split(",") if isinstance(text, str) else list(text)
    rights: set[Right] = set()
    for raw in names:
        name = raw.strip().lower()
        if name == "all":
            rights |= ALL_RIGHTS
            continue
        try:
            rights.add(Right(name))
        except ValueError:
            known = ", ".join(right.value for right in Right)
            raise InvalidRights(
                f"{raw.strip()!r} is not a right; choose from {known} (or 'all'), "
                "separated by commas"
            ) from None
    if not rights:
        raise InvalidRights("no rights given; name at least one, e.g. 'get' or 'get,put'")
    return frozenset(rights)


@dataclass(frozen=True, slots=True)
class Grant:
    """The rights and byte quota of one connection.

    *max_bytes* (None: no limit of its own) bounds the bytes of the blobs it
    created or put that are still accounted. *account* names whose quota and
    whose blobs those are: connections that share an account (the same token)
    share one quota and own the same blobs (each may delete and renew them),
    and blobs published before a reconnect still count against it and still
    belong to it. None gives each connection an account of its own, which
    no other connection can take over. *blob* binds the grant to one blob:
    only `get` of that blob is allowed.

    A grant made from a token also says when that token lapses, *expires_at*
    (wall-clock seconds, `time.time`; None: never), and which key verified
    it, *key_id* (`TokenAuthority.check_current` refuses the grant once the
    broker's key is another); both are None for a grant made without a token.
    """

    rights: frozenset[Right] = ALL_RIGHTS
    max_bytes: int | None = None
    account: str | None = None
    blob: BlobId | None = None
    expires_at: float | None = None
    key_id: str | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is not None and (not is_int(self.max_bytes) or self.max_bytes < 0):
            raise InvalidSize(
                f"max_bytes must be a non-negative int or None, got {self.max_bytes!r}"
            )
        if self.blob is not None and self.rights != {Right.GET}:
            raise InvalidRights(
                "a grant bound to one blob allows 'get' of that blob only; "
                f"it cannot also carry {', '.join(sorted(r.value for r in self.rights))}"
            )

    @classmethod
    def for_blob(cls, blob: BlobId) -> Grant:
        """A grant that allows `get` of *blob* and nothing else."""
        return cls(rights=frozenset({Right.GET}), blob=blob)

    def allows(self, right: Right) -> bool:
        return right in self.rights

    @property
    def reads_everything_for_good(self) -> bool:
        """Whether this grant may get every blob for as long as the broker runs.

        Only a grant made without a token: a token may expire or be revoked
        (the broker's key replaced), and a per-blob grant reads one blob. A
        pool slot one of the others was given never carries another blob
        (`NotifyProducer.reuse`): its holder may keep the fd after its right
        to read is gone.
        """
        made_from_token = self.account is not None or self.key_id is not None
        return (
            Right.GET in self.rights
            and self.blob is None
            and self.expires_at is None
            and not made_from_token
        )
