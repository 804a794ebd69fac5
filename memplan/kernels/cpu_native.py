"""PyTorch's own CPU kernels for quantized linears, fed from a `QuantizedWeight` (torch 2.13 signatures,
read from `torch/_meta_registrations.py` and checked against `reference_linear` by the tests):

    torch._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])  ->  x @ (w * scales[:, None]).T
        int8, symmetric, per-channel; scales in x's dtype (fp32, fp16 or bf16).
    torch._convert_weight_to_int4pack_for_cpu(u int32 [N, K] in [0, 16), inner_k_tiles) -> uint8 [N, K/2]
    torch._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scale_and_zero [K/G, N, 2])
        ->  x @ ((u - 8) * scale + zero).T      group_size 32, 64, 128 or 256; N a multiple of 16;
        scale_and_zero in x's dtype.

Our int4 dequantizes as `(u - z) * s = (u - 8) * s + (8 - z) * s`, so the kernel's zero is `(8 - z) * s`
(0 when symmetric, z = 8), computed in fp32. The converted weights are built once, by `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from memplan.kernels.quantize import QuantizedWeight
from memplan.kernels.scheme import QuantScheme, UnsupportedBits

NativeKind = Literal["int8pack", "int4pack"]
INT4_GROUPS = (32, 64, 128, 256)
"""Group sizes torch's CPU int4 kernel takes."""


@dataclass(frozen=True, slots=True)
class NativeWeight:
    """A weight converted for one of PyTorch's CPU kernels: `weight` in its layout, `scales` its scale
    operand in fp32 (cast to x's dtype at each call), `group_size` (int4 only)."""

    kind: NativeKind
    weight: torch.Tensor
    scales: torch.Tensor
    group_size: int
    out_features: int


def native_kind(scheme: QuantScheme) -> NativeKind | None:
    """Which of PyTorch's CPU kernels can multiply a 2-D weight of this scheme, if any."""
    if scheme.bits == 8 and scheme.symmetric and scheme.group_size == scheme.cols:
        return "int8pack"
    if scheme.bits == 4 and scheme.group_size in INT4_GROUPS and scheme.rows % 16 == 0:
        return "int4pack"
    return None


def prepare(q: QuantizedWeight) -> NativeWeight:
    """Convert `q` (a 2-D weight on the CPU) for PyTorch's kernel; UnsupportedBits when none applies."""
    scheme = q.scheme
    kind = native_kind(scheme) if len(q.shape) == 2 else None
    if kind is None:
        raise UnsupportedBits(
            f"tensor {q.spec.value_id}: no PyTorch CPU kernel for {q.spec.format} with group "
            f"{scheme.group_size} on a {tuple(q.shape)} weight (int8 needs symmetric per-channel; int4 needs "
            f"group 32/64/128/256 and out_features divisible by 16); use the reference path"
        )
    codes = q.codes()
    if kind == "int8pack":
        weight = (codes.to(torch.int16) - scheme.half).to(torch.int8)
        return NativeWeight(kind, weight, q.scales.float().reshape(-1), scheme.cols, scheme.rows)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    scales = q.scales.float()  # [N, groups]
    zeros = (8.0 - q.zero_points()) * scales
    scale_and_zero = torch.stack([scales.T, zeros.T], dim=-1).contiguous()  # [groups, N, 2]
    return NativeWeight(kind, packed, scale_and_zero, scheme.group_size, scheme.rows)


def native_linear(x: torch.Tensor, w: NativeWeight) -> torch.Tensor:
    """`x @ W.T` by PyTorch's CPU kernel, in x's dtype (fp32, fp16 or bf16)."""
    scales = w.scales.to(x.dtype)
    if w.kind == "int8pack":
        return torch._weight_int8pack_mm(x.contiguous(), w.weight, scales)
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), w.weight, w.group_size, scales)
