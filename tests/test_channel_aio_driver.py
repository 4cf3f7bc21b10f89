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
import selectors
from typing import Any

import pytest

from blobplane.channel import aio
from blobplane.errors import BlobClosed, Timeout
from blobplane.wire import UserPayload

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
                request = tested._try_send_built(UserPayload(data=index.to_bytes(4, "little")))
                if request is None:
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
