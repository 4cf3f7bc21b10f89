"""Brokers with Flight endpoints for the federation tests: ports, tokens, certificates.

Every broker listens on 127.0.0.1 only. Brokers that must name each other as
peers before they start get ports probed beforehand (`free_ports`); the
others take port 0 and report theirs on the ready line.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from blobplane.broker.tokens import TokenAuthority
from brokers import Broker, broker_folder, start

__all__ = [
    "Certificates",
    "Cluster",
    "at",
    "cluster",
    "free_ports",
    "make_certificates",
    "openssl_missing",
    "peer",
]


def at(index: int, scheme: str = "grpc") -> tuple[str, str]:
    """`serve` arguments: a Flight endpoint on broker *index*'s probed port."""
    return ("--flight", f"{scheme}://127.0.0.1:{{ports[{index}]}}")


def peer(index: int, scheme: str = "grpc") -> tuple[str, str]:
    """`serve` arguments: broker *index* as a peer."""
    return ("--peer", f"{scheme}://127.0.0.1:{{ports[{index}]}}")


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (bound and released: good enough on loopback)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Cluster:
    """Brokers sharing one key file, so one token works at all of them."""

    folder: str
    brokers: list[Broker]

    @property
    def key_path(self) -> str:
        return os.path.join(self.folder, "shared.key")

    def token(self, rights: str = "get,put,list", **options: object) -> str:
        authority = TokenAuthority.from_key_file(self.key_path)
        return authority.mint(rights, ttl=600, **options)  # type: ignore[arg-type]

    def url(self, index: int) -> str:
        url = self.brokers[index].handle.flight_url
        assert url is not None
        return url


@contextmanager
def cluster(*configs: tuple[str, ...], check_exit: bool = True) -> Iterator[Cluster]:
    """One broker per *configs* entry (its extra `serve` arguments), all sharing a key file.

    In an entry, ``{ports[i]}`` stands for the probed port of broker i, for
    brokers that name each other. Stopped (and checked) when the block ends.
    """
    with broker_folder() as folder, ExitStack() as stack:
        running = Cluster(folder, [])
        ports = free_ports(len(configs))
        for index, args in enumerate(configs):
            filled = [arg.format(ports=ports) for arg in args]
            broker = start(folder, "--key-file", running.key_path, *filled, name=f"b{index}.sock")
            running.brokers.append(broker)
            stack.callback(_stop, broker, check_exit)
        yield running


def _stop(broker: Broker, check: bool) -> None:
    status = broker.stop()
    if check and status != -9:  # a test killed it on purpose
        log = broker.log()
        assert status == 0, f"the broker exited with status {status}\n{log}"
        assert "Traceback" not in log, log


# -- certificates -----------------------------------------------------------------------------


def openssl_missing() -> bool:
    return shutil.which("openssl") is None


@dataclass(frozen=True)
class Certificates:
    """A CA, a certificate for 127.0.0.1 signed by it, a client one, and a rogue CA's pair."""

    folder: str

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    @property
    def cert(self) -> str:
        return self.path("server.pem")

    @property
    def key(self) -> str:
        return self.path("server.key")

    @property
    def client_cert(self) -> str:
        return self.path("client.pem")

    @property
    def client_key(self) -> str:
        return self.path("client.key")

    @property
    def rogue_ca(self) -> str:
        return self.path("rogue-ca.pem")

    @property
    def rogue_cert(self) -> str:
        return self.path("rogue.pem")

    @property
    def rogue_key(self) -> str:
        return self.path("rogue.key")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(folder: str, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN=blobplane test {name}",
        "-keyout", os.path.join(folder, f"{name}.key"),
        "-out", os.path.join(folder, f"{name}.pem"),
    )  # fmt: skip


def _signed(folder: str, name: str, ca: str, san: str) -> None:
    key = os.path.join(folder, f"{name}.key")
    request = os.path.join(folder, f"{name}.csr")
    extensions = os.path.join(folder, f"{name}.ext")
    with open(extensions, "w") as out:
        out.write(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", key, "-out", request,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-days", "2",
        "-CA", os.path.join(folder, f"{ca}.pem"), "-CAkey", os.path.join(folder, f"{ca}.key"),
        "-CAcreateserial", "-extfile", extensions, "-out", os.path.join(folder, f"{name}.pem"),
    )  # fmt: skip


def make_certificates(folder: str) -> Certificates:
    """Make the test's certificates with the `openssl` command (RSA 2048, valid two days)."""
    _ca(folder, "ca")
    _ca(folder, "rogue-ca")
    san = "IP:127.0.0.1,DNS:localhost"
    _signed(folder, "server", "ca", san)
    _signed(folder, "client", "ca", san)
    _signed(folder, "rogue", "rogue-ca", san)
    return Certificates(folder)
