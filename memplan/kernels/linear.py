"""A quantized linear, `y = x @ dequantize(W).T`, by the fastest path this machine has for W's format.

    path          where  how                                                        error vs reference
    reference     any    dequantize W (fp32), then torch.matmul: the semantics      0
    native        CPU    PyTorch's int8 / int4 CPU kernels in x's dtype (cpu_native) 1e-5 fp32, 1e-3 fp16
    native-bf16   CPU    the same kernels on x cast to bf16, y cast back             6e-3
    triton        GPU    the dequantize-matmul Triton kernel (dequant_matmul)        1e-5 fp32, 1e-3 fp16

Errors are `linear_error`: max |y - reference| over max (|x| @ |W|.T), the largest magnitude a sum of
products can reach. On this project's 2-core AVX2 machine (bench/results/bitwidth_kernels.md) PyTorch's
int8/int4 CPU kernels are vectorized for bf16 activations only: `native-bf16` is the fastest path for
both at batch 1 and 16 (faster than fp32 torch.matmul); in fp32 they still beat the reference at batch 1
but the int4 one loses to it at batch 16. So `linear` takes `native-bf16` when the prepared weight allows
bf16 activations (`bf16_activations=True`: the int4/int8 weight error is far larger than bf16's; off by
default, since rounding the caller's activations is a change they did not ask for), else `native` up to
`NATIVE_MAX_ROWS` rows and the reference beyond. Formats no native kernel takes (int3, int2, asymmetric
int8, other groups) use the reference. triton is imported only when the triton path runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from memplan.errors import InvalidInput
from memplan.kernels.cpu_native import NativeKind, NativeWeight, native_kind, native_linear, prepare
from memplan.kernels.quantize import QuantizedWeight, dequantize
from memplan.plans.decisions import DEQUANT_BLOCK_BYTES

LinearPath = Literal["reference", "native", "native-bf16", "triton"]
PATHS: tuple[LinearPath, ...] = ("reference", "native", "native-bf16", "triton")
NATIVE_MAX_ROWS: dict[NativeKind, int] = {"int8pack": 16, "int4pack": 1}
"""Without bf16 activations: the most rows of x at which the native kernel (in fp32) beat the reference
in bench/results/bitwidth_kernels.json (measured at 1 and 16 rows)."""
TOLERANCES: dict[tuple[LinearPath, torch.dtype], float] = {
    ("native", torch.float32): 1e-5,
    ("native", torch.float16): 1e-3,
    ("native-bf16", torch.float32): 6e-3,
    ("native-bf16", torch.float16): 6e-3,
    ("triton", torch.float32): 1e-5,
    ("triton", torch.float16): 1e-3,
    ("triton", torch.bfloat16): 6e-3,
}
"""The largest `linear_error` each path may have against the reference, by x's dtype (checked by tests):
fp16 rounds W and y once each (2 * 2**-11), bf16 x, W and y (3 * 2**-9); fp32 is fp32 summation order.
Triton's are checked under the interpreter only (its GPU fp32 dot may use TF32: unmeasured)."""


@dataclass(frozen=True, slots=True)
class PreparedLinear:
    """A quantized weight ready for `linear`: converted once for PyTorch's CPU kernel when one applies;
    `path` fixes the path (None: chosen per call), `bf16_activations` lets the choice round x to bf16."""

    q: QuantizedWeight
    native: NativeWeight | None = None
    path: LinearPath | None = None
    bf16_activations: bool = False


