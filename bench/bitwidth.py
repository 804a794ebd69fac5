"""Mixed precision by the bitwidth pass against uniform int8, uniform int4 and a llama.cpp-like rule table, at
equal weight bytes, on held-out text: loss, perplexity, KL to the float model and next-token agreement.

Model: the zoo's trained tiny-lm when its weights are cached (`python examples/train_tiny_lm.py`); otherwise
gpt2-tiny, trained here for `STEPS` steps on the same corpus (the standard library's sources, tiny-lm's
training split) so that quantization has accuracy to lose (a random init has none). Calibration: windows of
the training split; evaluation: fixed windows of the held-out split (tiny-lm's validation files).

Configurations, each run for real through `memplan.runtime.quantized` (weights stored, PyTorch's int8/int4
CPU kernels or the reference path):

    float        the fp32 model
    int8         every quantizable weight int8, symmetric, per channel
    int4         every one int4 asymmetric, group 128 (or the largest group that divides the rows)
    rule         llama.cpp-like table: attention projections (qkv and output) int8, MLP int4 g128
    memplan      the bitwidth pass (Hutchinson sensitivity, exact ILP) at the bytes of int4, of the rule
                 table, and at 25 %, 35 % and 50 % of the fp32 weights; `memplan-fisher` at the bytes of
                 the rule table with the cheaper Fisher estimate

`pred_dloss` is the pass's predicted loss increase (the ILP's objective, nats) for every configuration (the
sensitivity table priced on its formats); `dloss` is what evaluation measured. The sensitivity is measured
once per estimator; the pipeline runs on one capture. Run: `python -m bench.run bitwidth [--quick]`.
This benchmark is separate from `bitwidth_hawq` (the ILP on HAWQ-V3's published inputs) and
`bitwidth_kernels` (the kernels' speed).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from bench.harness import Result
from memplan.ir.hardware import load_hardware
from memplan.passes.baseline import rebased
from memplan.passes.bitwidth import BitwidthOptions
from memplan.passes.manager import run_pipeline
from memplan.passes.registry import passes_named
from memplan.planner.models import capture, load_model
from memplan.planner.sensitivity import SensitivitySettings, measure_sensitivity
from memplan.plans.plan import Plan, Workload
from memplan.runtime.quantized import quantize_model
from memplan.zoo import catalog, tiny_lm

STEPS = 1200
BATCH = 4
"""Training steps of the gpt2-tiny fallback, of `BATCH` windows of 128 bytes (about a minute here)."""
THREADS = 1
"""Torch threads while the benchmark runs: on this shared 2-core machine one thread trains 3.5x faster than
two (oversubscribed OpenMP threads spin while they wait)."""
SHARES = (0.1, 0.25, 0.35, 0.5)
ATTENTION = ("attn.c_attn", "attn.c_proj", "q_proj", "k_proj", "v_proj", "o_proj")
COLUMNS = ["config", "bytes", "of_fp32", "pred_dloss", "loss", "dloss", "ppl", "kl", "agree", "formats"]


def run(quick: bool) -> Result:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> Result:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    corpus = tiny_lm.load_corpus()
    name, model, context, trained = _model(corpus, STEPS // 5 if quick else STEPS)
    wrapped = catalog.get(name).inference_module(model)
    calib = _windows(corpus.train, 2 if quick else 4, 4, min(context, 128), seed=1)
    evals = _windows(corpus.val, 4 if quick else 12, 4, context, seed=2)
    graph, _ = capture(load_model(wrapped, "infer", (evals[0][:1],)), "infer")
    work = Workload("infer", 1, context)
    base = BitwidthOptions(size_limit_bytes=1 << 40)
    tables = {e: _sensitivity(wrapped, calib, base, e, quick) for e in ("hutchinson", "fisher")}
    plan = _plan(graph, work, replace(base, sensitivity=tables["hutchinson"]))
    rows_of = plan.decisions.bits.candidates  # type: ignore[union-attr]
    fp32 = sum(t.candidates[0].stored_bytes for t in rows_of)
    fixed = {"int8": _uniform(plan, "int8-ch-sym"), "int4": _uniform(plan, "int4-g128-asym")}
    fixed["rule"] = _rule(plan)
    limits = {"int4 bytes": _bytes(fixed["int4"]), "rule bytes": _bytes(fixed["rule"])}
    limits |= {f"{int(100 * s)}%": int(s * fp32) for s in SHARES}
    configs: dict[str, Plan] = {"float": _with(plan, ())} | {k: _with(plan, v) for k, v in fixed.items()}
    for label, limit in limits.items():
        opts = replace(base, size_limit_bytes=limit, sensitivity=tables["hutchinson"])
        configs[f"memplan @ {label}"] = _plan(graph, work, opts)
    fisher = replace(base, size_limit_bytes=limits["rule bytes"], sensitivity=tables["fisher"])
    configs["memplan-fisher @ rule bytes"] = _plan(graph, work, fisher)
    reference = _evaluate(model, evals)
    rows = [_row(k, p, model, evals, reference, fp32, rows_of) for k, p in configs.items()]
    notes = _notes(name, trained, context, calib, evals, tables, time.perf_counter() - t0, rows)
    return Result("bitwidth", f"bitwidth pass vs uniform and rule-table quantization on {name}", COLUMNS,
                  rows, notes, {"sensitivity": {k: t.description for k, t in tables.items()}})  # fmt: skip


def _model(corpus: tiny_lm.Corpus, steps: int) -> tuple[str, nn.Module, int, str]:
    """tiny-lm's trained weights if cached, else gpt2-tiny trained here."""
    if tiny_lm.is_cached():
        return "tiny-lm", tiny_lm.load_tiny_lm(), 256, "trained weights from the cache"
    entry = catalog.get("gpt2-tiny")
    model = entry.build()
    context = model.config.n_positions
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to a tenth
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * decay
        starts = torch.randint(0, corpus.train.numel() - context - 1, (BATCH,), generator=gen)
        ids = corpus.train[starts[:, None] + torch.arange(context)].long()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return "gpt2-tiny", model, context, f"trained here for {steps} steps (tiny-lm is not cached)"


