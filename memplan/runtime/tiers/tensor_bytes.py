"""Tensors as flat bytes, and the copies between a tensor's device and a tier's CPU-side buffer.

Every tier stores a tensor as its raw bytes (a flat `uint8` buffer) beside a `TensorMeta` (dtype,
shape, device). Moving bytes instead of values makes round trips bitwise exact for every dtype, bf16,
fp8, int8 and bool included, and lets one code path serve them all. A non-contiguous input is made
contiguous first; what comes back is contiguous, with the same dtype and shape.

CUDA (untested on the CPU-only machine this was written on): a copy of a CUDA tensor runs on a side
stream owned by the worker thread doing it. At `put`, the caller records an event on its current
stream (`ready_event`), and the side stream waits for it, so the copy sees the producer's writes; the
worker then synchronizes its side stream, so only the worker blocks, never the caller. A read-back
allocates the device tensor in the worker and `record_stream`s it on the consumer's stream, so the
caching allocator does not reuse its memory while the consumer's kernels still use it. Host-side
buffers are pinned when CUDA is available, which is what lets the device-to-host copy run as DMA.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from memplan.runtime.tiers.errors import TierError


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What is needed to rebuild a tensor from its bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    nbytes: int
    """numel x element size: the bytes the tier holds for it."""


def meta_of(key: str, t: torch.Tensor) -> TensorMeta:
    """The metadata of a dense tensor a tier can hold; refuses sparse, quantized and meta tensors."""
    if t.layout != torch.strided or t.is_quantized:
        raise TierError(f"tensor {key!r}: a tier stores dense tensors only, got layout {t.layout}")
    if t.device.type == "meta":
        raise TierError(f"tensor {key!r} is on the meta device: it has no data to move to a tier")
    return TensorMeta(t.dtype, tuple(t.shape), t.device, t.numel() * t.element_size())


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat contiguous `uint8` tensor on its device (a copy if `t` is strided)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(data: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """Reinterpret a flat `uint8` buffer as the tensor `meta` describes (no copy)."""
    return data.view(meta.dtype).reshape(meta.shape)


def host_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised CPU byte buffer, pinned when CUDA is available (page-locked, DMA-able)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


def ready_event(t: torch.Tensor) -> torch.cuda.Event | None:
    """For a CUDA tensor, an event on the caller's current stream once `t` is written; else None."""
    if not t.is_cuda:
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(t.device))
    return event


def consumer_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The caller's current CUDA stream for a tensor that will come back on `device`; else None."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


_local = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's copy stream on `device` (one per worker thread and device)."""
    streams: dict[int, torch.cuda.Stream] = _local.__dict__.setdefault("streams", {})
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
    return streams[index]


def copy_bytes(dst: torch.Tensor, src: torch.Tensor, ready: torch.cuda.Event | None = None) -> None:
    """`dst.copy_(src)` for flat byte buffers; a copy touching CUDA is finished when this returns."""
    device = src.device if src.is_cuda else dst.device
    if device.type != "cuda":
        dst.copy_(src)
        return
    stream = _side_stream(device)
    if ready is not None:
        stream.wait_event(ready)
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    stream.synchronize()


def to_cpu(data: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
    """The bytes on the CPU: `data` itself if already there, else a pinned copy."""
    if not data.is_cuda:
        return data
    out = host_buffer(data.numel())
    copy_bytes(out, data, ready)
    return out


def fresh_on(
    data: torch.Tensor, device: torch.device, consumer: torch.cuda.Stream | None, *, borrowed: bool
) -> torch.Tensor:
    """CPU bytes moved to `device` as a buffer the caller owns (`borrowed`: `data` is the tier's own)."""
    if device.type == "cuda":
        out = torch.empty(data.numel(), dtype=torch.uint8, device=device)
        copy_bytes(out, data)
        if consumer is not None:
            out.record_stream(consumer)
        return out
    return data.clone() if borrowed else data
