"""The tier API's data and contracts: `Handle`, `TierStats`, the `TierStore` protocol every tier offers,
and the `Backend` protocol a tier implements to plug into `AsyncTierStore` (in `store.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, Self, TypeVar

import torch

S = TypeVar("S")
"""What a backend stores for one tensor (a buffer, a file record)."""


@dataclass(frozen=True, slots=True)
class Handle:
    """A tensor put on a tier; give it back to `get`, `prefetch` and `free` of the same store."""

    id: int
    key: str
    tier: str
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TierStats:
    """A snapshot of a store's counters. Bytes are tensor bytes; seconds are wall time."""

    tier: str
    backend: str
    """What backs the tier, e.g. `files in /tmp/memplan-ssd-x (O_DIRECT)`."""
    emulated: bool
    """True when the tier is backed by something else than it claims (CXL on plain host memory)."""
    live_bytes: int
    peak_bytes: int
    bytes_written: int
    bytes_read: int
    puts: int
    gets: int
    write_s: float
    """Time spent copying tensors out (on workers), summed over copies."""
    read_s: float
    """Time spent reading tensors back (on workers for prefetches, in the caller otherwise)."""
    busy_s: float
    """Wall time during which at least one copy (either way) was running."""
    wait_s: float
    """Time the caller blocked in `get`, `free` and `flush`."""

    @property
    def overlap_s(self) -> float:
        """Busy time the caller did not spend waiting: transfer hidden behind its work."""
        return max(0.0, self.busy_s - self.wait_s)

    @property
    def overlap_fraction(self) -> float:
        """Share of the busy time hidden behind the caller's work, in [0, 1] (0 when nothing moved)."""
        return self.overlap_s / self.busy_s if self.busy_s > 0.0 else 0.0

    @property
    def write_bw(self) -> float:
        """Bytes/s of the copies out (0 when nothing was written)."""
        return self.bytes_written / self.write_s if self.write_s > 0 else 0.0

    @property
    def read_bw(self) -> float:
        """Bytes/s of the read-backs (0 when nothing was read)."""
        return self.bytes_read / self.read_s if self.read_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            overlap_s=self.overlap_s,
            overlap_fraction=self.overlap_fraction,
            write_bw=self.write_bw,
            read_bw=self.read_bw,
        )
        return out


class TierStore(Protocol):
    """The API every tier offers (see the module docstring for the life of a tensor)."""

    tier: str

    def put(self, key: str, t: torch.Tensor) -> Handle: ...
    def get(self, handle: Handle, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def prefetch(self, handle: Handle, out: torch.Tensor | None = None) -> None: ...
    def wait(self, handle: Handle) -> None: ...
    def free(self, handle: Handle) -> None: ...
    def flush(self) -> None: ...
    def stats(self) -> TierStats: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class Backend(Protocol[S]):
    """How one tier holds bytes. `write` and `read` run on worker threads and may run concurrently."""

    @property
    def description(self) -> str: ...

    @property
    def emulated(self) -> bool: ...

    def write(self, key: str, data: torch.Tensor, ready: torch.cuda.Event | None) -> S:
        """Store flat `uint8` bytes (on any device; `ready`: the CUDA event to wait for first)."""
        ...

    def read(
        self,
        stored: S,
        device: torch.device,
        consumer: torch.cuda.Stream | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A fresh flat `uint8` copy of the stored bytes on `device`, owned by the caller."""
        ...

    def release(self, stored: S) -> None: ...

    def close(self) -> None: ...
