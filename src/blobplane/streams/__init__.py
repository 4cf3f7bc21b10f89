"""Publish/subscribe of frames over a `BlobPool`: reused shared memory at memcpy speed.

A `Publisher` owns a pool and listens at a socket path; any number of
`Subscriber`s (or `AsyncSubscriber`s) connect to it. Each frame is written
in place into a loaned slot and announced to every subscriber with one small
message; subscribers map each slot once, read it in place and release it::

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
write into it; `Subscriber(check=True)` detects that on release.
"""

from blobplane.streams.protocol import Backpressure
from blobplane.streams.publisher import Publisher
from blobplane.streams.subscriber import AsyncReceipt, AsyncSubscriber, Receipt, Subscriber

__all__ = ["AsyncReceipt", "AsyncSubscriber", "Backpressure", "Publisher", "Receipt", "Subscriber"]
