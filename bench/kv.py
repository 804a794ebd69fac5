"""KV budgets: memplan's joint (tokens, bits) plan against uniform budgets (SnapKV-style), PyramidKV,
PrefixKV and ZigZagKV at 50 %, 20 % and 10 % of the KV cache, on held-out text, each run for real through
memplan's compressed cache (`memplan.runtime.kv_cache`), plus two checks of the allocation rules:

- PyramidKV's closed form against kvpress's own `PyramidKVPress.get_layer_budget` (kvpress pinned, see
  `KVPRESS`), on a grid of prompt lengths, ratios, layer counts and windows: equal budgets, layer by layer.
- PrefixKV's binary search: the mean kept ratio at the threshold against the target, and the planned bytes
  against the byte budget (within one token per layer).

Model: the zoo's trained tiny-lm when cached (else gpt2-tiny trained here, as `bench/bitwidth` does). Its
positions are learned for 256 tokens, so the context is its window (several windows are not possible with
absolute positions). Each evaluation window is a prompt of `PROMPT` bytes then `GEN` bytes decoded one at
a time, teacher-forced (the true byte is fed back), under the cache's cap at every step; quality is the
perplexity of those `GEN` bytes and the share of steps whose argmax equals the full cache's. Calibration:
windows of the training split; evaluation: the held-out split. Every method allocates the same byte
budget and runs with the same scoring (SnapKV's observation window, sinks and recent window kept);
memplan's plan may also store layers at 8, 4 or 2 bits. Measured KV bytes are the live-storage tracker's
peak of the cache's storages. Run: `python -m bench.run kv [--quick]`.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

import memplan
from bench.harness import RESULTS, Result, torch_threads
from memplan.passes.kv_budget import KVBudgetOptions
from memplan.passes.kv_methods import prefix_ratios, pyramid_budgets
from memplan.planner.kv_calibration import KVCalibrationSettings, calibrate_kv
from memplan.plans.decisions import KVCalibration
from memplan.zoo import tiny_lm

KVPRESS = "kvpress==0.5.5"
"""kvpress from PyPI. It requires transformers<5.3 (memplan pins 5.23), so it is installed without its
dependencies into a folder of its own and only its PyramidKV module is imported (its package `__init__`
imports its pipeline, which needs the older transformers): the function compared is kvpress's own."""
KVPRESS_DIR = Path.home() / ".cache" / "memplan" / "kvpress-0.5.5"
PROMPT, GEN = 192, 64
SHARES = (0.5, 0.2, 0.1)
METHODS = ("uniform", "pyramidkv", "prefixkv", "zigzagkv", "memplan")
THREADS = 1
"""Torch threads (see bench/bitwidth: one thread is faster on the shared 2-core machine)."""
COLUMNS = ["budget", "method", "kv_bytes", "planned", "measured", "of_full", "ppl", "dppl", "agree", "bits",
           "tokens"]  # fmt: skip


def run(quick: bool) -> Result:
    with torch_threads(THREADS):
        return _run(quick)


def _run(quick: bool) -> Result:
    from bench.bitwidth import _model, _windows

    t0 = time.perf_counter()
    torch.manual_seed(0)
    corpus = tiny_lm.load_corpus()
    name, model, context, trained = _model(corpus, 240 if quick else 1200)
    model.eval()
    context = min(context, PROMPT + GEN)
    calib = _windows(corpus.train, 2 if quick else 4, 2, context, seed=1)
    evals = _windows(corpus.val, 2 if quick else 8, 4, context, seed=2)
    t_cal = time.perf_counter()
    cal = calibrate_kv(model, calib, KVCalibrationSettings(group_size=32))
    t_cal = time.perf_counter() - t_cal
    reference = [_full(model, ids) for ids in evals]
    ref_ppl = math.exp(sum(r[0] for r in reference) / len(reference))
    rows = []
    for share in SHARES:
        for method in METHODS:
            plan = _plan(model, evals[0], method, share, cal)
            rows.append(_row(plan, model, evals, reference, ref_ppl, share))
    pyramid = _pyramid_check(quick)
    prefix = _prefix_check(cal, rows)
    plot = _plot(rows, ref_ppl, name)
    notes = _notes(name, trained, context, calib, evals, cal, t_cal, ref_ppl, rows, pyramid, prefix, plot, t0)
    return Result("kv", f"KV budgets on {name}: memplan's tokens-and-bits plan vs token-only allocations",
                  COLUMNS, rows, notes, {"pyramid_vs_kvpress": pyramid, "prefixkv": prefix})  # fmt: skip


