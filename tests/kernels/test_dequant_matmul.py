"""The Triton dequantize-matmul kernel (under the interpreter on a CPU) against the torch reference, within
`memplan.kernels.linear.TOLERANCES`."""

from __future__ import annotations

import pytest
import torch

from memplan.kernels.dequant_matmul import dequant_matmul
from memplan.kernels.linear import TOLERANCES, linear_error
from memplan.kernels.quantize import quantize
from memplan.kernels.scheme import UnsupportedBits
from memplan.plans.decisions import TensorBits

CASES = [  # (spec, M, N, K): odd M and N, K not a multiple of the K block, several groups per block
    (TensorBits(0, "int8", None, True, "per-channel"), 16, 256, 256),
    (TensorBits(0, "int8", 64, False, "per-group"), 5, 200, 192),
    (TensorBits(0, "int4", 128, True, "per-group"), 1, 256, 256),
    (TensorBits(0, "int4", 32, False, "per-group"), 16, 200, 192),
    (TensorBits(0, "int3", 64, True, "per-group"), 3, 256, 192),
    (TensorBits(0, "int3", 32, False, "per-group", "float32"), 16, 96, 256),
    (TensorBits(0, "int2", 32, True, "per-group"), 7, 128, 160),
    (TensorBits(0, "int2", 16, False, "per-group"), 16, 200, 256),
]


@pytest.mark.parametrize(("spec", "m", "n", "k"), CASES, ids=lambda c: getattr(c, "format", None))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(spec: TensorBits, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m * n + k)
    q = quantize(torch.randn(n, k, generator=gen), spec)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = dequant_matmul(x, q)
    assert y.shape == (m, n) and y.dtype == dtype
    assert linear_error(y, x, q) <= TOLERANCES[("triton", dtype)]


def test_small_blocks_and_strided_x() -> None:
    spec = TensorBits(0, "int3", 16, False, "per-group")
    gen = torch.Generator().manual_seed(3)
    q = quantize(torch.randn(40, 80, generator=gen), spec)
    x = torch.randn(80, 20, generator=gen).T  # [20, 80], not contiguous
    y = dequant_matmul(x, q, blocks=(16, 16, 16))  # 2 x 3 programs, 5 K steps, a partial last step
    assert linear_error(y, x, q) <= TOLERANCES[("triton", torch.float32)]


def test_unsupported_input() -> None:
    q = quantize(torch.randn(16, 32), TensorBits(0, "int4", 16, True, "per-group"))
    with pytest.raises(UnsupportedBits, match="cast it"):
        dequant_matmul(torch.zeros(2, 32, dtype=torch.bfloat16), q)
    q3 = quantize(torch.randn(2, 8, 32), TensorBits(0, "int4", 16, True, "per-group"))
    with pytest.raises(UnsupportedBits, match="2-D weight"):
        dequant_matmul(torch.zeros(2, 32), q3)
