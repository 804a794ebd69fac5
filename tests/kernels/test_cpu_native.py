"""PyTorch's CPU int8/int4 kernels, fed from QuantizedWeight, against the reference."""

from __future__ import annotations

import pytest
import torch

from memplan.kernels.cpu_native import native_kind, native_linear, prepare
from memplan.kernels.linear import TOLERANCES, linear_error
from memplan.kernels.quantize import quantize
from memplan.kernels.scheme import UnsupportedBits
from memplan.plans.decisions import TensorBits

NATIVE = [
    TensorBits(0, "int8", None, True, "per-channel"),
    TensorBits(0, "int4", 32, True, "per-group"),
    TensorBits(0, "int4", 64, False, "per-group"),
    TensorBits(0, "int4", 256, False, "per-group", "float32"),
]


@pytest.mark.parametrize("spec", NATIVE, ids=lambda s: f"{s.format}-g{s.group_size}-sym{int(s.symmetric)}")
def test_matches_reference(spec: TensorBits) -> None:
    gen = torch.Generator().manual_seed(0)
    q = quantize(torch.randn(48, 512, generator=gen), spec)
    w = prepare(q)
    cases = ((torch.float32, "native"), (torch.float16, "native"), (torch.bfloat16, "native-bf16"))
    for dtype, path in cases:
        x = torch.randn(5, 512, generator=gen).to(dtype)
        y = native_linear(x, w)
        assert y.dtype == dtype and y.shape == (5, 48)
        tol = TOLERANCES[(path, torch.float32 if dtype == torch.bfloat16 else dtype)]
        assert linear_error(y, x, q) <= tol, dtype


def test_which_kernel_applies() -> None:
    def kind(spec: TensorBits, shape: tuple[int, int]) -> str | None:
        return native_kind(quantize(torch.randn(*shape), spec).scheme)

    assert kind(NATIVE[0], (16, 64)) == "int8pack"
    assert kind(TensorBits(0, "int8", None, False, "per-channel"), (16, 64)) is None  # asymmetric
    assert kind(TensorBits(0, "int8", 32, True, "per-group"), (16, 64)) is None
    assert kind(NATIVE[1], (32, 64)) == "int4pack"
    assert kind(NATIVE[1], (24, 64)) is None  # out_features not a multiple of 16
    assert kind(TensorBits(0, "int4", 16, True, "per-group"), (16, 64)) is None
    assert kind(TensorBits(0, "int3", 32, True, "per-group"), (16, 64)) is None


def test_prepare_refuses_what_no_kernel_takes() -> None:
    q = quantize(torch.randn(16, 64), TensorBits(5, "int2", 32, True, "per-group"))
    with pytest.raises(UnsupportedBits, match="tensor 5: no PyTorch CPU kernel for int2 .* the reference"):
        prepare(q)
