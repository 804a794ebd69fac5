"""Quantize / dequantize K or V token vectors as a `KVBudget` with bits says, in the byte layout
`memplan.plans.decisions.kv_token_bytes` prices; the torch reference that defines the semantics.

A token's vector of `head_dim` elements (the last dim) is cut into groups of `group_size`; per group, in
fp32, with fp16 stored values:

    lo, hi = min(x), max(x) over the group
    zero   = fp16(lo) if fp16(lo) <= lo                         (a stored value at or below lo, so no
             else fp16(lo - |lo| * 2**-10 - 2**-24)              element falls below code 0)
    scale  = fp16(max((hi - zero) / (2**b - 1), 2**-14))       (at least fp16's smallest normal)
    u      = clamp(floor((x - zero) / scale + 1/2), 0, 2**b - 1)
    x'     = u * scale + zero                                  (dequantize, in fp32, then the output dtype)

Codes are packed per token as `memplan.kernels.packing` lays rows out (8 bits: one a byte; 4 bits: two a
byte, code 2i in the low nibble of byte i; 2 bits: four a byte), so a token holds `head_dim * b / 8` code
bytes plus `head_dim / group_size` fp16 scales and as many fp16 zero points: `kv_token_bytes / 2` for K
(or V) of one head. `floor(r + 1/2)` (not round-half-even) so that a Triton kernel gets the same codes.

Error bound (tests/kernels/test_kv_quant.py checks it): with x' dequantized in fp32, every element has

    |x - x'| <= scale * (1/2 + 2**-12) + |zero| * 2**-22

`zero <= lo` by construction (fp16 rounding moves a value by at most |v| * 2**-11 or 2**-25, which the
offset exceeds; a group whose minimum is an fp16 value keeps it as its zero point, so a constant group is
exact), so no element falls below code 0; the fp16 rounding of the scale shrinks it by at most a
factor 2**-11, so the top of the range lands within (2**b - 1) * 2**-11 <= 1/8 code above the last code
and the clamp costs less than scale / 2; the remaining terms cover fp32 arithmetic. Dequantizing to fp16
or bf16 adds that dtype's rounding of x' (half an ulp).

`quantize_kv` / `dequantize_kv` choose the implementation: the reference here, or the Triton kernels of
`kv_quant_triton` (which match it: the same codes, scales and zeros, dequantized values within one fp32
rounding). On a CPU the reference is the faster (the kernels run under Triton's interpreter), so it is
the default there; `backend="triton"` asks for the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from memplan.errors import InvalidInput
from memplan.kernels.packing import pack, unpack
from memplan.plans.decisions import KV_BITS, KV_SCALE_BYTES

Backend = Literal["auto", "torch", "triton"]

ZERO_REL = 2.0**-10
"""How far below the group minimum, relative to it, the zero point is rounded from (see the docstring)."""
ZERO_ABS = 2.0**-24
"""The absolute part of that offset (fp16's subnormal spacing)."""
MIN_SCALE = 2.0**-14
"""fp16's smallest normal number: scales are never smaller (an all-equal group stays exact)."""
FP16_MAX = 65504.0
SCALE_SLACK = 2.0**-12
"""The error bound's margin over scale / 2, in scales."""
ZERO_SLACK = 2.0**-22
"""The error bound's margin, relative to |zero| (fp32 arithmetic on values near the zero point)."""


@dataclass(frozen=True, slots=True)
class QuantizedKV:
    """Quantized token vectors: `codes` `[..., head_dim * bits / 8]` uint8 (packed per token), `scales` and
    `zeros` `[..., head_dim / group_size]` fp16; the leading dims are those of the quantized tensor."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros held."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def check_kv_format(head_dim: int, bits: int, group_size: int) -> None:
    """InvalidInput unless `bits` groups of `group_size` pack a head of `head_dim` (what kv_token_bytes
    accepts)."""
    if bits not in KV_BITS:
        raise InvalidInput(f"kv: {bits}-bit KV is not a format; KV tokens are stored at {list(KV_BITS)} bits")
    if group_size < 1 or head_dim % group_size or head_dim * bits % 8:
        raise InvalidInput(
            f"kv: {bits} bits in groups of {group_size} do not pack a head of {head_dim} elements: the group "
            f"size must divide the head dim ({[g for g in range(1, head_dim + 1) if head_dim % g == 0]} do)"
        )


def token_bytes(head_dim: int, bits: int, group_size: int) -> int:
    """Bytes one token's K (or V) vector takes in one head: codes, fp16 scales and zeros."""
    return head_dim * bits // 8 + head_dim // group_size * 2 * KV_SCALE_BYTES


def quantize_reference(x: torch.Tensor, bits: int, group_size: int) -> QuantizedKV:
    """Quantize `x` (`[..., head_dim]`, any float dtype) as the module docstring says: the torch reference."""
    head_dim = x.shape[-1]
    check_kv_format(head_dim, bits, group_size)
    if not x.dtype.is_floating_point:
        raise InvalidInput(f"kv: cannot quantize a {x.dtype} tensor; give a float one")
    lead = x.shape[:-1]
    g = x.detach().float().reshape(*lead, head_dim // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    nearest = lo.to(torch.float16)
    below = (lo - lo.abs() * ZERO_REL - ZERO_ABS).to(torch.float16)
    zeros = torch.where(nearest.float() <= lo, nearest, below)
    scales = ((hi - zeros.float()) / ((1 << bits) - 1)).clamp(min=MIN_SCALE).to(torch.float16)
    _check_finite(scales, zeros)
    r = (g - zeros.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)
    u = torch.floor(r + 0.5).clamp(0, (1 << bits) - 1).to(torch.uint8).reshape(*lead, head_dim)
    return QuantizedKV(pack(u, bits), scales, zeros, bits, group_size)


def _check_finite(scales: torch.Tensor, zeros: torch.Tensor) -> None:
    """InvalidInput when a group's scale or zero point does not fit fp16 (or the input held inf / NaN)."""
    if scales.numel() and not bool(torch.isfinite(scales).all() & torch.isfinite(zeros).all()):
        raise InvalidInput(
            f"kv: a K/V group's range does not fit the fp16 scale and zero point (beyond {FP16_MAX:g}, or "
            "inf / NaN): keep this layer's cache unquantized (bits None)"
        )


def dequantize_reference(q: QuantizedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The vectors `q` stands for, `u * scale + zero` in fp32, as `dtype`: the torch reference."""
    head_dim = q.head_dim
    lead = q.codes.shape[:-1]
    u = unpack(q.codes, q.bits, head_dim).float().reshape(*lead, head_dim // q.group_size, q.group_size)
    x = u * q.scales.float().unsqueeze(-1) + q.zeros.float().unsqueeze(-1)
    return x.reshape(*lead, head_dim).to(dtype)


def error_bound(q: QuantizedKV) -> torch.Tensor:
    """The largest |x - dequantize(q)| (fp32) the module docstring promises, per element."""
    bound = q.scales.float() * (0.5 + SCALE_SLACK) + q.zeros.float().abs() * ZERO_SLACK
    return bound.repeat_interleave(q.group_size, dim=-1)


def triton_layout(head_dim: int, bits: int, group_size: int) -> bool:
    """Whether the Triton kernels handle this format: a power-of-two group of whole bytes of codes."""
    return group_size & (group_size - 1) == 0 and group_size * bits % 8 == 0 and head_dim % group_size == 0


def _use_triton(backend: Backend, x: torch.Tensor, head_dim: int, bits: int, group_size: int) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_layout(head_dim, bits, group_size):
            raise InvalidInput(
                f"kv: the Triton kernels take power-of-two groups of whole code bytes; {group_size} elements "
                f"of {bits} bits is not one: use backend='torch'"
            )
        return True
    return x.device.type == "cuda" and triton_layout(head_dim, bits, group_size)


def quantize_kv(x: torch.Tensor, bits: int, group_size: int, backend: Backend = "auto") -> QuantizedKV:
    """Quantize K or V vectors (`[..., head_dim]`): the Triton kernel on a GPU (or when asked), else the
    reference; both give the same result."""
    if _use_triton(backend, x, x.shape[-1], bits, group_size):
        from memplan.kernels.kv_quant_triton import quantize_triton

        return quantize_triton(x, bits, group_size)
    return quantize_reference(x, bits, group_size)


def dequantize_kv(
    q: QuantizedKV, dtype: torch.dtype = torch.float32, backend: Backend = "auto"
) -> torch.Tensor:
    """Dequantize K or V vectors to `dtype`: the Triton kernel on a GPU (or when asked), else the
    reference."""
    if _use_triton(backend, q.codes, q.head_dim, q.bits, q.group_size):
        from memplan.kernels.kv_quant_triton import dequantize_triton

        return dequantize_triton(q, dtype)
    return dequantize_reference(q, dtype)
