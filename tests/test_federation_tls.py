"""TLS and mutual TLS between brokers and clients, with certificates the tests make (openssl)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("pyarrow.flight")

from blobplane.broker.flight.client import FlightBlobClient
from blobplane.broker.flight.config import TlsFiles
from blobplane.client import connect_broker
from blobplane.errors import PeerUnreachable
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
        name = key()
        data = bytes(range(256)) * 4096
        with connect_broker(home.socket_path) as producer:
            producer.put_bytes(data, key=name)
        with connect_broker(trusted.socket_path) as consumer, consumer.get(name) as mapped:
            assert bytes(mapped.as_slice()) == data
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
