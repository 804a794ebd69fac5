"""Quantize/dequantize (the reference semantics): the stated error bound per format, exact cases, errors."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.kernels.quantize import dequantize, error_bound, quantize
from memplan.plans.decisions import TensorBits

SPECS = [
    TensorBits(0, "int8", None, True, "per-channel"),
    TensorBits(0, "int8", 32, False, "per-group"),
    TensorBits(0, "int4", 32, True, "per-group"),
    TensorBits(0, "int4", 16, False, "per-group"),
    TensorBits(0, "int3", 32, True, "per-group"),
    TensorBits(0, "int3", 8, False, "per-group", "float32"),
    TensorBits(0, "int2", 16, True, "per-group"),
    TensorBits(0, "int2", None, False, "per-channel"),
]


def hard_weights() -> torch.Tensor:
    """Rows that stress the bound: normal, all zero, constant, one-signed, tiny, large, a lone outlier."""
    gen = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(64, generator=gen),
        torch.zeros(64),
        torch.full((64,), 0.3),
        torch.rand(64, generator=gen) + 5.0,
        -torch.rand(64, generator=gen) * 1e-6,
        torch.randn(64, generator=gen) * 3e4,
        torch.cat([torch.randn(63, generator=gen) * 1e-3, torch.tensor([50.0])]),
        torch.randn(64, generator=gen) * 1e-9,
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-g{s.group_size}-sym{int(s.symmetric)}")
def test_error_bound_holds(spec: TensorBits) -> None:
    w = hard_weights()
    q = quantize(w, spec)
    err = (w - dequantize(q)).abs()
    assert bool((err <= error_bound(q)).all()), float((err - error_bound(q)).max())
    codes = q.codes()
    assert int(codes.max()) < 1 << q.scheme.bits
    if spec.symmetric:
        assert int(codes.min()) >= 1 and q.zeros is None  # restricted range
        assert bool((dequantize(q)[1] == 0).all())  # zero stays exact
    assert q.scales.dtype == q.scheme.scale_dtype and bool((q.scales > 0).all())


def test_bound_is_tight_enough_to_mean_something() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    q = quantize(w, TensorBits(0, "int4", 32, False, "per-group"))
    err = (w - dequantize(q)).abs()
    assert float((err / error_bound(q)).max()) > 0.9  # rounding does reach scale / 2


def test_shapes_dtypes_and_stored_bytes() -> None:
    w = torch.randn(3, 4, 64, dtype=torch.float16)
    spec = TensorBits(0, "int3", 32, False, "per-group")
    q = quantize(w, spec)
    assert q.shape == (3, 4, 64) and q.payload.shape == (12, 24) and q.scales.shape == (12, 2)
    assert dequantize(q).shape == (3, 4, 64) and dequantize(q, torch.float16).dtype == torch.float16
    assert q.stored_bytes() == spec.stored_bytes((3, 4, 64))  # no padding: the plan's count is exact
    sym = TensorBits(0, "int8", None, True, "per-channel")
    assert quantize(w, sym).stored_bytes() == sym.stored_bytes((3, 4, 64))


def test_asymmetric_uses_the_range() -> None:
    w = torch.linspace(0.0, 1.0, 16).reshape(1, 16)
    q = quantize(w, TensorBits(0, "int4", 16, False, "per-group", "float32"))
    assert q.codes().tolist() == [list(range(16))]
    assert torch.allclose(dequantize(q), w, atol=1e-6)


def test_bad_input() -> None:
    spec = TensorBits(7, "int4", 2, True, "per-group")
    with pytest.raises(InvalidInput, match="tensor 7: holds inf or NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), spec)
    with pytest.raises(InvalidInput, match="int64 tensor"):
        quantize(torch.ones(2, 2, dtype=torch.int64), spec)
    with pytest.raises(InvalidInput, match="overflows float16; use scale_dtype 'float32'"):
        quantize(torch.tensor([[1e6, 0.0]]), spec)
    q = quantize(torch.tensor([[1e6, 0.0]]), TensorBits(7, "int4", 2, True, "per-group", "float32"))
    assert float(dequantize(q)[0, 0]) == pytest.approx(1e6)
