"""What `blobplane serve` is told about its Flight endpoint and its peers (no pyarrow here)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from blobplane.broker.flight.address import FlightAddress, parse_address
from blobplane.errors import InvalidAddress, InvalidSize

__all__ = [
    "DEFAULT_CACHE_TTL_S",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_PEER_TIMEOUT_S",
    "DEFAULT_UPLOAD_TIMEOUT_S",
    "MAX_MESSAGE_BYTES",
    "FlightConfig",
    "TlsFiles",
    "read_peers_file",
]

# A copy fetched from a peer is dropped this long after it arrived, read or not: it is a
# cache, never a replica (see docs/guide/federation.md).
DEFAULT_CACHE_TTL_S = 600.0
# A peer that sends less than 1 MiB (`filling.MIN_PROGRESS_BYTES`) for this long is given up
# on; so is one that does not answer.
DEFAULT_PEER_TIMEOUT_S = 10.0
# An upload that sends less than 1 MiB for this long is dropped: its reservation (bytes,
# key) and what it wrote are released.
DEFAULT_UPLOAD_TIMEOUT_S = 30.0
# Record batches of this many bytes: below 2 GiB (a Flight message's limit) with room to
# spare, large enough that the per-message cost vanishes (4-16 MiB measure the same).
DEFAULT_CHUNK_BYTES = 8 << 20
# The largest Flight message taken from the other side: a peer's DoGet stream (gRPC refuses
# a larger one before taking it in) and, by default, a client's upload. Four times the
# largest chunk a broker sends.
MAX_MESSAGE_BYTES = 256 << 20
# A peers file is a list of addresses, never this long.
_MAX_PEERS_FILE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: this endpoint's certificate and key, and the CA its peers must be signed by.

    With *ca*, TLS is mutual: clients of the endpoint must present a certificate
    signed by it, and this broker presents its own certificate to its peers.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        return _read(self.cert), _read(self.key), _read(self.ca)


def read_peers_file(path: str) -> list[str]:
    """The peer addresses in the file at *path*: one per line; blank lines and text after a
    ``#`` are left out. Each is checked as a ``--peer`` is (`InvalidAddress`, with its line)."""
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_PEERS_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidAddress(f"the peers file {path} cannot be read: {exc.strerror}") from None
    if len(raw) > _MAX_PEERS_FILE_BYTES:
        raise InvalidAddress(f"the peers file {path} is over 1 MiB: it holds addresses only")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidAddress(f"the peers file {path} is not UTF-8 text") from None
    peers = []
    for number, line in enumerate(text.splitlines(), start=1):
        address = line.split("#", 1)[0].strip()
        if not address:
            continue
        try:
            parse_address(address)
        except InvalidAddress as exc:
            raise InvalidAddress(f"{path}, line {number}: {exc}") from None
        peers.append(address)
    if not peers:
        raise InvalidAddress(f"the peers file {path} names no peer")
    return peers


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read(1 << 20)  # a certificate chain, never more


@dataclass(frozen=True, slots=True)
class FlightConfig:
    """The broker's Flight endpoint (*listen*) and the peers it fetches missing keys from.

    Either may be absent: a broker may serve Flight without peers, or fetch
    from peers without serving (then nobody fetches from it).
    """

    listen: FlightAddress | None = None
    peers: tuple[FlightAddress, ...] = ()
    tls: TlsFiles = TlsFiles()
    insecure: bool = False  # plain text off loopback accepted
    # The token this broker presents to its peers; None: one it mints under its own key
    # (which works when the brokers share their key file).
    peer_token: str | None = None
    cache_ttl: float | None = DEFAULT_CACHE_TTL_S
    peer_timeout: float = DEFAULT_PEER_TIMEOUT_S
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # An upload's messages may be this large at most (its data and metadata)...
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # ...and it may send nothing for this long at most.
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT_S

    @classmethod
    def from_text(
        cls,
        listen: str | None,
        peers: tuple[str, ...] | list[str] = (),
        **options: object,
    ) -> FlightConfig:
        config = cls(
            listen=None if listen is None else parse_address(listen, listening=True),
            peers=tuple(parse_address(peer) for peer in peers),
            **options,  # type: ignore[arg-type]
        )
        config.check()
        return config

    def check(self) -> None:
        """Refuse what cannot work or would leak: raises `InvalidAddress` or `InvalidSize`."""
        tls = self.tls
        if self.listen is not None:
            self.listen.check_plain_text(self.insecure, "the Flight endpoint")
            if self.listen.tls and (tls.cert is None or tls.key is None):
                raise InvalidAddress(
                    f"{self.listen.url} is TLS: give the endpoint's certificate and key "
                    "(--tls-cert, --tls-key)"
                )
        for peer in self.peers:
            peer.check_plain_text(self.insecure, "the peer")
        if (tls.cert is None) != (tls.key is None):
            raise InvalidAddress("--tls-cert and --tls-key go together")
        for path in (tls.cert, tls.key, tls.ca):
            if path is not None and not os.path.isfile(path):
                raise InvalidAddress(f"{path}: no such file (a PEM file was expected)")
        if not self.peer_timeout > 0:
            raise InvalidSize(f"the peer timeout must be positive, got {self.peer_timeout!r}")
        if self.cache_ttl is not None and not self.cache_ttl > 0:
            raise InvalidSize(f"the cache ttl must be positive, got {self.cache_ttl!r}")
        if not 4096 <= self.chunk_bytes <= 64 << 20:
            raise InvalidSize(f"chunks are 4 KiB to 64 MiB, got {self.chunk_bytes}")
        if not 64 << 10 <= self.max_message_bytes <= 1 << 30:
            raise InvalidSize(
                f"the largest upload message is 64 KiB to 1 GiB, got {self.max_message_bytes}"
            )
        if not self.upload_timeout > 0:
            raise InvalidSize(f"the upload timeout must be positive, got {self.upload_timeout!r}")
