"""Errors of the memory tiers: each says which tier, what went wrong and what to do about it.

They are `MemplanError`s (problems with the machine or the request, not bugs of memplan), so the CLI
prints the message instead of a traceback.
"""

from __future__ import annotations

from memplan.errors import MemplanError


class TierError(MemplanError):
    """A memory tier cannot do what was asked (closed store, unknown or freed handle, bad tensor)."""


class TierUnavailable(TierError):
    """The tier does not exist on this machine (no host tier on a CPU device, no such NUMA node)."""


class TierFull(TierError):
    """The tier has no room for a tensor: its planned capacity, or the disk behind it, is full."""

    def __init__(self, message: str, needed_bytes: int, free_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


class TierIOError(TierError):
    """Reading or writing the tier's backing storage failed (a short read, an I/O error)."""


class TierCorrupt(TierError):
    """Data read back from the tier does not match what was written (checksum mismatch)."""

    def __init__(self, message: str, key: str, path: str) -> None:
        super().__init__(message)
        self.key = key
        self.path = path
