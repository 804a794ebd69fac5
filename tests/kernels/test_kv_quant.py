"""KV quantization: the byte layout kv_token_bytes prices, the error bound, the Triton kernels against the
torch reference (under TRITON_INTERPRET=1 without a GPU), and the refusals."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.kernels import kv_quant as kq
from memplan.kernels.packing import unpack
from memplan.plans.decisions import kv_token_bytes
from tests.kernels.test_triton_env import run

FORMATS = [(8, 16), (8, 64), (4, 16), (4, 32), (2, 16), (2, 64)]


def vectors(seed: int = 0, shape: tuple[int, ...] = (2, 3, 41, 64)) -> torch.Tensor:
    """K/V-like data: gaussian rows with a per-channel offset and a few outliers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + torch.randn(shape[-1], generator=gen) * 4
    x.view(-1)[::97] *= 30
    return x


@pytest.mark.parametrize(("bits", "group"), FORMATS)
def test_layout_is_what_kv_token_bytes_prices(bits: int, group: int) -> None:
    x = vectors()
    q = kq.quantize_reference(x, bits, group)
    assert q.codes.shape == (*x.shape[:-1], 64 * bits // 8) and q.codes.dtype == torch.uint8
    assert q.scales.shape == q.zeros.shape == (*x.shape[:-1], 64 // group)
    assert q.scales.dtype == q.zeros.dtype == torch.float16
    tokens = x.numel() // 64
    assert (
        q.nbytes()
        == tokens * kq.token_bytes(64, bits, group)
        == tokens * kv_token_bytes(64, bits, 2, group) // 2
    )


def test_codes_pack_little_endian_per_token() -> None:
    """4 bits: code 2i in the low nibble of byte i; 2 bits: code 4i in the low two bits."""
    x = torch.arange(16, dtype=torch.float32).view(1, 16)
    q4 = kq.quantize_reference(x, 4, 16)  # zero just below 0, scale 1: codes 0..15
    assert unpack(q4.codes, 4, 16).tolist() == [list(range(16))]
    assert q4.codes[0, 0].item() == 0 | 1 << 4 and q4.codes[0, 7].item() == 14 | 15 << 4
    q2 = kq.quantize_reference(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2, 4)
    assert q2.codes.tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6]]


