"""Dequantize-matmul as a Triton kernel: `y = x @ dequantize(W).T` for x [M, K] (fp32 or fp16) and a packed,
group-wise quantized W [N, K], without materialising the dequantized W.

The torch reference is `memplan.kernels.linear.reference_linear`. Each program computes a
`BLOCK_M x BLOCK_N` tile of y; per `BLOCK_K` step it loads the x tile, the packed bytes of the W tile (code k
of a row lives in unit k // VALUES at bit (k % VALUES) * BITS, and may straddle two of the unit's bytes
when BITS = 3), its group's scale (and zero point unless SYMMETRIC) and accumulates
`dot(x, (code - zero) * scale)` in fp32. BITS, GROUP_SIZE, SYMMETRIC and the blocks are `tl.constexpr`s
from `memplan.kernels.specialise`. With fp16 (or, on a GPU, bf16) x the dequantized tile is cast to x's
dtype for the dot (tensor cores on a GPU); with fp32 x the dot is fp32 (TF32 on recent GPUs, exact under
the interpreter). Only the interpreter has run it (no GPU here): GPU speed and tolerances are unmeasured.
"""

from __future__ import annotations

import torch

from memplan.kernels.quantize import QuantizedWeight
from memplan.kernels.specialise import check_input, specialise
from memplan.kernels.triton_env import INTERPRETED, check_launchable, tl, triton


@triton.jit
def _dequant_matmul_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    BITS: tl.constexpr,
    VALUES: tl.constexpr,
    NBYTES: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of x and y
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of W, columns of y
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)  # [BM, BK]
        w_mask = (rk[:, None] < K) & (rn[None, :] < N)  # the W tile, transposed: [BK, BN]
        bit = (rk % VALUES) * BITS
        byte = (rk // VALUES) * NBYTES + bit // 8
        lo = tl.load(w_ptr + rn[None, :] * stride_wn + byte[:, None], mask=w_mask, other=0).to(tl.int32)
        if NBYTES > 1:  # int3: a code may run into the next byte of its unit
            byte2 = (rk // VALUES) * NBYTES + tl.minimum(bit // 8 + 1, NBYTES - 1)
            hi = tl.load(w_ptr + rn[None, :] * stride_wn + byte2[:, None], mask=w_mask, other=0)
            lo = lo | (hi.to(tl.int32) << 8)
        code = (lo >> (bit % 8)[:, None]) & ((1 << BITS) - 1)
        group = rk // GROUP_SIZE
        s = tl.load(s_ptr + rn[None, :] * stride_sn + group[:, None], mask=w_mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            w = (code.to(tl.float32) - (1 << (BITS - 1))) * s
        else:
            z = tl.load(z_ptr + rn[None, :] * stride_sn + group[:, None], mask=w_mask, other=0.0)
            w = (code.to(tl.float32) - z.to(tl.float32)) * s
        acc += tl.dot(x, w.to(x.dtype))
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def dequant_matmul(
    x: torch.Tensor, q: QuantizedWeight, blocks: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """`x @ dequantize(q).T` by the Triton kernel, in x's dtype; `blocks` (M, N, K) overrides specialise's."""
    cfg = specialise(q.spec, q.shape, x.shape[0] if x.dim() else 0, INTERPRETED, blocks)
    n, k = q.shape
    check_input(x, k, INTERPRETED)
    x = x.contiguous()
    payload, scales = q.payload.contiguous(), q.scales.contiguous()
    zeros = scales if q.zeros is None else q.zeros.contiguous()  # not read when SYMMETRIC
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(x.shape[0], cfg.BLOCK_M), triton.cdiv(n, cfg.BLOCK_N))
    check_launchable(_dequant_matmul_kernel)
    _dequant_matmul_kernel[grid](
        x,
        payload,
        scales,
        zeros,
        y,
        x.shape[0],
        n,
        k,
        x.stride(0),
        payload.stride(0),
        scales.stride(0),
        y.stride(0),
        **cfg.constexprs(),
    )
    return y
