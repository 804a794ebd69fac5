"""Quantize a weight as a plan's `TensorBits` says, and dequantize it: the torch reference that defines the
semantics every kernel must match (codes and the dequantize formula: `memplan.kernels.scheme`).

Per group of `group_size` elements along the last dim, computed in fp32, scales rounded to `scale_dtype`:

    symmetric    scale = max|w| / (2**(b-1) - 1)          u = clamp(round(w / scale) + 2**(b-1), 1, 2**b - 1)
    asymmetric   lo, hi = min(w, 0), max(w, 0)             (the range holds 0, as PyTorch's observers do)
                 scale = (hi - lo) / (2**b - 1)           zero = -lo / scale, rounded to scale_dtype
                                                          u = clamp(round(w / scale + zero), 0, 2**b - 1)

Scales are at least the scale dtype's smallest normal number (never 0 or subnormal, so an all-zero group
stays exact). Symmetric formats use the restricted range (int2 symmetric has the three levels -1, 0, 1).

Error bound (checked by tests/kernels/test_quantize.py): every element satisfies

    |w - dequantize(quantize(w))| <= scale * (1/2 + 2**-12)

with `scale` the stored scale of its group: rounding to the nearest code costs scale / 2; the fp16
rounding of the scale and zero point moves `w / scale` by at most 2 * (2**b - 1) * 2**-11 < 1/2 code, so
the clamp never bites on values inside the group's range, and the 2**-12 term covers fp32 arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memplan.errors import InvalidInput
from memplan.kernels.packing import pack, unpack
from memplan.kernels.scheme import QuantScheme, scheme_of
from memplan.plans.decisions import TensorBits

ROUNDING_SLACK = 2.0**-12
"""The error bound's margin over scale / 2, in scales (fp32 arithmetic)."""


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A quantized tensor: `payload` holds the packed codes of its `rows x cols` view (uint8, one packed
    row per row), `scales` and `zeros` one value per group (`rows x groups`, in the scale dtype; `zeros` is
    None when symmetric), `shape` the original shape, `spec` the plan record it follows."""

    payload: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, ...]
    spec: TensorBits

    @property
    def scheme(self) -> QuantScheme:
        """The spec resolved against the shape."""
        return scheme_of(self.spec, self.shape)

    def codes(self) -> torch.Tensor:
        """The unpacked codes, `rows x cols` uint8."""
        return unpack(self.payload, self.scheme.bits, self.shape[-1])

    def zero_points(self) -> torch.Tensor:
        """The zero point of every group as fp32 (`2**(bits-1)` everywhere when symmetric)."""
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full(self.scales.shape, float(self.scheme.half), device=self.scales.device)

    def stored_bytes(self) -> int:
        """Bytes of payload, scales and zeros actually held."""
        zeros = 0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size()
        return self.payload.numel() + self.scales.numel() * self.scales.element_size() + zeros


def quantize(weight: torch.Tensor, spec: TensorBits) -> QuantizedWeight:
    """Quantize `weight` (any float dtype, rows along the last dim) as `spec` says."""
    scheme = scheme_of(spec, tuple(weight.shape))
    if not weight.dtype.is_floating_point:
        raise InvalidInput(f"tensor {spec.value_id}: cannot quantize a {weight.dtype} tensor; give a float")
    w = weight.detach().float().reshape(scheme.rows, scheme.groups, scheme.group_size)
    if not bool(torch.isfinite(w).all()):
        raise InvalidInput(f"tensor {spec.value_id}: holds inf or NaN values; they cannot be quantized")
    if scheme.symmetric:
        scales = _stored_scale(w.abs().amax(-1) / (scheme.half - 1), scheme, spec)
        zero = torch.full_like(scales, float(scheme.half))
        zeros = None
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = _stored_scale((hi - lo) / scheme.code_max, scheme, spec)
        zeros = (-lo / scales.float()).to(scheme.scale_dtype)
        zero = zeros.float()
    low = 1 if scheme.symmetric else 0
    u = torch.round(w / scales.float().unsqueeze(-1) + zero.unsqueeze(-1)).clamp(low, scheme.code_max)
    codes = u.to(torch.uint8).reshape(scheme.rows, scheme.cols)
    return QuantizedWeight(pack(codes, scheme.bits), scales, zeros, tuple(weight.shape), spec)


def _stored_scale(scale: torch.Tensor, scheme: QuantScheme, spec: TensorBits) -> torch.Tensor:
    """Scales in the scale dtype, at least its smallest normal; InvalidInput when they overflow it."""
    finfo = torch.finfo(scheme.scale_dtype)
    if float(scale.max()) > finfo.max:
        raise InvalidInput(
            f"tensor {spec.value_id}: a scale of {float(scale.max()):.3g} overflows {spec.scale_dtype}; "
            f"use scale_dtype 'float32'"
        )
    return scale.clamp(min=finfo.tiny).to(scheme.scale_dtype)


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor `q` stands for, `(u - zero) * scale` computed in fp32, in its original shape."""
    s = q.scheme
    w = q.codes().view(s.rows, s.groups, s.group_size).float()
    w.sub_(q.zero_points().unsqueeze(-1)).mul_(q.scales.float().unsqueeze(-1))  # in place: one fp32 copy
    return w.reshape(q.shape).to(dtype)


def error_bound(q: QuantizedWeight) -> torch.Tensor:
    """The largest |w - dequantize(q)| the module docstring promises, per element, in the original shape."""
    s = q.scheme
    bound = q.scales.float() * (0.5 + ROUNDING_SLACK)
    return bound.repeat_interleave(s.group_size, dim=-1).reshape(q.shape)