def _plan(model: nn.Module, ids: torch.Tensor, method: str, share: float, cal: KVCalibration) -> memplan.Plan:
    opts = KVBudgetOptions(method=method, calibration=cal)  # type: ignore[arg-type]
    return memplan.plan(model, (ids[:, :PROMPT],), mode="infer", gen=GEN, kv_budget=f"{share:.0%}",
                        passes=["kv_budget"], options={"kv_budget": opts})  # fmt: skip


@torch.no_grad()
def _full(model: nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The full cache's mean NLL of the GEN bytes after the prompt, and its argmax at each of them."""
    logits = model(ids[:, : PROMPT + GEN], use_cache=False).logits[:, PROMPT - 1 : PROMPT + GEN - 1].float()
    return _nll(logits, ids), logits.argmax(-1)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    target = ids[:, PROMPT : PROMPT + GEN]
    return float(-torch.log_softmax(logits, -1).gather(-1, target[..., None]).mean())


@torch.no_grad()
def _compressed(model: nn.Module, run: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The same under the plan's cache: prefill, then GEN - 1 teacher-forced decode steps."""
    cache = run.new_cache()
    out = model(ids[:, :PROMPT], past_key_values=cache, use_cache=True)
    steps = [out.logits[:, -1:]]
    for j in range(GEN - 1):
        out = model(ids[:, PROMPT + j : PROMPT + j + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1:])
    logits = torch.cat(steps, 1).float()
    return _nll(logits, ids), logits.argmax(-1)


def _row(plan: memplan.Plan, model: nn.Module, evals: list[torch.Tensor], reference: list[Any],
         ref_ppl: float, share: float) -> dict[str, Any]:  # fmt: skip
    from memplan.runtime.kv_cache import applied_kv

    kv = plan.decisions.kv
    assert kv is not None
    nll, agree, measured = 0.0, 0.0, 0
    with applied_kv(kv, model) as run:
        for ids, (_, ref_arg) in zip(evals, reference, strict=True):
            n, arg = _compressed(model, run, ids)
            nll += n
            agree += float((arg == ref_arg).float().mean())
    m = run.finish()
    measured = m.peak_kv_bytes
    full = kv.budget_bytes / share if share else 0
    ppl = math.exp(nll / len(evals))
    bits: dict[str, int] = {}
    for b in kv.budgets:
        bits[str(b.bits or "full")] = bits.get(str(b.bits or "full"), 0) + 1
    return {
        "budget": f"{share:.0%}", "method": kv.method, "kv_bytes": kv.budget_bytes,
        "planned": kv.planned_bytes,
        "measured": measured, "of_full": round(measured / full, 4) if full else None, "ppl": ppl,
        "dppl": ppl - ref_ppl, "agree": agree / len(evals),
        "bits": ", ".join(f"{k} {v}" for k, v in sorted(bits.items())),
        "tokens": "/".join(str(b.tokens) for b in kv.budgets),
    }  # fmt: skip


def _kvpress_pyramid() -> Any:
    """kvpress's PyramidKVPress, from a --no-deps install of the pinned release (see `KVPRESS`)."""
    if not (KVPRESS_DIR / "kvpress").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                        str(KVPRESS_DIR), KVPRESS], check=True)  # fmt: skip
    if "kvpress" not in sys.modules:
        package = types.ModuleType("kvpress")
        package.__path__ = [str(KVPRESS_DIR / "kvpress")]
        sys.modules["kvpress"] = package
    return importlib.import_module("kvpress.presses.pyramidkv_press").PyramidKVPress


def _pyramid_check(quick: bool) -> dict[str, Any]:
    """memplan's `pyramid_budgets` against kvpress's `get_layer_budget`, layer by layer, on a grid."""
    press_type = _kvpress_pyramid()
    cases = equal = 0
    first_diff = None
    for q_len in (64, 256, 1000, 4096) if quick else (16, 64, 100, 256, 1000, 4096, 32768):
        for ratio in (0.0, 0.1, 0.5, 0.8, 0.9, 0.95):
            for layers in (2, 4, 32, 80):
                for window in (8, 64):
                    press = press_type(compression_ratio=ratio, window_size=window, beta=20)
                    theirs = [press.get_layer_budget(_Module(layers, i), q_len) for i in range(layers)]
                    ours = pyramid_budgets(q_len, ratio, layers, window, 20)
                    cases += 1
                    equal += ours == theirs
                    if ours != theirs and first_diff is None:
                        first_diff = {"q_len": q_len, "ratio": ratio, "layers": layers, "ours": ours,
                                      "theirs": theirs}  # fmt: skip
    return {"kvpress": KVPRESS, "cases": cases, "equal": equal, "first_difference": first_diff}


