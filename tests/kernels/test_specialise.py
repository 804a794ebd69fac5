"""The kernel's constexprs come from the plan's TensorBits; unsupported specs and inputs say what to do."""

from __future__ import annotations

import pytest
import torch

from memplan.kernels.scheme import UnsupportedBits
from memplan.kernels.specialise import DequantMatmulConfig, check_input, specialise
from memplan.plans.decisions import TensorBits


def test_constexprs_follow_the_spec() -> None:
    cfg = specialise(TensorBits(0, "int3", 64, False, "per-group"), (200, 192), 5, interpreted=True)
    assert cfg == DequantMatmulConfig(BITS=3, VALUES=8, NBYTES=3, GROUP_SIZE=64, SYMMETRIC=False,
                                      BLOCK_M=16, BLOCK_N=128, BLOCK_K=128)
    assert cfg.constexprs()["SYMMETRIC"] is False
    ch = specialise(TensorBits(0, "int8", None, True, "per-channel"), (4096, 4096), 64, interpreted=False)
    assert (ch.BITS, ch.VALUES, ch.NBYTES, ch.GROUP_SIZE, ch.SYMMETRIC) == (8, 1, 1, 4096, True)
    assert (ch.BLOCK_M, ch.BLOCK_N, ch.BLOCK_K) == (64, 64, 64)
    small = specialise(TensorBits(0, "int2", 16, True, "per-group"), (16, 32), 1, interpreted=True)
    assert (small.VALUES, small.BLOCK_M, small.BLOCK_N, small.BLOCK_K) == (4, 16, 16, 32)
    fixed = specialise(TensorBits(0, "int4", 16, True, "per-group"), (16, 32), 1, True, blocks=(16, 32, 64))
    assert (fixed.BLOCK_M, fixed.BLOCK_N, fixed.BLOCK_K) == (16, 32, 64)


def test_unsupported() -> None:
    spec = TensorBits(2, "int4", 32, True, "per-group")
    with pytest.raises(UnsupportedBits, match=r"2-D weight \[N, K\], got shape \(2, 3, 32\)"):
        specialise(spec, (2, 3, 32), 1, True)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedBits, match="BLOCK_N=24: Triton's dot needs power-of-two blocks"):
        specialise(spec, (64, 64), 1, True, blocks=(16, 24, 32))
    with pytest.raises(UnsupportedBits, match="plain cast"):
        specialise(TensorBits(2, "fp32"), (64, 64), 1, True)
    with pytest.raises(UnsupportedBits, match=r"x must be \[M, 64\]"):
        check_input(torch.zeros(2, 32), 64, interpreted=True)
    with pytest.raises(UnsupportedBits, match=r"torch.bfloat16; under the Triton interpreter .* \(cast it"):
        check_input(torch.zeros(2, 64, dtype=torch.bfloat16), 64, interpreted=True)
    check_input(torch.zeros(2, 64, dtype=torch.bfloat16), 64, interpreted=False)
