"""TLS and mutual TLS between brokers and clients, with certificates the tests make (openssl)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("pyarrow.flight")

from blobplane.broker.flight.client import FlightBlobClient
from blobplane.broker.flight.config import TlsFiles
from blobplane.broker.tokens import TokenAuthority
from blobplane.client import connect_broker
from blobplane.errors import PeerUnreachable
from brokers import running_broker
from flight_brokers import Certificates, at, cluster, make_certificates, openssl_missing, peer

pytestmark = pytest.mark.skipif(
    openssl_missing(), reason="needs the openssl command to make test certificates"
)


def key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(str(tmp_path_factory.mktemp("certs")))


def tls_args(certs: Certificates, *, mutual: bool) -> tuple[str, ...]:
    args = ("--tls-cert", certs.cert, "--tls-key", certs.key)
    return (*args, "--tls-ca", certs.ca) if mutual else args


@pytest.mark.timeout(40)
def test_tls_endpoint_serves_clients_that_trust_its_ca(certs: Certificates) -> None:
    with cluster((*at(0, "grpc+tls"), *tls_args(certs, mutual=False))) as running:
        home = running.brokers[0]
        url = running.url(0)
        assert url.startswith("grpc+tls://")
        with connect_broker(home.socket_path) as producer:
            name = key()
            producer.put_bytes(b"over tls", key=name)
        with FlightBlobClient(url, running.token(), tls=TlsFiles(ca=certs.ca)) as client:
            assert client.get_bytes(name) == b"over tls"
        # A client that trusts another CA refuses the endpoint's certificate.
        rogue = TlsFiles(ca=certs.rogue_ca)
        with (
            FlightBlobClient(url, running.token(), tls=rogue) as client,
            pytest.raises(PeerUnreachable),
        ):
            client.get_bytes(name)
        # Plain text to a TLS endpoint goes nowhere.
        plain = url.replace("grpc+tls://", "grpc://")
        with FlightBlobClient(plain, running.token()) as client, pytest.raises(PeerUnreachable):
            client.get_bytes(name)


@pytest.mark.timeout(40)
def test_mutual_tls_between_brokers(certs: Certificates) -> None:
    mutual = tls_args(certs, mutual=True)
    with cluster(
        (*at(0, "grpc+tls"), *mutual),
        (*peer(0, "grpc+tls"), *mutual, "--peer-timeout", "3s"),
        # A broker whose certificate another CA signed: refused by the first.
        (
            *peer(0, "grpc+tls"), "--tls-cert", certs.rogue_cert, "--tls-key", certs.rogue_key,
            "--tls-ca", certs.ca, "--peer-timeout", "3s",
        ),
    ) as running:  # fmt: skip
        home, trusted, rogue = running.brokers
        name, small = key(), key()
        data = bytes(range(256)) * 12288  # 3 MiB: a DoGet stream, past the "get" action's 1 MiB
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(data, key=name)
            producer.put_bytes(b"in the answer", key=small)
        with connect_broker(trusted.socket_path) as consumer:
            with consumer.get(name) as mapped:
                assert hashlib.sha256(mapped.as_slice()).digest() == hashlib.sha256(data).digest()
            with consumer.get(small) as mapped:
                assert bytes(mapped.as_slice()) == b"in the answer"
        with connect_broker(rogue.socket_path) as consumer, pytest.raises(PeerUnreachable):
            consumer.get(name)
        url = running.url(0)
        # A client without a certificate is refused at the handshake...
        with (
            FlightBlobClient(url, running.token(), tls=TlsFiles(ca=certs.ca)) as client,
            pytest.raises(PeerUnreachable),
        ):
            client.get_bytes(name)
        # ...and one with the CA's client certificate is served.
        client_tls = TlsFiles(cert=certs.client_cert, key=certs.client_key, ca=certs.ca)
        with FlightBlobClient(url, running.token(), tls=client_tls) as client:
            assert client.get_bytes(name) == data


@pytest.mark.timeout(30)
def test_a_peers_file_is_checked_line_by_line(tmp_path: Path) -> None:
    peers = tmp_path / "peers"
    for content, reason in (
        ("grpc://127.0.0.1:5000\nnot an address\n", "line 2: 'not an address' is not a Flight"),
        ("grpc://192.0.2.1:5000\n", "plain text on a network address"),
        ("# nobody yet\n\n", "names no peer"),
    ):
        peers.write_text(content)
        socket_path = str(tmp_path / "run" / "b.sock")
        result = subprocess.run(
            [sys.executable, "-m", "blobplane", "serve", "--socket", socket_path,
             "--peers-file", str(peers)],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert result.returncode == 1, result
        assert reason in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_plain_text_is_refused_off_loopback(tmp_path: Path) -> None:
    for args, reason in (
        (["--flight", "grpc://192.0.2.1:5000"], "plain text on a network address"),
        (["--peer", "grpc://192.0.2.1:5000"], "plain text on a network address"),
        (["--flight", "grpc+tls://127.0.0.1:0"], "give the endpoint's certificate and key"),
    ):
        socket_path = str(tmp_path / "run" / "b.sock")
        result = subprocess.run(
            [sys.executable, "-m", "blobplane", "serve", "--socket", socket_path, *args],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert result.returncode == 1, result
        assert result.stderr.startswith("error: "), result.stderr
        assert reason in result.stderr
        assert "Traceback" not in result.stderr
    # --insecure: the operator says the network is private; the endpoint listens everywhere.
    with running_broker("--flight", "grpc://0.0.0.0:0", "--insecure") as broker:
        url = broker.handle.flight_url
        assert url is not None
        assert url.startswith("grpc://0.0.0.0:")
        token = TokenAuthority.from_key_file(broker.socket_path + ".key").mint("list", ttl=60)
        port = url.rsplit(":", 1)[1]
        with FlightBlobClient(f"grpc://127.0.0.1:{port}", token) as client:
            assert client.list() == []
