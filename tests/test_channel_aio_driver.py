"""The asyncio driver's readiness waits: one reader per channel, kept between calls.

What the channel suites cannot see from outside: the reader stays registered
while the channel is in use, pauses when readiness comes with nobody
waiting (or the loop would spin), is gone once the channel is closed or
dropped (a later socket may reuse the fd number), and no message is lost to
the stale report that follows every wake-up.
"""

from __future__ import annotations

import asyncio
import gc
import os
import selectors
import socket
from typing import Any

import pytest

from blobplane.channel import aio
from blobplane.channel.transport import Transport
from blobplane.errors import BlobBusy, BlobClosed, ConnectionClosed, ProtocolError, Timeout
from blobplane.wire import Message, UserPayload
from leaks import open_fds

WAIT = 10.0


def _watched(fd: int) -> int:
    """The selector events the running loop watches *fd* for (0: none)."""
    selector: selectors.BaseSelector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    try:
        return selector.get_key(fd).events
    except KeyError:
        return 0


def test_the_reader_stays_registered_between_receives() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        fd = tested.fileno()
        async with tested, peer:
            for round_no in range(3):
                receiving = asyncio.ensure_future(tested.recv())
                await asyncio.sleep(0.01)
                assert _watched(fd) & selectors.EVENT_READ
                await peer.send(f"{round_no}".encode())
                message, _ = await receiving
                assert message == UserPayload(id=message.id, data=f"{round_no}".encode())
                assert _watched(fd) & selectors.EVENT_READ, "unregistered after the receive"
        assert _watched(fd) == 0

    asyncio.run(scenario())


def test_readiness_with_nobody_waiting_pauses_the_reader() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        fd = tested.fileno()
        async with tested, peer:
            await peer.send(b"first")
            await tested.recv()
            await peer.send(b"second")  # nobody receives: the loop must not spin on it
            await asyncio.sleep(0.05)
            assert _watched(fd) == 0
            message, _ = await tested.recv()
            assert isinstance(message, UserPayload)
            assert message.data == b"second"

    asyncio.run(scenario())


def test_no_message_is_lost_to_the_report_after_a_wake_up() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        async with tested, peer:

            async def produce() -> None:
                for index in range(300):
                    await peer.send(index.to_bytes(4, "little"))
                    if index % 3 == 0:
                        await asyncio.sleep(0)  # some arrive while the receiver waits
                    if index % 7 == 0:
                        await asyncio.sleep(0.001)

            producing = asyncio.ensure_future(produce())
            seen = []
            for _ in range(300):
                message, _ = await tested.recv(timeout=WAIT)
                assert isinstance(message, UserPayload)
                seen.append(int.from_bytes(message.data, "little"))
            await producing
            assert seen == list(range(300))

    asyncio.run(scenario())


def test_a_dropped_channel_unregisters_its_reader() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        fd = tested.fileno()
        receiving = asyncio.ensure_future(tested.recv())
        await asyncio.sleep(0.01)  # waiting: the reader is registered
        await peer.send(b"x")
        await receiving
        assert _watched(fd)
        del tested, receiving
        gc.collect()
        assert _watched(fd) == 0
        peer.close()

    asyncio.run(scenario())


def test_closing_wakes_a_waiting_receiver_and_unregisters() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        fd = tested.fileno()
        receiving = asyncio.ensure_future(tested.recv())
        await asyncio.sleep(0.01)
        tested.close()
        with pytest.raises(BlobClosed):
            await receiving
        assert _watched(fd) == 0
        peer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("timeout", [0, 0.02])
def test_timeouts_without_a_timer_until_the_first_wait(timeout: float) -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        async with tested, peer:
            with pytest.raises(Timeout):
                await tested.recv(timeout=timeout)
            await peer.send(b"ready")
            await asyncio.sleep(0.01)
            message, _ = await tested.recv(timeout=timeout)  # there at once: no wait, no timeout
            assert isinstance(message, UserPayload)
            loop: Any = asyncio.get_running_loop()
            assert not [h for h in loop._scheduled if not h.cancelled()]

    asyncio.run(scenario())


def test_a_channel_moves_to_another_event_loop() -> None:
    tested, peer = aio.socketpair(timeout=WAIT)

    async def exchange(data: bytes) -> None:
        await peer.send(data)
        message, _ = await tested.recv()
        assert isinstance(message, UserPayload)
        assert message.data == data

    try:
        asyncio.run(exchange(b"first loop"))
        asyncio.run(exchange(b"second loop"))
    finally:
        tested.close()
        peer.close()


