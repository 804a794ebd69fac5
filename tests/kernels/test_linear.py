"""The quantized linear's dispatch: which path it takes where; every path agrees with the reference."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.kernels.linear import (
    TOLERANCES,
    PreparedLinear,
    choose_path,
    linear,
    linear_error,
    prepare_linear,
    reference_linear,
)
from memplan.kernels.quantize import dequantize, quantize
from memplan.plans.decisions import DEQUANT_BLOCK_BYTES, TensorBits

CPU = torch.device("cpu")
INT8 = TensorBits(0, "int8", None, True, "per-channel")
INT4 = TensorBits(0, "int4", 32, True, "per-group")
INT3 = TensorBits(0, "int3", 32, False, "per-group")


def weight(spec: TensorBits, n: int = 32, k: int = 64):  # noqa: ANN201
    return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)), spec)


def test_reference_is_the_definition() -> None:
    q = weight(INT3)
    x = torch.randn(3, 64, dtype=torch.float16)
    assert torch.equal(reference_linear(x, q), (x.float() @ dequantize(q).T).half())


def test_paths_chosen() -> None:
    q8, q4, q3 = weight(INT8), weight(INT4), weight(INT3)
    assert choose_path(q8, CPU, 16, bf16_activations=True) == "native-bf16"
    assert choose_path(q4, CPU, 16, bf16_activations=True) == "native-bf16"
    assert choose_path(q8, CPU, 16, bf16_activations=False) == "native"
    assert choose_path(q4, CPU, 1, bf16_activations=False) == "native"
    assert choose_path(q4, CPU, 16, bf16_activations=False) == "reference"  # measured slower at 16 rows
    assert choose_path(q3, CPU, 1, bf16_activations=True) == "reference"
    assert choose_path(q3, torch.device("cuda"), 1, bf16_activations=True) == "triton"


@pytest.mark.parametrize("spec", [INT8, INT4, INT3], ids=lambda s: s.format)
def test_every_path_agrees_with_the_reference(spec: TensorBits) -> None:
    q = weight(spec)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))  # leading dims are kept
    paths = ["reference", "triton"] + (["native", "native-bf16"] if spec is not INT3 else [])
    for path in paths:
        y = linear(x, prepare_linear(q, path))  # type: ignore[arg-type]
        assert y.shape == (2, 3, 32) and y.dtype == x.dtype
        tol = TOLERANCES.get((path, torch.float32), 0.0)  # type: ignore[call-overload]
        assert linear_error(y.reshape(6, 32), x.reshape(6, 64), q) <= tol, path
    precise = linear(x, prepare_linear(q, bf16_activations=False))
    assert linear_error(precise.reshape(6, 32), x.reshape(6, 64), q) <= 1e-5
    assert torch.allclose(linear(x, q), linear(x, prepare_linear(q)))  # a bare weight is prepared per call


def test_bad_paths() -> None:
    q = weight(INT4)
    with pytest.raises(InvalidInput, match="unknown linear path 'fast'"):
        prepare_linear(q, "fast")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"prepare_linear\(q, 'native'\)"):
        linear(torch.zeros(1, 64), PreparedLinear(q, None, "native"))
    assert prepare_linear(weight(INT3)).native is None


def test_reference_dequantizes_a_large_weight_by_row_blocks() -> None:
    from memplan.kernels import linear as linear_module

    spec = TensorBits(0, "int4", 128, False, "per-group")
    q = quantize(torch.randn(1536, 1024, generator=torch.Generator().manual_seed(1)), spec)
    x = torch.randn(3, 1024)
    assert 4 * 1536 * 1024 > DEQUANT_BLOCK_BYTES, "the weight is cut into blocks"
    whole = x @ dequantize(q).T
    got = linear_module.reference_linear(x, q)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5 * float(whole.abs().max()))


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2", "fp16"])
@pytest.mark.parametrize("shape", [(256, 64), (1536, 1024)])
def test_reference_transient_is_within_what_the_plan_prices(fmt: str, shape: tuple[int, int]) -> None:
    from memplan.runtime.quantized import stored_module
    from memplan.runtime.tracker import LiveStorageTracker

    spec = TensorBits(0, fmt, None, fmt == "int8", "per-channel") if fmt in ("int8", "fp16") else TensorBits(
        0, fmt, 32, False, "per-group"
    )
    module = stored_module(torch.randn(*shape), spec, None, native=False)
    x = torch.randn(2, shape[1])
    tracker = LiveStorageTracker(record_timeline=False)
    with torch.no_grad(), tracker:
        y = module(x)
    output = y.numel() * 4
    assert tracker.result.peak_bytes - output <= spec.dequant_workspace_bytes(shape)


def test_an_int8_weight_kept_in_the_kernel_layout_runs_both_paths() -> None:
    from memplan.kernels.linear import NATIVE_MAX_ROWS, PreparedLinear, linear
    from memplan.kernels.quantize import QuantizedWeight

    q = quantize(torch.randn(64, 96), TensorBits(0, "int8", None, True, "per-channel"))
    prepared = prepare_linear(q)
    assert prepared.native is not None
    empty = torch.empty(0, dtype=torch.uint8)
    codes_dropped = QuantizedWeight(empty, empty.to(q.scales.dtype), None, q.shape, q.spec)
    bare = PreparedLinear(codes_dropped, prepared.native)
    for rows in (1, NATIVE_MAX_ROWS["int8pack"] + 1):
        x = torch.randn(rows, 96)
        assert linear_error(linear(x, bare), x, q) <= 1e-5
