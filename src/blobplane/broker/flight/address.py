"""Where a Flight endpoint listens or a peer broker is found: ``grpc://`` and ``grpc+tls://``.

No pyarrow here: the CLI checks what it was given before anything starts.
Plain text is refused anywhere but on loopback unless the caller says it
accepts it (``insecure``): a token sent in clear over a network is a token
given away.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

from blobplane.errors import InvalidAddress

__all__ = ["FlightAddress", "is_loopback", "parse_address"]

_PLAIN = ("grpc", "grpc+tcp")
_TLS = ("grpc+tls",)


@dataclass(frozen=True, slots=True)
class FlightAddress:
    """A parsed ``grpc[+tls]://HOST:PORT``; port 0 (listening only) picks a free port."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'grpc+tls' if self.tls else 'grpc'}://{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def with_port(self, port: int) -> FlightAddress:
        return FlightAddress(self.host, port, self.tls)

    def check_plain_text(self, insecure: bool, what: str) -> None:
        """Refuse plain text off loopback unless *insecure*: tokens would travel in clear."""
        if not self.tls and not self.loopback and not insecure:
            raise InvalidAddress(
                f"{what} {self.url} is plain text on a network address: tokens and blobs "
                "would travel in clear. Use grpc+tls:// with --tls-cert and --tls-key, "
                "a loopback address, or --insecure if the network is trusted"
            )

    def __str__(self) -> str:
        return self.url


def is_loopback(host: str) -> bool:
    """Whether *host* names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str, *, listening: bool = False) -> FlightAddress:
    """``grpc://HOST:PORT`` or ``grpc+tls://HOST:PORT``; port 0 only where *listening*."""
    if not isinstance(text, str) or len(text) > 1024:
        raise InvalidAddress(f"a Flight address is a short string, got {text!r:.80}")
    parsed = urllib.parse.urlsplit(text.strip())
    scheme = parsed.scheme.lower()
    if scheme not in _PLAIN + _TLS:
        raise InvalidAddress(
            f"{text!r} is not a Flight address: expected grpc://HOST:PORT or grpc+tls://HOST:PORT"
        )
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username:
        raise InvalidAddress(f"{text!r}: a Flight address is only a scheme, a host and a port")
    try:
        port = parsed.port
    except ValueError:
        port = None
    host = parsed.hostname
    if not host or port is None:
        raise InvalidAddress(f"{text!r} names no host and port (grpc://HOST:PORT)")
    if port == 0 and not listening:
        raise InvalidAddress(f"{text!r}: a peer's port cannot be 0")
    return FlightAddress(host, port, scheme in _TLS)
