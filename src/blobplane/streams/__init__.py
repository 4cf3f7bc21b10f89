"""Publish/subscribe of frames over a `BlobPool`: reused shared memory at memcpy speed.

A `Publisher` owns a pool and listens at a socket path; any number of
`Subscriber`s (or `AsyncSubscriber`s) connect to it. Each frame is written
in place into a loaned slot and announced to every subscriber through its
own ring in shared memory (an entry, then a byte on a socket pair: no
message and no fd per frame, see `streams.ring`); subscribers map every slot
once, read it in place and release it with a mark in shared memory::

    with Publisher(path, slot_size=6_220_800, slots=8) as pub:
        with pub.loan(timeout=1) as loan:
            camera.read_into(loan.buffer)
            pub.publish(loan, header=b"frame meta")

    with Subscriber(path) as sub:
        for receipt in sub:
            with receipt:
                show(receipt.view, receipt.header, receipt.missed)

Guarantees: a slot is written only by its publisher (the kernel refuses
anyone else a writable mapping, and nobody can shrink or grow it), and the
publisher never reuses a slot before every subscriber it was handed to
released it, or, under `Backpressure.DROP_OLDEST`, before it took the frame
back from subscribers that had not started reading it. The kernel does not
make a frame immutable while you read it: a broken publisher could still
write into it; `Subscriber(check=True)` detects that on release. Everything
a subscriber reads from its ring is checked: a broken publisher gets a
`RemoteProtocolError`, never an out-of-range read.

Latency: a subscriber or publisher that sleeps is woken through its socket
pair, which on a VM costs ~30-70 µs when the sleeper is on another CPU.
``spin_us=`` on `Publisher` and `Subscriber` makes them look at the shared
counters that long before sleeping: on a busy stream whose processes each
have a CPU of their own, a 4 KiB round trip drops from ~80 µs to ~15 µs.
It is off by default because it only pays when there are more free CPUs than
spinning processes: with a publisher and four spinning subscribers on two
CPUs it made both latency and throughput worse (bench/streams.py). Past its
first 5 µs a spinner yields its CPU at each look at the clock, so a publisher
and a subscriber that share a CPU take turns instead of each spinning out its
budget.

The ring relies on x86's store and load ordering (Python has no fences):
elsewhere `Publisher` and `Subscriber` raise `NotImplementedError`.
"""

from blobplane.streams.protocol import Backpressure
from blobplane.streams.publisher import Publisher
from blobplane.streams.subscriber import AsyncReceipt, AsyncSubscriber, Receipt, Subscriber

__all__ = ["AsyncReceipt", "AsyncSubscriber", "Backpressure", "Publisher", "Receipt", "Subscriber"]
