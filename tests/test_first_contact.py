"""What a newcomer types first: socket paths anywhere writable, waiting for a peer to appear."""

from __future__ import annotations

import asyncio
import inspect
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobplane import channel
from blobplane.client import connect_broker, connect_broker_async
from blobplane.errors import ConnectionClosed, ConnectionRefused
from blobplane.streams import AsyncSubscriber, Publisher, Subscriber
from blobplane.wire import UserPayload
from brokers import Broker, broker_folder, start

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leaks")]


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder like /tmp: world-writable, sticky."""
    with tempfile.TemporaryDirectory(prefix="bp-shared-") as folder:
        os.chmod(folder, 0o1777)
        yield Path(folder)


def _round_trip(path: str) -> None:
    with channel.listen(path) as listener:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        client = threading.Thread(target=lambda: channel.connect(path, timeout=10).close())
        client.start()
        listener.accept(timeout=10).close()
        client.join(10)
    assert not os.path.exists(path)


def test_a_listener_in_a_shared_folder_is_0600_and_works(shared_folder: Path) -> None:
    _round_trip(str(shared_folder / "x.sock"))
    assert os.listdir(shared_folder) == []  # no staging folder left behind


def test_a_relative_path_works(shared_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shared_folder)
    _round_trip("./x.sock")


def test_a_missing_folder_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "x.sock"
    _round_trip(str(path))
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_accept_waits_until_told_otherwise() -> None:
    assert inspect.signature(channel.Listener.accept).parameters["timeout"].default is None
    assert inspect.signature(channel.aio.AsyncListener.accept).parameters["timeout"].default is None


def _listen_later(path: str, delay: float, done: threading.Event) -> None:
    time.sleep(delay)
    with channel.listen(path) as listener:
        listener.accept(timeout=10).close()
    done.set()


def test_connect_waits_for_a_listener_that_comes_later(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    with pytest.raises(ConnectionRefused):
        channel.connect(path)  # no wait: at once
    done = threading.Event()
    thread = threading.Thread(target=_listen_later, args=(path, 0.3, done))
    thread.start()
    started = time.monotonic()
    channel.connect(path, wait=10).close()
    assert 0.2 < time.monotonic() - started < 5
    thread.join(10)
    assert done.is_set()


def test_asyncio_connect_waits_too(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    done = threading.Event()
    thread = threading.Thread(target=_listen_later, args=(path, 0.3, done))
    thread.start()

    async def main() -> None:
        (await channel.aio.connect(path, wait=10)).close()

    asyncio.run(main())
    thread.join(10)
    assert done.is_set()


def test_broker_clients_wait_for_a_broker_that_starts_later() -> None:
    with broker_folder() as folder:
        path = os.path.join(folder, "b.sock")
        brokers: list[Broker] = []

        def start_later() -> None:
            time.sleep(0.3)
            brokers.append(start(folder))

        starter = threading.Thread(target=start_later)
        starter.start()
        try:
            with connect_broker(path, wait=20) as client:
                client.put_bytes(b"here", key="k")

            async def main() -> None:
                async with await connect_broker_async(path, wait=20) as aclient:
                    await aclient.delete("k")

            asyncio.run(main())
        finally:
            starter.join(30)
            for broker in brokers:
                assert broker.stop() == 0


def test_subscribers_wait_for_a_publisher_that_starts_later(tmp_path: Path) -> None:
    path = str(tmp_path / "stream.sock")
    received: list[bytes] = []

    def subscribe() -> None:
        with Subscriber(path, wait=10) as sub, sub.receive() as receipt:
            received.append(bytes(receipt.view))

    thread = threading.Thread(target=subscribe)
    thread.start()
    time.sleep(0.3)
    with Publisher(path, slot_size=4096, slots=2) as pub:
        pub.wait_for_subscribers(1, timeout=10)
        with pub.loan() as loan:
            loan.buffer[:5] = b"frame"
            loan.set_length(5)
            pub.publish(loan)
        thread.join(10)
    assert received == [b"frame"]

    async def late_async() -> bytes:
        sub = await AsyncSubscriber.connect(path, wait=0.05)
        sub.close()
        return b""

    with pytest.raises(ConnectionRefused):
        asyncio.run(late_async())


def test_what_a_peer_said_before_it_hung_up_on_unread_data_is_read(tmp_path: Path) -> None:
    """The kernel reports ECONNRESET before the peer's last datagrams; they are read first."""
    path = str(tmp_path / "reset.sock")
    with channel.listen(path) as listener, channel.connect(path, timeout=10) as client:
        server = listener.accept(timeout=10)
        client.send(UserPayload(data=b"never read"))
        server.send(UserPayload(data=b"farewell"))
        server.close()  # with the client's message unread
        message, _ = client.recv(timeout=10)
        assert isinstance(message, UserPayload)
        assert message.data == b"farewell"
        with pytest.raises(ConnectionClosed):
            client.recv(timeout=10)


def test_the_asyncio_driver_reads_it_too(tmp_path: Path) -> None:
    path = str(tmp_path / "reset.sock")

    async def main() -> bytes:
        async with channel.aio.listen(path) as listener:
            client = await channel.aio.connect(path, timeout=10)
            try:
                server = await listener.accept(timeout=10)
                await client.send(UserPayload(data=b"never read"))
                await server.send(UserPayload(data=b"farewell"))
                server.close()
                message, _ = await client.recv(timeout=10)
                with pytest.raises(ConnectionClosed):
                    await client.recv(timeout=10)
            finally:
                client.close()
        assert isinstance(message, UserPayload)
        return message.data

    assert asyncio.run(main()) == b"farewell"
