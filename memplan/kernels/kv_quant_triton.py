"""Triton kernels for KV quantization: quantize + pack, and unpack + dequantize, token vectors as
`memplan.kernels.kv_quant` defines them (its torch reference is the semantics; the kernels give the same
codes, scales and zeros, and dequantized values within one fp32 rounding).

Tokens are the rows of a `[rows, head_dim]` view. Each program handles `BLOCK_ROWS` rows, group by group
(`tl.static_range` over the head dim's groups); a group is read as `VALUES` strided tiles of
`[BLOCK_ROWS, GROUP / VALUES]` elements (tile j holds code j of every packed byte), so the byte a tile
column packs to is one `|` of shifted codes and no reshape is needed. Group minima and maxima are
`tl.reduce` with the combine functions of `tl.min` / `tl.max` (not those library `@jit` functions
themselves, which fail in an interpreted kernel when triton was imported first: see `triton_env`). Division
is `tl.div_rn`, IEEE round-to-nearest like torch's (plain `/` is approximate on a GPU). The formats are
power-of-two groups of whole code bytes (`kv_quant.triton_layout`). Under the interpreter a program costs
about 0.5 ms, so the default block is large (256 rows). Only the interpreter has run these (no GPU here).
"""

from __future__ import annotations

import torch

from memplan.errors import InvalidInput
from memplan.kernels.kv_quant import (
    MIN_SCALE,
    ZERO_ABS,
    ZERO_REL,
    QuantizedKV,
    _check_finite,
    check_kv_format,
    triton_layout,
)
from memplan.kernels.packing import UNITS
from memplan.kernels.triton_env import check_launchable, tl, triton

BLOCK_ROWS = 256


_MIN = tl.standard._elementwise_min
_MAX = tl.standard._elementwise_max
"""The combine functions `tl.min` / `tl.max` reduce with. Passed to `tl.reduce` directly: the interpreter
recognises them and reduces with numpy (a combine function of our own is called element by element, ~50x
slower), and it never calls them, so they work even when triton was imported before `triton_env`."""