def _windows(stream: torch.Tensor, batches: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """`batches` batches of `batch` x `seq` token windows at seeded random starts."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq - 1, (batches, batch), generator=gen)
    return list(stream[starts[..., None] + torch.arange(seq)].long())


def _sensitivity(model: nn.Module, calib: list[torch.Tensor], opts: BitwidthOptions, estimator: str,
                 quick: bool) -> Any:  # fmt: skip
    settings = SensitivitySettings(estimator=estimator, probes=2 if quick else 4)
    return measure_sensitivity(model, calib, opts.resolved_candidates(), settings)


def _plan(graph: Any, work: Workload, opts: BitwidthOptions) -> Plan:
    passes = passes_named(["bitwidth"])
    return run_pipeline(
        graph, load_hardware("cpu"), work, 1 << 40, "bench:bitwidth", passes, {"bitwidth": opts}
    )


def _pick(plan: Plan, label_of: Any) -> tuple[Any, ...]:
    """The formats a rule gives each weight (`label_of(weight name)` -> candidate label)."""
    names = {v.id: v.name for v in plan.tensors}
    bits = plan.decisions.bits
    assert bits is not None
    out = []
    for t in bits.candidates:
        c = t.candidate(label_of(names[t.value_id]))
        assert c is not None
        out.append(c)
    return tuple(out)


def _uniform(plan: Plan, label: str) -> tuple[Any, ...]:
    return _pick(plan, lambda _: label)


def _rule(plan: Plan) -> tuple[Any, ...]:
    return _pick(plan, lambda n: "int8-ch-sym" if any(a in n for a in ATTENTION) else "int4-g128-asym")


def _bytes(choice: tuple[Any, ...]) -> int:
    return sum(c.stored_bytes for c in choice)


def _with(plan: Plan, choice: tuple[Any, ...]) -> Plan:
    """`plan` storing `choice` (candidate costs, one per weight; () keeps every weight float)."""
    bits = plan.decisions.bits
    assert bits is not None
    tensors = tuple(c.bits for c in choice if not c.label.startswith("fp32"))
    return rebased(plan.with_(decisions=plan.decisions.with_(bits=replace(bits, tensors=tensors))))


@torch.no_grad()
def _evaluate(model: nn.Module, evals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every position of every window."""
    return [torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), -1) for ids in evals]