class _Module:
    """What kvpress's get_layer_budget reads off an attention module: the layer count and index."""

    def __init__(self, layers: int, index: int) -> None:
        self.config = types.SimpleNamespace(num_hidden_layers=layers)
        self.layer_idx = index


def _prefix_check(cal: KVCalibration, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The PrefixKV threshold's mean ratio against targets, and its plans' bytes against their budgets."""
    curves = [cal.of(layer).mass for layer in range(cal.layers)]
    worst = 0.0
    for target in (0.05, 0.1, 0.2, 0.35, 0.5, 0.8):
        ratios, _ = prefix_ratios(curves, cal.ratios, target)
        worst = max(worst, abs(sum(ratios) / len(ratios) - target))
    slack = []
    for r in rows:
        if r["method"] == "prefixkv":
            tokens = [int(t) for t in r["tokens"].split("/")]
            per_token = r["planned"] / sum(tokens)
            slack.append((r["kv_bytes"] - r["planned"]) / per_token / len(tokens))
    return {"worst_mean_ratio_error": worst, "spare_tokens_per_layer": slack}


def _plot(rows: list[dict[str, Any]], ref_ppl: float, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        pts = sorted((r["measured"], r["ppl"]) for r in rows if r["method"] == method)
        ax.plot([p[0] / 2**10 for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(ref_ppl, color="grey", linestyle="--", label="full cache")
    ax.set_xlabel("measured KV bytes (KiB, whole batch)")
    ax.set_ylabel(f"perplexity of the {GEN} decoded bytes")
    ax.set_title(f"KV budgets on {name}")
    ax.legend()
    path = RESULTS / "kv.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path.name


def _notes(name: str, trained: str, context: int, calib: list[torch.Tensor], evals: list[torch.Tensor],
           cal: KVCalibration, t_cal: float, ref_ppl: float, rows: list[dict[str, Any]],
           pyramid: dict[str, Any], prefix: dict[str, Any], plot: str, t0: float) -> list[str]:  # fmt: skip
    best = []
    for share in SHARES:
        at = [r for r in rows if r["budget"] == f"{share:.0%}"]
        top = min(at, key=lambda r: r["ppl"])
        mine = next(r for r in at if r["method"] == "memplan")
        runner = min((r for r in at if r["method"] != "memplan"), key=lambda r: r["ppl"])
        best.append(f"{share:.0%}: best {top['method']} (memplan {mine['ppl']:.3f}, best other "
                    f"{runner['method']} {runner['ppl']:.3f})")  # fmt: skip
    off = max(abs(r["measured"] - r["planned"]) / r["planned"] for r in rows)
    return [
        f"model: {name}, {trained}; context {context} = prompt {PROMPT} + {GEN} decoded bytes "
        f"(teacher-forced); full-cache perplexity {ref_ppl:.3f}",
        f"calibration: {len(calib)} batches of {tuple(calib[0].shape)} training windows ({cal.prompt}-byte "
        f"prompts, errors on the {cal.follow} bytes after), {t_cal:.1f} s; evaluation: {len(evals)} "
        f"batches of {tuple(evals[0].shape)} held-out windows",
        "lowest perplexity per budget: " + "; ".join(best),
        f"measured KV bytes vs planned: worst {100 * off:.3f}% apart",
        f"PyramidKV vs kvpress ({pyramid['kvpress']}'s get_layer_budget): {pyramid['equal']} of "
        f"{pyramid['cases']} cases equal layer by layer",
        f"PrefixKV: worst |mean ratio - target| {prefix['worst_mean_ratio_error']:.2e}; spare tokens per "
        "layer under the byte budget: " + ", ".join(f"{s:.2f}" for s in prefix["spare_tokens_per_layer"]),
        "budget: a share of the full cache (every layer's keys and values for the context, fp32, whole "
        "batch); of_full: measured / full; bits: how many layers store which width; tokens: each layer's "
        "cap",
        f"plot: {plot}; total {time.perf_counter() - t0:.0f} s on this machine, {THREADS} torch thread",
    ]

