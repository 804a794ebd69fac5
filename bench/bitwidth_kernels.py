"""CPU throughput of the quantized linear's paths against fp32 torch.matmul, and the Triton kernel's
agreement with the reference under the interpreter.

Per (weight shape, format, batch of x rows): the time of `y = x @ W.T` by fp32 torch.matmul on the fp32
weight, by the reference (dequantize then matmul, every call), by PyTorch's CPU kernel in fp32
(`native`) and on bf16 activations (`native-bf16`), each with its `linear_error` against the reference;
`linear` (memplan.kernels.linear) follows what this measures. Each time is the fastest of a few calls
after one warm-up (the machine is shared; the minimum is the least disturbed), within a time budget per
path. Then every format runs through the Triton dequantize-matmul kernel under TRITON_INTERPRET=1 on small
shapes, against the reference. Run: `python -m bench.run bitwidth_kernels [--quick]` (about a minute).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import Result
from memplan.kernels.cpu_native import native_kind
from memplan.kernels.linear import PreparedLinear, linear, linear_error, prepare_linear, reference_linear
from memplan.kernels.quantize import QuantizedWeight, dequantize, quantize
from memplan.plans.decisions import TensorBits

BATCHES = (1, 16)
CASES: tuple[tuple[tuple[int, int], TensorBits], ...] = (
    ((4096, 4096), TensorBits(0, "int8", None, True, "per-channel")),
    ((4096, 4096), TensorBits(0, "int4", 128, True, "per-group")),
    ((4096, 4096), TensorBits(0, "int4", 128, False, "per-group")),
    ((4096, 4096), TensorBits(0, "int3", 128, False, "per-group")),
    ((11008, 4096), TensorBits(0, "int8", None, True, "per-channel")),
    ((11008, 4096), TensorBits(0, "int4", 128, True, "per-group")),
)
"""(N, K) weights: a Llama-7B attention projection and its MLP up-projection."""
QUICK = CASES[:2]
INTERPRETER_CASES: tuple[TensorBits, ...] = (
    TensorBits(0, "int8", None, True, "per-channel"),
    TensorBits(0, "int4", 128, True, "per-group"),
    TensorBits(0, "int4", 64, False, "per-group"),
    TensorBits(0, "int3", 64, False, "per-group"),
    TensorBits(0, "int3", 32, True, "per-group"),
    TensorBits(0, "int2", 32, False, "per-group"),
)
BUDGET_S = 0.6
"""Time per path and batch after the warm-up; a call slower than this is timed once, with no warm-up."""


def _time_ms(f: Callable[[], Any], budget_s: float = BUDGET_S, reps: int = 5) -> tuple[float, Any]:
    """The fastest of up to `reps` calls of f after one warm-up, stopping once `budget_s` is spent (a first
    call slower than the budget is the time: its warm-up costs are small beside it); and f's result."""
    t = time.perf_counter()
    out = f()
    best = time.perf_counter() - t
    if best > budget_s:
        return best * 1e3, out
    best, spent = float("inf"), 0.0
    for _ in range(reps):
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best * 1e3, out


def _label(spec: TensorBits) -> str:
    group = "ch" if spec.group_size is None else f"g{spec.group_size}"
    return f"{spec.format} {group} {'sym' if spec.symmetric else 'asym'}"


def _paths(q: QuantizedWeight, native: PreparedLinear | None) -> dict[str, Callable[[torch.Tensor], Any]]:
    """The paths to time for q: the reference always, PyTorch's kernels when one applies."""
    paths: dict[str, Callable[[torch.Tensor], Any]] = {"reference": lambda x: reference_linear(x, q)}
    if native is not None:
        for name in ("native", "native-bf16"):
            fixed = PreparedLinear(q, native.native, name)  # type: ignore[arg-type]
            paths[name] = lambda x, p=fixed: linear(x, p)
    return paths


def _shape_rows(shape: tuple[int, int], spec: TensorBits, gen: torch.Generator) -> list[dict[str, Any]]:
    n, k = shape
    w = torch.randn(n, k, generator=gen) * 0.02
    q = quantize(w, spec)
    native = prepare_linear(q, "native") if native_kind(q.scheme) else None
    w_abs = dequantize(q).abs()
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, k, generator=gen)
        fp32_ms, _ = _time_ms(lambda: x @ w.T)  # noqa: B023 (called at once)
        magnitude = float((x.abs() @ w_abs.T).max())  # linear_error's denominator, computed once
        ref = None
        for path, f in _paths(q, native).items():
            ms, y = _time_ms(lambda: f(x))  # noqa: B023
            ref = y if ref is None else ref  # the reference path runs first
            rows.append({
                "shape": f"{n}x{k}", "format": _label(spec), "batch": batch, "path": path,
                "ms": round(ms, 2), "fp32_matmul_ms": round(fp32_ms, 2), "vs_fp32": round(fp32_ms / ms, 3),
                "error": f"{float((y.float() - ref.float()).abs().max()) / magnitude:.1e}",
                "stored_MiB": round(q.stored_bytes() / 2**20, 1), "fp32_MiB": round(w.numel() * 4 / 2**20, 1),
            })
        fastest = min((r for r in rows if r["batch"] == batch), key=lambda r: r["ms"])
        for r in rows:
            if r["batch"] == batch:
                r["fastest"] = "yes" if r is fastest else ""
    return rows


def _interpreter_rows(gen: torch.Generator) -> list[dict[str, Any]]:
    """The Triton kernel under the interpreter vs the reference, 16 x 256 @ (256 x 256).T."""
    from memplan.kernels.dequant_matmul import dequant_matmul  # sets TRITON_INTERPRET=1 without a GPU

    rows = []
    for spec in INTERPRETER_CASES:
        q = quantize(torch.randn(256, 256, generator=gen), spec)
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(16, 256, generator=gen).to(dtype)
            t = time.perf_counter()
            y = dequant_matmul(x, q)
            rows.append({"format": _label(spec), "x": str(dtype).removeprefix("torch."),
                         "error": f"{linear_error(y, x, q):.1e}",
                         "interpreter_s": round(time.perf_counter() - t, 3)})
    return rows


COLUMNS = ["shape", "format", "batch", "path", "ms", "fp32_matmul_ms", "vs_fp32", "error", "fastest",
           "stored_MiB", "fp32_MiB"]


def run(quick: bool) -> Result:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows = [r for shape, spec in (QUICK if quick else CASES) for r in _shape_rows(shape, spec, gen)]
    interp = _interpreter_rows(gen)
    wins = sorted({f"{r['format']} b{r['batch']}: {r['path']}" for r in rows if r["fastest"]})
    worst = max(float(r["error"]) for r in interp)
    notes = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; times are the fastest of a few calls (shared machine)",
        "fastest path per format and batch: " + "; ".join(wins),
        "vs_fp32 = fp32 torch.matmul time / path time (>1: faster than fp32); error = linear_error, max "
        "|y - reference| / max(|x| @ |W|.T)",
        f"Triton dequantize-matmul under TRITON_INTERPRET=1, 16x256 @ (256x256).T, {len(interp)} cases: "
        f"worst error {worst:.1e} (tolerance 1e-5 fp32, 1e-3 fp16)",
    ]
    return Result("bitwidth_kernels", "Quantized linear on the CPU: reference, PyTorch kernels, fp32 matmul",
                  COLUMNS, rows, notes, {"interpreter": interp})