@pytest.mark.parametrize(("bits", "group"), FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_within_the_bound(bits: int, group: int, dtype: torch.dtype) -> None:
    x = vectors(1).to(dtype)
    q = kq.quantize_reference(x, bits, group)
    err = (x.float() - kq.dequantize_reference(q)).abs()
    bound = kq.error_bound(q)
    assert bool((err <= bound).all()), float((err - bound).max())
    scale = q.scales.float().repeat_interleave(group, -1)
    assert float((err / scale).max()) > 0.45  # the bound is tight: some element sits near half a step
    out = kq.dequantize_reference(q, dtype)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_hard_groups_stay_within_the_bound(bits: int) -> None:
    """A constant group (exact), a far offset with a tiny range (the zero point's fp16 rounding), values
    below fp16's normal range, a group of one outlier, negative-only values."""
    rows = torch.tensor(
        [
            [3.0] * 16,
            [1000.0 + i * 1e-3 for i in range(16)],
            [i * 1e-6 for i in range(16)],
            [0.0] * 15 + [5e3],
            [-7.0 - i for i in range(16)],
            [0.0] * 16,
        ]
    )
    q = kq.quantize_reference(rows, bits, 16)
    deq = kq.dequantize_reference(q)
    assert bool(((rows - deq).abs() <= kq.error_bound(q)).all())
    assert torch.equal(deq[5], rows[5])
    assert bool((q.zeros.float().squeeze(-1) <= rows.amin(-1)).all())


@pytest.mark.parametrize(("bits", "group"), FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_the_reference(bits: int, group: int, dtype: torch.dtype) -> None:
    """The same codes, scales and zeros; dequantized values within one fp32 rounding. Few large programs
    (each costs ~0.5 ms interpreted); 123 rows over blocks of 64 check the last block's row mask. bf16 is not
    run: the interpreter's bf16 arithmetic is wrong."""
    from memplan.kernels.kv_quant_triton import dequantize_triton, quantize_triton

    x = vectors(2, (3, 41, 64)).to(dtype)
    ref = kq.quantize_reference(x, bits, group)
    got = quantize_triton(x, bits, group, block_rows=64)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales, ref.scales) and torch.equal(got.zeros, ref.zeros)
    for out in (torch.float32, dtype):
        want = kq.dequantize_reference(ref, out)
        torch.testing.assert_close(dequantize_triton(ref, out, block_rows=64), want, rtol=2**-22, atol=0)


def test_backends_agree_and_auto_is_the_reference_on_cpu() -> None:
    x = vectors(3, (5, 32))
    auto = kq.quantize_kv(x, 4, 16)
    tri = kq.quantize_kv(x, 4, 16, backend="triton")
    assert torch.equal(auto.codes, tri.codes)
    torch.testing.assert_close(
        kq.dequantize_kv(tri, backend="triton"), kq.dequantize_kv(auto), rtol=2**-22, atol=0
    )
    if not torch.cuda.is_available():
        assert not kq._use_triton("auto", x, 32, 4, 16)


def test_empty_input() -> None:
    q = kq.quantize_kv(torch.empty(2, 0, 32), 2, 16)
    assert q.codes.shape == (2, 0, 8) and kq.dequantize_kv(q).shape == (2, 0, 32)


@pytest.mark.parametrize(
    ("head_dim", "bits", "group", "message"),
    [
        (64, 3, 16, "3-bit KV is not a format"),
        (64, 16, 16, "16-bit KV is not a format"),
        (48, 4, 32, "group size must divide the head dim"),
        (6, 2, 3, "do not pack a head of 6"),
        (64, 4, 0, "group size must divide"),
    ],
)
def test_bad_formats_are_refused(head_dim: int, bits: int, group: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        kq.quantize_kv(torch.randn(2, head_dim), bits, group)


def test_bad_values_are_refused() -> None:
    with pytest.raises(InvalidInput, match="cannot quantize a torch.int64"):
        kq.quantize_kv(torch.ones(2, 16, dtype=torch.long), 8, 16)
    with pytest.raises(InvalidInput, match="does not fit the fp16 scale"):
        kq.quantize_kv(torch.tensor([[-1e5] * 16]), 8, 16)
    with pytest.raises(InvalidInput, match="does not fit the fp16 scale"):
        kq.quantize_kv(torch.tensor([[float("nan")] * 16]), 8, 16)


def test_triton_refuses_layouts_it_does_not_take() -> None:
    """Groups of 12 (not a power of two) and of 2 two-bit codes (half a byte) are the reference's only."""
    with pytest.raises(InvalidInput, match="power-of-two groups"):
        kq.quantize_kv(torch.randn(2, 48), 8, 12, backend="triton")
    with pytest.raises(InvalidInput, match="power-of-two groups"):
        kq.quantize_kv(torch.randn(2, 8), 2, 2, backend="triton")
    x = torch.randn(2, 48)
    q = kq.quantize_kv(x, 8, 12)
    assert q.codes.shape == (2, 48) and bool(((x - kq.dequantize_kv(q)).abs() <= kq.error_bound(q)).all())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter set-up is for machines without a GPU")
def test_kernels_run_when_triton_was_imported_first() -> None:
    """The group reductions pass tl.min / tl.max's combine functions, which the interpreter recognises and
    never calls, so the kernels work even when triton's library functions were not decorated for it."""
    out = run(
        "import triton, torch\n"
        "from memplan.kernels.kv_quant import quantize_reference\n"
        "from memplan.kernels.kv_quant_triton import quantize_triton, dequantize_triton\n"
        "x = torch.randn(9, 32)\n"
        "q = quantize_triton(x, 4, 16)\n"
        "assert torch.equal(q.codes, quantize_reference(x, 4, 16).codes)\n"
        "print(dequantize_triton(q).shape)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([9, 32])"
