"""Specialise the dequantize-matmul kernel from the plan: a `TensorBits` to the kernel's `tl.constexpr`s.

`specialise(spec, shape, rows)` resolves the spec (`memplan.kernels.scheme`, which raises UnsupportedBits
for what no kernel stores) and picks block sizes: on a GPU 16-64 rows by 64 x 64 tiles; under the CPU
interpreter, where each program costs about 0.5 ms whatever its size, the fewest, largest blocks (up to
128 x 128). No triton import: the planner can ask whether a spec is supported without one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from memplan.kernels.packing import unit_of
from memplan.kernels.scheme import UnsupportedBits, scheme_of
from memplan.plans.decisions import TensorBits

INPUT_DTYPES = (torch.float32, torch.float16)
"""Activations the kernel multiplies under the interpreter (its bf16 arithmetic is wrong)."""
GPU_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Activations the kernel multiplies on a GPU."""


@dataclass(frozen=True, slots=True)
class DequantMatmulConfig:
    """The kernel's compile-time parameters: one compiled kernel per distinct config."""

    BITS: int
    VALUES: int
    """Codes per packed unit (`memplan.kernels.packing.UNITS`)."""
    NBYTES: int
    """Bytes per packed unit."""
    GROUP_SIZE: int
    SYMMETRIC: bool
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int

    def constexprs(self) -> dict[str, int | bool]:
        """The keyword arguments the kernel launch takes."""
        return asdict(self)


def specialise(
    spec: TensorBits,
    shape: tuple[int, int],
    rows: int,
    interpreted: bool,
    blocks: tuple[int, int, int] | None = None,
) -> DequantMatmulConfig:
    """The config for `x [rows, K] @ dequant(W [N, K]).T` with W stored as `spec` says; `blocks` (M, N, K)
    overrides the chosen block sizes. Raises UnsupportedBits for a spec or shape the kernel cannot run."""
    if len(shape) != 2:
        raise UnsupportedBits(
            f"tensor {spec.value_id}: the dequantize-matmul kernel takes a 2-D weight [N, K], got shape "
            f"{tuple(shape)}; reshape it to [out_features, in_features]"
        )
    scheme = scheme_of(spec, shape)
    values, nbytes = unit_of(scheme.bits)
    n, k = shape
    block_m, block_n, block_k = blocks or _blocks(rows, n, k, interpreted)
    for name, b in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if b < 16 or b & (b - 1):
            raise UnsupportedBits(f"{name}={b}: Triton's dot needs power-of-two blocks of at least 16")
    return DequantMatmulConfig(
        scheme.bits, values, nbytes, scheme.group_size, scheme.symmetric, block_m, block_n, block_k
    )


def check_input(x: torch.Tensor, k: int, interpreted: bool) -> None:
    """UnsupportedBits unless `x` is a 2-D activation with `k` columns in a dtype the kernel takes here."""
    if x.dim() != 2 or x.shape[1] != k:
        raise UnsupportedBits(f"x must be [M, {k}] (the weight's in_features), got {tuple(x.shape)}")
    dtypes = INPUT_DTYPES if interpreted else GPU_INPUT_DTYPES
    if x.dtype not in dtypes:
        where = "under the Triton interpreter" if interpreted else "on a GPU"
        raise UnsupportedBits(
            f"x is {x.dtype}; {where} the dequantize-matmul kernel takes {', '.join(map(str, dtypes))} "
            f"(cast it, e.g. x.float())"
        )


def _blocks(rows: int, n: int, k: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): few large blocks when interpreted, GPU-sized tiles otherwise."""
    if interpreted:
        return _fit(rows, 16, 64), _fit(n, 16, 128), _fit(k, 16, 128)
    return _fit(rows, 16, 64), 64, 64


def _fit(size: int, lo: int, hi: int) -> int:
    """The power of two covering `size`, within [lo, hi]."""
    p = lo
    while p < size and p < hi:
        p *= 2
    return p
