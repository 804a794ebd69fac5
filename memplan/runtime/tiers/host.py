"""The host tier: tensors swapped from a GPU into host DRAM.

A tensor's bytes are copied into a host buffer allocated for it; the buffer is pinned (page-locked)
when CUDA is available, so the device-to-host copy is a DMA that runs on a worker's side stream while
the GPU keeps computing (see `tensor_bytes`; that path is untested on the CPU-only machine this was
written on). Without CUDA the copy is a plain memcpy on a worker thread.

`MemoryBackend` is shared with the CXL tier, which differs only in where its buffers come from: an
`Allocator`. On a `cpu` hardware there is no host tier (the device already is host memory), and
`open_host` says so instead of pretending.
"""

from __future__ import annotations

from typing import Protocol

import torch

from memplan.ir.hardware import Hardware
from memplan.runtime.tiers.errors import TierUnavailable
from memplan.runtime.tiers.store import AsyncTierStore
from memplan.runtime.tiers.tensor_bytes import copy_bytes, fresh_on, host_buffer


class Allocator(Protocol):
    """Where a memory tier's byte buffers come from."""

    @property
    def description(self) -> str: ...

    def allocate(self, nbytes: int) -> torch.Tensor:
        """An uninitialised flat CPU `uint8` buffer of `nbytes` bytes."""
        ...

    def release(self, buf: torch.Tensor) -> None:
        """Give back a buffer from `allocate` (it is not used afterwards)."""
        ...


class HostAllocator:
    """Ordinary host memory from torch's allocator, pinned when CUDA is available."""

    def __init__(self, what: str = "host memory") -> None:
        pinned = " (pinned)" if torch.cuda.is_available() else ""
        self._description = what + pinned

    @property
    def description(self) -> str:
        return self._description

    def allocate(self, nbytes: int) -> torch.Tensor:
        return host_buffer(nbytes)

    def release(self, buf: torch.Tensor) -> None:
        """Nothing to do: the buffer goes back to torch when its last reference drops."""


class MemoryBackend:
    """A memory tier's backend: one buffer from `allocator` per tensor."""

    def __init__(self, allocator: Allocator, *, emulated: bool = False) -> None:
        self._allocator = allocator
        self._emulated = emulated

    @property
    def description(self) -> str:
        return self._allocator.description

    @property
    def emulated(self) -> bool:
        return self._emulated

    def write(self, key: str, data: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        buf = self._allocator.allocate(data.numel())
        try:
            copy_bytes(buf, data, ready)
        except BaseException:
            self._allocator.release(buf)
            raise
        return buf

    def read(
        self,
        stored: torch.Tensor,
        device: torch.device,
        consumer: torch.cuda.Stream | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is not None:
            copy_bytes(out, stored)
            return out
        return fresh_on(stored, device, consumer, borrowed=True)

    def release(self, stored: torch.Tensor) -> None:
        self._allocator.release(stored)

    def close(self) -> None:
        """Nothing beyond the buffers, which the store releases one by one."""


def open_host(hardware: Hardware, *, workers: int = 2) -> AsyncTierStore[torch.Tensor]:
    """A store on the hardware's `host` tier; refuses on a CPU device, whose memory already is host memory."""
    if hardware.device_kind == "cpu":
        raise TierUnavailable(
            f"hardware {hardware.name!r} computes on the CPU: its device tier already is host memory, so "
            "there is no separate host tier to swap to; swap to 'ssd' (or 'cxl') instead, or describe a "
            "GPU machine (device_kind 'cuda') with a 'host' tier"
        )
    tier = hardware.tier("host")
    return AsyncTierStore("host", MemoryBackend(HostAllocator()), tier.capacity_bytes, workers=workers)
