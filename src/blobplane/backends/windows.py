"""Windows named file mappings: not implemented yet.

The design is CreateFileMappingW on the page file, DuplicateHandle into the
consumer, MapViewOfFile there. It cannot be built and tested on the Linux
machines this project runs on, so rather than ship untested ctypes code it
raises. On Windows, use BlobBackend.TEMP_FILE.
"""

from __future__ import annotations

from blobplane.backends.base import Allocation, Backend
from blobplane.types import BlobBackend, BlobId

UNSUPPORTED = (
    "the Windows backend is not implemented yet (it cannot be tested on this project's "
    "Linux machines); use BlobBackend.TEMP_FILE on Windows"
)


class WindowsBackend(Backend):
    kind = BlobBackend.WINDOWS

    def create(self, size: int, blob_id: BlobId) -> Allocation:
        raise NotImplementedError(UNSUPPORTED)

    def seal(self, allocation: Allocation) -> None:
        raise NotImplementedError(UNSUPPORTED)
