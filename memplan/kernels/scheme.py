"""A plan's `TensorBits` resolved for a weight shape: the integer scheme quantize, pack and kernels follow.

Every integer format stores an unsigned *code* `u` in `[0, 2**bits)` per element and dequantizes it as

    w = (u - zero) * scale          zero = 2**(bits - 1) when symmetric (not stored), else a stored float

with one `scale` (and one `zero`) per group of `group_size` consecutive elements of a row (a row is all
dims but the last; `per-channel` is one group per row). Which TensorBits are supported, and why the others
are not, is decided here once, so the planner can ask before it picks a format (no triton needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memplan.errors import InvalidInput
from memplan.plans.decisions import FORMAT_BITS, TensorBits

INT_FORMATS = ("int8", "int4", "int3", "int2")
"""The formats with codes and scales; fp32/fp16/bf16 are plain casts and need no kernel."""
SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
"""Scale (and zero point) dtypes the kernels read."""


class UnsupportedBits(InvalidInput):
    """A TensorBits (or the tensor it names) that the kernels cannot store or multiply."""


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """A supported TensorBits on a `rows x cols` view of its tensor: `cols // group_size` groups a row."""

    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype
    rows: int
    cols: int

    @property
    def code_max(self) -> int:
        """The largest code, `2**bits - 1`."""
        return (1 << self.bits) - 1

    @property
    def half(self) -> int:
        """The implicit zero point of a symmetric scheme, `2**(bits - 1)`."""
        return 1 << (self.bits - 1)

    @property
    def groups(self) -> int:
        """Groups (scales) per row."""
        return self.cols // self.group_size


def scheme_of(spec: TensorBits, shape: tuple[int, ...]) -> QuantScheme:
    """Resolve `spec` for a tensor of `shape`, or raise UnsupportedBits saying what to change."""
    if spec.format not in INT_FORMATS:
        raise UnsupportedBits(
            f"tensor {spec.value_id}: format {spec.format!r} has no quantized kernel ({spec.format} is a "
            f"plain cast: use tensor.to(torch.{_torch_name(spec.format)})); kernels take "
            f"{', '.join(INT_FORMATS)}"
        )
    if spec.scale_dtype not in SCALE_DTYPES:
        raise UnsupportedBits(
            f"tensor {spec.value_id}: scale_dtype {spec.scale_dtype!r} is not supported; use one of "
            f"{', '.join(SCALE_DTYPES)} (bf16 arithmetic is wrong in the Triton CPU interpreter)"
        )
    if len(shape) == 0 or shape[-1] == 0 or any(d <= 0 for d in shape):
        raise UnsupportedBits(f"tensor {spec.value_id}: cannot quantize a tensor of shape {tuple(shape)}")
    cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    group = _group_size(spec, cols)
    return QuantScheme(
        FORMAT_BITS[spec.format], group, spec.symmetric, SCALE_DTYPES[spec.scale_dtype], rows, cols
    )


def _group_size(spec: TensorBits, cols: int) -> int:
    """Elements per scale along the last dim: `cols` for per-channel, `group_size` (dividing it) per-group."""
    where = f"tensor {spec.value_id} ({spec.format}, {spec.scale_layout})"
    if spec.scale_layout not in ("per-channel", "per-group"):
        raise UnsupportedBits(
            f"{where}: scale_layout {spec.scale_layout!r} is not supported; use 'per-channel' (one scale per "
            f"row) or 'per-group' with a group_size"
        )
    if spec.scale_layout == "per-channel" or spec.group_size is None:
        if spec.group_size not in (None, cols):
            raise UnsupportedBits(
                f"{where}: group_size {spec.group_size} contradicts per-channel scales on rows of {cols}; "
                f"use scale_layout 'per-group' or group_size None"
            )
        return cols
    if spec.group_size < 1 or cols % spec.group_size:
        raise UnsupportedBits(
            f"{where}: group_size {spec.group_size} must be >= 1 and divide the last dim ({cols}); "
            f"divisors near it: {_near_divisors(cols, spec.group_size)}"
        )
    return spec.group_size


def _near_divisors(n: int, target: int) -> list[int]:
    """Up to three divisors of n closest to target (for an error message)."""
    divisors = [d for d in range(1, min(n, 4096) + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: abs(d - target))[:3])


def _torch_name(fmt: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(fmt, fmt)