def _row(config: str, plan: Plan, model: nn.Module, evals: list[torch.Tensor], reference: list[torch.Tensor],
         fp32: int, rows_of: Any) -> dict[str, Any]:  # fmt: skip
    bits = plan.decisions.bits
    assert bits is not None
    chosen = {b.value_id: b for b in bits.tensors}
    picked = [next(c for c in t.candidates if c.bits == chosen.get(t.value_id, t.candidates[0].bits))
              for t in rows_of]  # fmt: skip
    stored = copy.deepcopy(model)
    if bits.tensors:
        quantize_model(plan, stored)
    logp = _evaluate(stored, evals)
    nll, ref_nll = _nll(logp, evals), _nll(reference, evals)
    pairs = list(zip(reference, logp, strict=True))
    kl = sum(float((r.exp() * (r - lp)).sum(-1).mean()) for r, lp in pairs)
    agree = sum(float((r.argmax(-1) == lp.argmax(-1)).float().mean()) for r, lp in pairs)
    n = len(evals)
    size = sum(c.stored_bytes for c in picked)
    labels: dict[str, int] = {}
    for c in picked:
        labels[c.label] = labels.get(c.label, 0) + 1
    return {
        "config": config, "bytes": size, "of_fp32": round(size / fp32, 4),
        "pred_dloss": sum(c.cost for c in picked), "loss": nll / n, "dloss": (nll - ref_nll) / n,
        "ppl": math.exp(nll / n), "kl": kl / n, "agree": agree / n,
        "formats": ", ".join(f"{k} {v}" for k, v in sorted(labels.items())),
    }  # fmt: skip


def _nll(logp: list[torch.Tensor], evals: list[torch.Tensor]) -> float:
    """Summed over batches: the mean negative log-likelihood of each batch's next tokens."""
    return sum(float(-lp.gather(-1, ids[:, 1:, None]).mean()) for lp, ids in zip(logp, evals, strict=True))


def _notes(name: str, trained: str, context: int, calib: list[torch.Tensor], evals: list[torch.Tensor],
           tables: dict[str, Any], elapsed: float, rows: list[dict[str, Any]]) -> list[str]:  # fmt: skip
    by = {r["config"]: r for r in rows}
    better = [
        f"at {k.split('@ ')[1]}: memplan dloss {by[k]['dloss']:.4f} vs {b} {by[b]['dloss']:.4f}"
        for k, b in (("memplan @ int4 bytes", "int4"), ("memplan @ rule bytes", "rule"))
    ]
    return [
        f"model: {name}, {trained}; context {context}; loss in nats per byte (tokens are bytes)",
        f"calibration: {len(calib)} batches of {tuple(calib[0].shape)} training windows; evaluation: "
        f"{len(evals)} batches of {tuple(evals[0].shape)} held-out windows",
        f"sensitivity: {tables['hutchinson'].description}; fisher: {tables['fisher'].description}",
        "equal bytes: " + "; ".join(better),
        "bytes: stored weights (codes, scales, zero points) of the quantizable weights only (Linear/Conv1D; "
        "the tied embedding and norms stay fp32); of_fp32: their share of the fp32 bytes",
        "kl: mean KL(float || quantized) of the next-token distribution; agree: share of positions whose "
        "argmax equals the float model's",
        f"total {elapsed:.0f} s on this machine, {THREADS} torch thread",
    ]