def reference_linear(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """The reference: `x @ dequantize(q).T` in fp32, returned in x's dtype (x is [..., K]); a large 2-D
    weight is dequantized by blocks of output rows (`DEQUANT_BLOCK_BYTES`), each block's columns of the
    result computed as they would be at once."""
    rows, cols = q.shape[0], q.shape[-1]
    step = max(1, DEQUANT_BLOCK_BYTES // (4 * cols))
    if len(q.shape) != 2 or step >= rows:
        return (x.float() @ dequantize(q).T).to(x.dtype)
    xf = x.float()
    out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32, device=x.device)
    for r in range(0, rows, step):
        end = min(r + step, rows)
        zeros = None if q.zeros is None else q.zeros[r:end]
        block = QuantizedWeight(q.payload[r:end], q.scales[r:end], zeros, (end - r, cols), q.spec)
        out[..., r:end] = xf @ dequantize(block).T
    return out.to(x.dtype)


def _int8pack_reference(x: torch.Tensor, w: NativeWeight) -> torch.Tensor:
    """The reference product from an int8 weight kept only in the CPU kernel's layout (int8 [N, K] and its
    per-row scales: `w * scales[:, None]` is `dequantize(q)` exactly), by the same row blocks."""
    rows, cols = w.weight.shape
    step = max(1, DEQUANT_BLOCK_BYTES // (4 * cols))
    xf = x.float()
    out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32, device=x.device)
    for r in range(0, rows, step):
        end = min(r + step, rows)
        out[..., r:end] = xf @ (w.weight[r:end].float() * w.scales[r:end, None].float()).T
    return out.to(x.dtype)


def linear_error(y: torch.Tensor, x: torch.Tensor, q: QuantizedWeight) -> float:
    """max |y - reference_linear(x, q)| / max (|x| @ |dequantize(q)|.T): the measure TOLERANCES bound."""
    w = dequantize(q)
    ref = x.float() @ w.T
    return float((y.float() - ref).abs().max() / (x.float().abs() @ w.abs().T).max().clamp(min=1e-30))


def choose_path(q: QuantizedWeight, device: torch.device, rows: int, bf16_activations: bool) -> LinearPath:
    """The path `linear` takes for `rows` rows of x on `device` (see the module docstring)."""
    if device.type == "cuda":
        return "triton"
    kind = native_kind(q.scheme) if len(q.shape) == 2 else None
    if kind is None:
        return "reference"
    if bf16_activations:
        return "native-bf16"
    return "native" if rows <= NATIVE_MAX_ROWS[kind] else "reference"


def prepare_linear(
    q: QuantizedWeight, path: LinearPath | None = None, bf16_activations: bool = False
) -> PreparedLinear:
    """Convert q for PyTorch's CPU kernel when one applies (or `path` needs it)."""
    if path is not None and path not in PATHS:
        raise InvalidInput(f"unknown linear path {path!r}; use one of {', '.join(PATHS)}")
    on_cpu_2d = q.payload.device.type == "cpu" and len(q.shape) == 2
    wants_native = path in ("native", "native-bf16") or (
        path is None and on_cpu_2d and native_kind(q.scheme) is not None
    )
    return PreparedLinear(q, prepare(q) if wants_native else None, path, bf16_activations)


def linear(x: torch.Tensor, w: PreparedLinear | QuantizedWeight) -> torch.Tensor:
    """`x @ dequantize(W).T` for x [..., K], in x's dtype, by the prepared or chosen path (a bare
    QuantizedWeight is prepared on each call: prepare it once with `prepare_linear`)."""
    prepared = w if isinstance(w, PreparedLinear) else prepare_linear(w)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    path = prepared.path or choose_path(prepared.q, x.device, x2.shape[0], prepared.bf16_activations)
    if path == "reference":
        native = prepared.native
        if native is not None and native.kind == "int8pack" and not prepared.q.payload.numel():
            return _int8pack_reference(x, native)  # only the kernel's layout is kept
        return reference_linear(x, prepared.q)
    if path == "triton":
        from memplan.kernels.dequant_matmul import dequant_matmul  # imports triton

        y = dequant_matmul(x2, prepared.q)
    else:
        native = prepared.native
        if native is None:
            raise InvalidInput(f"path {path!r} needs a weight prepared for it: prepare_linear(q, {path!r})")
        y = native_linear(x2.to(torch.bfloat16) if path == "native-bf16" else x2, native).to(x.dtype)
    return y.reshape(*lead, y.shape[-1])