def test_an_immediate_send_that_would_wait_sends_nothing() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        async with tested, peer:
            sent: list[int] = []
            for index in range(100_000):
                if not tested.try_send_payload(index.to_bytes(4, "little")):
                    break
                sent.append(index)
            else:
                pytest.fail("the socket never filled up")
            assert sent == list(range(len(sent)))
            # Refused without sending: the channel goes on, in order, with later ids.
            after = asyncio.ensure_future(tested.send(b"after"))  # waits for room
            for index in sent:
                message, _ = await peer.recv()
                assert isinstance(message, UserPayload)
                assert int.from_bytes(message.data, "little") == index
            message, _ = await peer.recv()
            assert isinstance(message, UserPayload)
            assert message.data == b"after"
            await after

    asyncio.run(scenario())


# -- read_forever: the callback reader ----------------------------------------------------


class _Log:
    """What a callback reader delivered, and its one end."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.fds: list[tuple[int, ...]] = []
        self.errors: list[Exception] = []
        self.ended: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self.count = asyncio.Event()
        self.wanted = 0

    def on_message(self, message: Message, fds: tuple[int, ...]) -> None:
        assert isinstance(message, UserPayload)
        self.messages.append(message.data)
        self.fds.append(fds)
        if len(self.messages) >= self.wanted:
            self.count.set()

    def on_error(self, error: Exception) -> None:
        self.errors.append(error)
        if not self.ended.done():
            self.ended.set_result(error)

    async def until(self, count: int) -> None:
        self.wanted = count
        if len(self.messages) < count:
            self.count.clear()
            await asyncio.wait_for(self.count.wait(), WAIT)


def _pipe_fd() -> tuple[int, int]:
    return os.pipe()


@pytest.mark.parametrize("transport", ["seqpacket", "stream"])
def test_read_forever_delivers_in_order_and_holds_the_receive_side(transport: Transport) -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(transport=transport, timeout=WAIT)
        fd = tested.fileno()
        async with tested, peer:
            log = _Log()
            # Sent before the reader starts: in the socket (or the wire's buffer) already.
            for index in range(50):
                await peer.send(index.to_bytes(4, "little"))
            reader = tested.read_forever(log.on_message, log.on_error)
            with pytest.raises(BlobBusy):
                await tested.recv(timeout=0)
            await log.until(50)
            for index in range(50, 400):
                await peer.send(index.to_bytes(4, "little"))
                if index % 5 == 0:
                    await asyncio.sleep(0)
            await log.until(400)
            assert [int.from_bytes(m, "little") for m in log.messages] == list(range(400))
            assert _watched(fd) & selectors.EVENT_READ
            reader.stop()
            assert not reader.active
            assert _watched(fd) == 0
            await peer.send(b"after")
            message, _ = await tested.recv()  # the receive side is free again
            assert isinstance(message, UserPayload)
            assert message.data == b"after"
            await asyncio.sleep(0.01)
            assert log.errors == []  # stop() calls nobody

    asyncio.run(scenario())


def test_read_forever_hands_over_fds() -> None:
    async def scenario() -> None:
        before = open_fds()
        tested, peer = aio.socketpair(timeout=WAIT)
        async with tested, peer:
            log = _Log()
            tested.read_forever(log.on_message, log.on_error)
            read_end, write_end = _pipe_fd()
            try:
                await peer.send(b"with fd", fds=[write_end])
            finally:
                os.close(write_end)
            await log.until(1)
            (received,) = log.fds[0]
            os.write(received, b"!")
            assert os.read(read_end, 1) == b"!"
            os.close(received)
            os.close(read_end)
        assert open_fds() == before

    asyncio.run(scenario())


def test_read_forever_ends_once_when_the_peer_hangs_up() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        fd = tested.fileno()
        async with tested:
            log = _Log()
            reader = tested.read_forever(log.on_message, log.on_error)
            await peer.send(b"last words")
            peer.close()
            error = await asyncio.wait_for(log.ended, WAIT)
            assert isinstance(error, ConnectionClosed)
            assert log.messages == [b"last words"]  # what came before the hang-up first
            assert not reader.active
            assert _watched(fd) == 0
            with pytest.raises(ConnectionClosed):  # not BlobBusy: the receive side is free
                await tested.recv()
            await asyncio.sleep(0.01)
            assert len(log.errors) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("inside", [False, True])
def test_read_forever_ends_once_when_the_channel_closes(inside: bool) -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        fd = tested.fileno()
        log = _Log()

        def on_message(message: Message, fds: tuple[int, ...]) -> None:
            log.on_message(message, fds)
            if inside:
                tested.close()

        reader = tested.read_forever(on_message, log.on_error)
        if inside:
            await peer.send(b"close now")
            await peer.send(b"never delivered")
        else:
            await asyncio.sleep(0.01)
            tested.close()
            assert _watched(fd) == 0  # off before the socket closed: its number may be reused
        error = await asyncio.wait_for(log.ended, WAIT)
        assert _watched(fd) == 0
        assert isinstance(error, BlobClosed)
        assert log.messages == ([b"close now"] if inside else [])
        assert not reader.active
        await asyncio.sleep(0.01)
        assert len(log.errors) == 1
        peer.close()

    asyncio.run(scenario())


def test_read_forever_reports_a_protocol_error_once() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tested = aio.from_socket(ours, timeout=WAIT)
        fd = tested.fileno()
        with theirs:
            async with tested:
                log = _Log()
                tested.read_forever(log.on_message, log.on_error)
                theirs.send(b"this is no frame of ours")
                error = await asyncio.wait_for(log.ended, WAIT)
                assert isinstance(error, ProtocolError)
                assert _watched(fd) == 0
                await asyncio.sleep(0.01)
                assert len(log.errors) == 1
                assert log.messages == []

    asyncio.run(scenario())


def test_read_forever_closes_the_fds_of_a_message_whose_callback_raised() -> None:
    async def scenario() -> None:
        before = open_fds()
        tested, peer = aio.socketpair(timeout=WAIT)
        async with tested, peer:
            log = _Log()
            handed: list[tuple[int, ...]] = []

            def on_message(message: Message, fds: tuple[int, ...]) -> None:
                handed.append(fds)
                raise ValueError("a bug in the handler")

            reader = tested.read_forever(on_message, log.on_error)
            read_end, write_end = _pipe_fd()
            try:
                await peer.send(b"with fd", fds=[write_end])
                await peer.send(b"not delivered", fds=[write_end])
            finally:
                os.close(write_end)
            error = await asyncio.wait_for(log.ended, WAIT)
            assert isinstance(error, ValueError)
            assert len(handed) == 1
            assert not reader.active
            # The handler's copy is closed: the pipe's only writer left is the queued message.
            await asyncio.sleep(0.01)
            assert len(log.errors) == 1
            message, fds = await tested.recv()  # the channel still works
            assert isinstance(message, UserPayload)
            assert message.data == b"not delivered"
            for extra in fds:
                os.close(extra)
            os.close(read_end)
        assert open_fds() == before

    asyncio.run(scenario())


def test_read_forever_pauses_without_spinning_and_resumes_in_order() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        fd = tested.fileno()
        async with tested, peer:
            log = _Log()
            reader: aio.ChannelReader | None = None

            def on_message(message: Message, fds: tuple[int, ...]) -> None:
                log.on_message(message, fds)
                assert reader is not None
                if len(log.messages) == 3:
                    reader.pause()

            reader = tested.read_forever(on_message, log.on_error)
            for index in range(10):
                await peer.send(index.to_bytes(4, "little"))
            await log.until(3)
            await asyncio.sleep(0.05)
            assert len(log.messages) == 3  # held back while paused
            assert reader.paused
            assert _watched(fd) == 0  # readiness while paused took the callback off
            reader.resume()
            await log.until(10)
            assert [int.from_bytes(m, "little") for m in log.messages] == list(range(10))
            assert _watched(fd) & selectors.EVENT_READ
            assert log.errors == []

    asyncio.run(scenario())


def test_read_forever_is_refused_while_another_task_receives() -> None:
    async def scenario() -> None:
        tested, peer = aio.socketpair(timeout=WAIT)
        async with tested, peer:
            receiving = asyncio.ensure_future(tested.recv())
            await asyncio.sleep(0.01)
            log = _Log()
            with pytest.raises(BlobBusy):
                tested.read_forever(log.on_message, log.on_error)
            await peer.send(b"to the task")
            message, _ = await receiving
            assert isinstance(message, UserPayload)
            assert message.data == b"to the task"
        log2 = _Log()
        with pytest.raises(BlobClosed):
            tested.read_forever(log2.on_message, log2.on_error)

    asyncio.run(scenario())
