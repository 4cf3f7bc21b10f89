"""The interface every backend implements, and the allocation record it returns."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import ClassVar

from blobplane.types import BlobBackend, BlobId, SharedBlobDescriptor


@dataclass(slots=True)
class Allocation:
    """What a backend created: the descriptor to publish and the fd that keeps it alive."""

    descriptor: SharedBlobDescriptor
    fd: int
    size: int
    path: str | None = None  # the file to unlink when the blob is destroyed


class Backend(abc.ABC):
    """Creates, seals and destroys blobs of one kind."""

    kind: ClassVar[BlobBackend]
    # Whether the producer's writable mapping is pre-faulted (MADV_POPULATE_WRITE).
    prefault: ClassVar[bool] = True
    # Whether seal() makes the contents immutable for everyone, enforced by the kernel.
    kernel_sealed: ClassVar[bool] = False

    @abc.abstractmethod
    def create(self, size: int, blob_id: BlobId) -> Allocation:
        """Allocate *size* bytes; the caller owns the returned allocation."""

    @abc.abstractmethod
    def seal(self, allocation: Allocation) -> None:
        """Forbid further changes; the producer's writable mapping is already gone."""

    def destroy(self, allocation: Allocation) -> None:
        """Close the fd and unlink the file; safe to call twice."""
        fd, allocation.fd = allocation.fd, -1
        if fd >= 0:
            os.close(fd)
        path, allocation.path = allocation.path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