@triton.jit
def _kv_quantize_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    zeros_ptr,
    rows,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    VALUES: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    ZERO_REL: tl.constexpr,
    ZERO_ABS: tl.constexpr,
    MIN_SCALE: tl.constexpr,
):
    rr = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BR]
    r = rr[:, None]  # [BR, 1]
    in_rows = r < rows
    unit = tl.arange(0, GROUP // VALUES)[None, :]  # [1, U] packed bytes of a group
    for grp in tl.static_range(HEAD_DIM // GROUP):
        base = x_ptr + r * HEAD_DIM + grp * GROUP + unit * VALUES
        x = tl.load(base, mask=in_rows, other=0.0).to(tl.float32)
        lo = tl.reduce(x, 1, _MIN)
        hi = tl.reduce(x, 1, _MAX)
        for j in tl.static_range(1, VALUES):
            x = tl.load(base + j, mask=in_rows, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.reduce(x, 1, _MIN))
            hi = tl.maximum(hi, tl.reduce(x, 1, _MAX))
        nearest = lo.to(tl.float16)
        below = (lo - tl.abs(lo) * ZERO_REL - ZERO_ABS).to(tl.float16)
        zero = tl.where(nearest.to(tl.float32) <= lo, nearest, below)
        scale = tl.maximum(tl.div_rn(hi - zero.to(tl.float32), (1 << BITS) - 1.0), MIN_SCALE).to(tl.float16)
        tl.store(zeros_ptr + rr * (HEAD_DIM // GROUP) + grp, zero, mask=rr < rows)
        tl.store(scales_ptr + rr * (HEAD_DIM // GROUP) + grp, scale, mask=rr < rows)
        z = zero.to(tl.float32)[:, None]
        s = scale.to(tl.float32)[:, None]
        word = tl.full([BLOCK_ROWS, GROUP // VALUES], 0, tl.int32)
        for j in tl.static_range(VALUES):
            x = tl.load(base + j, mask=in_rows, other=0.0).to(tl.float32)
            u = tl.floor(tl.div_rn(x - z, s) + 0.5)
            u = tl.minimum(tl.maximum(u, 0.0), (1 << BITS) - 1.0)
            word |= u.to(tl.int32) << (BITS * j)
        out = codes_ptr + r * (HEAD_DIM // VALUES) + grp * (GROUP // VALUES) + unit
        tl.store(out, word.to(tl.uint8), mask=in_rows)


@triton.jit
def _kv_dequantize_kernel(
    codes_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    rows,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    VALUES: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rr = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    r = rr[:, None]
    in_rows = r < rows
    unit = tl.arange(0, GROUP // VALUES)[None, :]
    for grp in tl.static_range(HEAD_DIM // GROUP):
        s = tl.load(scales_ptr + rr * (HEAD_DIM // GROUP) + grp, mask=rr < rows, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + rr * (HEAD_DIM // GROUP) + grp, mask=rr < rows, other=0.0).to(tl.float32)
        byte = tl.load(codes_ptr + r * (HEAD_DIM // VALUES) + grp * (GROUP // VALUES) + unit, mask=in_rows)
        word = byte.to(tl.int32)
        for j in tl.static_range(VALUES):
            u = ((word >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.float32)
            x = u * s[:, None] + z[:, None]
            col = grp * GROUP + unit * VALUES + j
            tl.store(out_ptr + r * HEAD_DIM + col, x.to(out_ptr.dtype.element_ty), mask=in_rows)


def _check(head_dim: int, bits: int, group_size: int) -> None:
    check_kv_format(head_dim, bits, group_size)
    if not triton_layout(head_dim, bits, group_size):
        raise InvalidInput(
            f"kv: the Triton kernels take power-of-two groups of whole code bytes; {group_size} elements of "
            f"{bits} bits is not one: use the torch reference"
        )


def quantize_triton(x: torch.Tensor, bits: int, group_size: int, block_rows: int = BLOCK_ROWS) -> QuantizedKV:
    """`kv_quant.quantize_reference` as a Triton kernel."""
    head_dim = x.shape[-1]
    _check(head_dim, bits, group_size)
    src = x.detach().contiguous()
    lead = x.shape[:-1]
    rows = src.numel() // head_dim if head_dim else 0
    codes = torch.empty(*lead, head_dim * bits // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*lead, head_dim // group_size, dtype=torch.float16, device=x.device)
    zeros = torch.empty_like(scales)
    if rows:
        check_launchable(_kv_quantize_kernel)
        _kv_quantize_kernel[(triton.cdiv(rows, block_rows),)](
            src, codes, scales, zeros, rows,
            HEAD_DIM=head_dim, BITS=bits, VALUES=UNITS[bits][0], GROUP=group_size, BLOCK_ROWS=block_rows,
            ZERO_REL=ZERO_REL, ZERO_ABS=ZERO_ABS, MIN_SCALE=MIN_SCALE,
        )  # fmt: skip
    _check_finite(scales, zeros)
    return QuantizedKV(codes, scales, zeros, bits, group_size)


def dequantize_triton(
    q: QuantizedKV, dtype: torch.dtype = torch.float32, block_rows: int = BLOCK_ROWS
) -> torch.Tensor:
    """`kv_quant.dequantize_reference` as a Triton kernel."""
    head_dim = q.head_dim
    _check(head_dim, q.bits, q.group_size)
    lead = q.codes.shape[:-1]
    out = torch.empty(*lead, head_dim, dtype=dtype, device=q.codes.device)
    rows = out.numel() // head_dim if head_dim else 0
    if rows:
        check_launchable(_kv_dequantize_kernel)
        _kv_dequantize_kernel[(triton.cdiv(rows, block_rows),)](
            q.codes.contiguous(), q.scales.contiguous(), q.zeros.contiguous(), out, rows,
            HEAD_DIM=head_dim, BITS=q.bits, VALUES=UNITS[q.bits][0], GROUP=q.group_size,
            BLOCK_ROWS=block_rows,
        )  # fmt: skip
    return out
