"""Joint bits + placement against bits-then-placement, at equal device budgets, on a trained zoo LM.

    .venv/bin/python -m bench.run placement_bits [--quick]

Model: the zoo's trained tiny-lm when its weights are cached, else gpt2-tiny trained here briefly as
`bench.bitwidth._model` does (quantization must have accuracy to lose). Hardware: the `cpu` preset
calibrated on this machine (`memplan.runtime.calibrate`: FLOP/s, memory bandwidth, the SSD tier's O_DIRECT
read bandwidth), as `bench/placement` plans with. Workload: batch 1, a prompt of `prompt` bytes of held-out
text, `gen` new tokens greedily (min_new_tokens = max_new_tokens).

Budgets, as `bench/placement` sets them but for a model whose activations and KV caches are not negligible
next to its weights: `rest + f x W`, W the fp32 weights' bytes, `rest` what the float plan with every weight
on the device needs besides its weights (activations, KV caches, workspaces), f in `fractions`.

One sensitivity measurement serves every configuration: the bitwidth pass's Hutchinson table
(`memplan.planner.sensitivity`, curvature / 2 x squared quantization error per format, in nats), priced on
the generation graph by the bitwidth pass itself (`decisions.bits.candidates`), and converted one to one
into the joint formulation's candidates (`joint_candidates`). Configurations at each budget:

    float          the placement pass alone (no bits): the reference for quality and, where it fits, speed
    seq-fit        bits then placement as a user would run it: the bitwidth pass with its default size
                   limit (what makes the weights fit the device budget: the budget less everything else),
                   then the placement pass on the quantized sizes
    joint @ seq    the placement pass with `bits_candidates`, sensitivity limit = seq-fit's total
                   sensitivity: the speed of the two at equal predicted quality
    joint @ x S    the joint pass at a fraction x of seq-fit's sensitivity (more precision, some weights
                   streamed), and
    seq @ x S      bits then placement at the same sensitivity: the bitwidth pass with the smallest size
                   limit whose optimum is within it (bisection), then placement; the fair sequential
                   counterpart of each joint point (equal total sensitivity, equal budget)

Each plan runs for real: `with memplan.applied(plan, model) as run: model.generate(...)`; the measured
decode tok/s and peak are the runtime's (`run.finish()`), next to the plan's prediction. Quality: held-out
perplexity (nats per byte, exponentiated) and next-token agreement with the float model on fixed windows
of tiny-lm's validation text, the model quantized as the plan says (`memplan.runtime.quantized`).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import memplan
from bench.harness import Result, torch_threads
from memplan.errors import InfeasibleBudget
from memplan.ir.graph import Role
from memplan.ir.hardware import Hardware, load_hardware
from memplan.passes.bitwidth import BitwidthOptions
from memplan.passes.bitwidth_problem import SensitivityTable
from memplan.passes.placement import PlacementOptions
from memplan.passes.placement_joint import Candidate
from memplan.planner.sensitivity import SensitivitySettings, measure_sensitivity
from memplan.plans.decisions import BitsDecision
from memplan.plans.plan import Plan
from memplan.units import format_size
from memplan.zoo import tiny_lm

THREADS = 1
COLUMNS = [
    "budget", "config", "pred_tok/s", "meas_tok/s", "peak/budget", "ppl", "agree", "sensitivity",
    "streamed_KiB", "formats",
]  # fmt: skip


@dataclass(frozen=True)
class Config:
    prompt: int = 32
    gen: int = 24
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    shares: tuple[float, ...] = (0.5, 0.25)
    """Joint and sequential points at these fractions of seq-fit's sensitivity."""
    probes: int = 4
    calib_batches: int = 4
    eval_batches: int = 8
    train_steps: int = 1200
    calibrate_bytes: int = 32 << 20
    time_limit_s: float = 20.0
    repeats: int = 2


FULL = Config()
QUICK = Config(gen=12, fractions=(0.25, 0.5), shares=(0.5,), probes=2, calib_batches=2, eval_batches=4,
               train_steps=240, calibrate_bytes=16 << 20, time_limit_s=10.0, repeats=1)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Helpers (tests/bench/test_placement_bits.py)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sensitivity_table(model: nn.Module, calib: list[torch.Tensor], probes: int) -> SensitivityTable:
    """The bitwidth pass's Hutchinson table for its default candidates, on the generation model's names."""
    settings = SensitivitySettings(estimator="hutchinson", probes=probes)
    return measure_sensitivity(model, calib, BitwidthOptions().resolved_candidates(), settings)


def priced(model: nn.Module, ids: torch.Tensor, hw: Hardware, gen: int,
           table: SensitivityTable) -> BitsDecision:  # fmt: skip
    """Every quantizable weight's formats priced by the bitwidth pass on the generation graph (no limit)."""
    opts = BitwidthOptions(size_limit_bytes=1 << 50, sensitivity=table)
    plan = memplan.plan(model, ids, mode="infer", budget=1 << 50, hardware=hw, gen=gen,
                        passes=["bitwidth"], options={"bitwidth": opts})  # fmt: skip
    assert plan.decisions.bits is not None
    return plan.decisions.bits


def joint_candidates(bits: BitsDecision) -> dict[int, tuple[Candidate, ...]]:
    """The bitwidth pass's priced candidates as the joint formulation's: the captured dtype (the first,
    cost 0) as `bits` None, every other format with the same cost and stored bytes."""
    out = {}
    for t in bits.candidates:
        own, *rest = t.candidates
        out[t.value_id] = (Candidate(None, 0.0, own.stored_bytes),
                           *(Candidate(c.bits, c.cost, c.stored_bytes) for c in rest))  # fmt: skip
    return out


def total_sensitivity(plan: Plan, cands: dict[int, tuple[Candidate, ...]]) -> float:
    """The summed cost of the formats `plan` stores its weights in (0 for a float plan)."""
    bits = plan.decisions.bits
    chosen = {b.value_id: b for b in bits.tensors} if bits else {}
    return sum(next(c.cost for c in cands[v] if c.bits == b) for v, b in chosen.items())


def formats_of(plan: Plan) -> str:
    bits = plan.decisions.bits
    labels: dict[str, int] = {}
    for b in bits.tensors if bits else ():
        key = b.format + (f"-g{b.group_size}" if b.group_size else "") + ("" if b.symmetric else "a")
        labels[key] = labels.get(key, 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(labels.items())) or "float"


def streamed_bytes(plan: Plan) -> int:
    """Bytes of the weights the plan keeps off the device (stored sizes)."""
    graph = plan.graph()
    placed = plan.decisions.placement
    return sum(graph.value(p.value_id).size_bytes for p in placed.tensors
               if graph.value(p.value_id).role == Role.PARAMETER) if placed else 0  # fmt: skip


def rest_bytes(plan: Plan) -> int:
    """What `plan` needs on the device besides its weights (activations, KV caches, workspaces, the
    dequantize transients of quantized weights), when planned with every weight on the device."""
    graph = plan.graph()
    weights = sum(v.size_bytes for v in graph.values if v.role == Role.PARAMETER and v.alias_of is None)
    return plan.predictions.peak_bytes["device"] - weights


def rests(model: nn.Module, ids: torch.Tensor, hw: Hardware, gen: int, table: SensitivityTable,
          bits: BitsDecision) -> tuple[int, int]:  # fmt: skip
    """(`rest_bytes` of the float plan, of a plan storing every quantizable weight in an integer format:
    the most any choice of formats needs besides the weights, see `PlacementOptions` workspaces)."""
    huge = 1 << 50
    float_rest = rest_bytes(plan_float(model, ids, hw, gen, huge))
    least = sum(min(c.stored_bytes for c in t.candidates) for t in bits.candidates)
    return float_rest, rest_bytes(plan_sequential(model, ids, hw, gen, huge, table, least))


PASSES_FLOAT = ["placement", "allocate"]
PASSES_SEQ = ["bitwidth", "placement", "allocate"]


def plan_float(model: nn.Module, ids: torch.Tensor, hw: Hardware, gen: int, budget: int) -> Plan:
    return memplan.plan(model, ids, mode="infer", budget=budget, hardware=hw, gen=gen, passes=PASSES_FLOAT)


def plan_sequential(model: nn.Module, ids: torch.Tensor, hw: Hardware, gen: int, budget: int,
                    table: SensitivityTable, size_limit: int | None,
                    time_limit_s: float = 10.0) -> Plan:  # fmt: skip
    """The bitwidth pass (size limit None: what fits the device budget), then placement."""
    opts = BitwidthOptions(size_limit_bytes=size_limit, sensitivity=table, time_limit_s=time_limit_s)
    return memplan.plan(model, ids, mode="infer", budget=budget, hardware=hw, gen=gen, passes=PASSES_SEQ,
                        options={"bitwidth": opts})  # fmt: skip


def plan_joint(model: nn.Module, ids: torch.Tensor, hw: Hardware, gen: int, budget: int,
               cands: dict[int, tuple[Candidate, ...]], limit: float,
               time_limit_s: float = 10.0) -> Plan:  # fmt: skip
    opts = PlacementOptions(bits_candidates=dict(cands), sensitivity_limit=limit, time_limit_s=time_limit_s)
    return memplan.plan(model, ids, mode="infer", budget=budget, hardware=hw, gen=gen, passes=PASSES_FLOAT,
                        options={"placement": opts})  # fmt: skip


def bits_only_sensitivity(bits: BitsDecision, size_limit: int) -> float:
    """The least total sensitivity the bitwidth pass reaches under `size_limit` (its ILP, off the plan)."""
    from memplan.solvers.multiple_choice import Choice, ChoiceProblem, Layer, Usage, solve_multiple_choice

    layers = tuple(Layer(str(t.value_id), tuple(Choice(c.label, c.cost, float(c.stored_bytes), 0.0, 0.0)
                                                for c in t.candidates)) for t in bits.candidates)  # fmt: skip
    index = {t.value_id: i for i, t in enumerate(bits.candidates)}
    ties = tuple((index[g[0]], index[v]) for g in bits.ties for v in g[1:])
    sol = solve_multiple_choice(ChoiceProblem(layers, ties, Usage(float(size_limit), None, None)), 10.0)
    return math.inf if sol.objective is None else float(sol.objective)


SOLVER_TOLERANCE = 1e-6
"""Costs below this share of the largest candidate cost are within HiGHS's tolerances (it solves the
problems with costs scaled to the largest): sensitivities compare equal within it."""


def size_for_sensitivity(bits: BitsDecision, limit: float) -> int:
    """The smallest size limit under which the bitwidth pass's optimum stays within `limit` nats (bisection
    over bytes, to 0.1% of the float bytes; within `SOLVER_TOLERANCE`)."""
    lo = sum(min(c.stored_bytes for c in t.candidates) for t in bits.candidates)
    hi = sum(t.candidates[0].stored_bytes for t in bits.candidates)
    slack = SOLVER_TOLERANCE * max(c.cost for t in bits.candidates for c in t.candidates)
    if bits_only_sensitivity(bits, lo) <= limit + slack:
        return lo
    tol = max(hi // 1000, 1)
    while hi - lo > tol:
        mid = (lo + hi) // 2
        if bits_only_sensitivity(bits, mid) <= limit + slack:
            hi = mid
        else:
            lo = mid
    return hi


def generate_under(
    plan: Plan, model: nn.Module, ids: torch.Tensor, gen: int, repeats: int = 1
) -> dict[str, Any]:
    """Run `model.generate` under `plan` `repeats` times: the runtime's measured decode tok/s (the best
    run's: the machine is shared) and peak (the largest), and the plan's predictions."""
    runs = []
    for _ in range(repeats):
        with memplan.applied(plan, model) as run:
            out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
        runs.append(run.finish())
    m = max(runs, key=lambda r: r.decode_tok_s)
    m.peak_bytes = max(r.peak_bytes for r in runs)
    cmp = plan.compare(m)
    budget = plan.budget_bytes["device"]
    return {
        "pred_tok/s": cmp.tok_s("decode", False),
        "meas_tok/s": m.decode_tok_s,
        "meas_runs_tok/s": [r.decode_tok_s for r in runs],
        "pred_peak": cmp.predicted_peak_bytes,
        "peak": m.peak_bytes,
        "peak/budget": m.peak_bytes / budget,
        "within_budget": cmp.within_budget,
        "tokens": out[0, ids.shape[1] :].tolist(),
        "bytes_read": sum(m.bytes_read.values()),
    }


@torch.no_grad()
def log_probs(model: nn.Module, evals: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), -1) for ids in evals]


def quality(plan: Plan, model: nn.Module, evals: list[torch.Tensor],
            reference: list[torch.Tensor]) -> dict[str, float]:  # fmt: skip
    """Held-out perplexity and next-token agreement with the float model, stored as `plan` says."""
    from memplan.runtime.quantized import quantize_model

    stored = copy.deepcopy(model)
    if plan.decisions.bits is not None and plan.decisions.bits.tensors:
        quantize_model(plan, stored)
    logp = log_probs(stored, evals)
    nll = sum(float(-lp.gather(-1, ids[:, 1:, None]).mean()) for lp, ids in zip(logp, evals, strict=True))
    pairs = zip(reference, logp, strict=True)
    agree = sum(float((r.argmax(-1) == lp.argmax(-1)).float().mean()) for r, lp in pairs)
    return {"ppl": math.exp(nll / len(evals)), "agree": agree / len(evals), "nll": nll / len(evals)}


def windows(stream: torch.Tensor, batches: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq - 1, (batches, batch), generator=gen)
    return list(stream[starts[..., None] + torch.arange(seq)].long())


# ---------------------------------------------------------------------------------------------------
# The benchmark


def _model(corpus: tiny_lm.Corpus, steps: int) -> tuple[str, nn.Module, int, str]:
    from bench.bitwidth import _model as trained

    name, model, context, how = trained(corpus, steps)
    return name, model, context, how


def _log(msg: str) -> None:
    print(f"[placement_bits] {msg}", file=sys.stderr, flush=True)


def run(quick: bool = False, config: Config | None = None) -> Result:
    with torch_threads(THREADS):
        return _run(config or (QUICK if quick else FULL))


def _run(cfg: Config) -> Result:
    from memplan.runtime.calibrate import calibrate

    t0 = time.perf_counter()
    torch.manual_seed(0)
    corpus = tiny_lm.load_corpus()
    name, model, context, how = _model(corpus, cfg.train_steps)
    model.eval()
    hw, cal = calibrate(load_hardware("cpu"), sample_bytes=cfg.calibrate_bytes)
    calib = windows(corpus.train, cfg.calib_batches, 4, min(context, 128), seed=1)
    evals = windows(corpus.val, cfg.eval_batches, 4, context, seed=2)
    ids = windows(corpus.val, 1, 1, cfg.prompt, seed=3)[0]
    gen = cfg.gen
    table = sensitivity_table(model, calib, cfg.probes)
    bits = priced(model, ids, hw, gen, table)
    cands = joint_candidates(bits)
    reference = log_probs(model, evals)
    W = weight_bytes(model)
    rest_float, rest_q = rests(model, ids, hw, gen, table, bits)
    _log(f"{name}: weights {format_size(W)}, rest {format_size(rest_float)} (float) {format_size(rest_q)} "
         f"(quantized), set up in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    float_ref = generate_under(plan_float(model, ids, hw, gen, 1 << 50), model, ids, gen, cfg.repeats)
    rows: list[dict[str, Any]] = []
    ref_tokens = float_ref["tokens"]
    rows.append(_row("- (all on device)", "float, every weight resident", None, float_ref, None,
                     {"ppl": math.exp(_nll(reference, evals)), "agree": 1.0}, 0.0))  # fmt: skip
    for frac in cfg.fractions:
        budget = rest_q + int(frac * W)
        label = f"{frac:.0%} ({format_size(budget)})"
        _log(f"budget {label}")

        def point(config: str, make: Any, limit: float | None = None) -> dict[str, Any] | None:
            t1 = time.perf_counter()
            try:
                plan = make()
            except InfeasibleBudget as e:
                rows.append({"budget": label, "fraction": frac, "budget_bytes": budget, "config": config,
                             "notes": f"refused: {str(e)[:200]}"})  # fmt: skip
                _log(f"  {config}: refused")
                return None
            plan_s = time.perf_counter() - t1
            g = generate_under(plan, model, ids, gen, cfg.repeats)
            q = quality(plan, model, evals, reference)
            row = _row(label, config, frac, g, plan, q, total_sensitivity(plan, cands), budget, limit, plan_s)
            row["same_tokens_as_float"] = g["tokens"] == ref_tokens
            rows.append(row)
            _log(f"  {config}: pred {row['pred_tok/s']:.4g} meas {row['meas_tok/s']:.4g} tok/s, "
                 f"peak/budget {row['peak/budget']:.3f}, ppl {row['ppl']:.4f}, S {row['sensitivity']:.4g}, "
                 f"streamed {row['streamed_KiB']:.0f} KiB, {row['formats']}")  # fmt: skip
            return row

        tl = cfg.time_limit_s
        point("float", lambda: plan_float(model, ids, hw, gen, budget))
        point("seq (default limit)", lambda: plan_sequential(model, ids, hw, gen, budget, table, None, tl))
        fit = point(
            "seq-fit", lambda: plan_sequential(model, ids, hw, gen, budget, table, budget - rest_q, tl)
        )
        if fit is None:
            continue
        s_fit = fit["sensitivity"]
        point("joint @ seq-fit S", lambda: plan_joint(model, ids, hw, gen, budget, cands, s_fit, tl), s_fit)
        for x in cfg.shares:
            limit = x * s_fit
            size = size_for_sensitivity(bits, limit)
            point(
                f"joint @ {x:g} S", lambda: plan_joint(model, ids, hw, gen, budget, cands, limit, tl), limit
            )
            point(
                f"seq @ {x:g} S", lambda: plan_sequential(model, ids, hw, gen, budget, table, size, tl), limit
            )
    notes = _notes(cfg, name, how, hw, cal, W, rest_float, rest_q, rows, table, time.perf_counter() - t0)
    extra = {"weights_bytes": W, "rest_float_bytes": rest_float, "rest_quantized_bytes": rest_q,
             "hardware": {"flops": hw.flops, "mem_bw": hw.mem_bw,
                          "tiers": [(t.name, t.read_bw, t.latency_s) for t in hw.tiers]},
             "config": asdict(cfg)}  # fmt: skip
    return Result("placement_bits", f"Joint bits + placement vs bits-then-placement ({name}, CPU)", COLUMNS,
                  rows, notes, extra)  # fmt: skip


def _nll(logp: list[torch.Tensor], evals: list[torch.Tensor]) -> float:
    total = sum(float(-lp.gather(-1, ids[:, 1:, None]).mean()) for lp, ids in zip(logp, evals, strict=True))
    return total / len(evals)


def _row(label: str, config: str, frac: float | None, g: dict[str, Any], plan: Plan | None,
         q: dict[str, float], sens: float, budget: int | None = None, limit: float | None = None,
         plan_s: float = 0.0) -> dict[str, Any]:  # fmt: skip
    g = {k: v for k, v in g.items() if k != "tokens"}
    row: dict[str, Any] = {"budget": label, "fraction": frac, "budget_bytes": budget, "config": config} | g
    if budget is None:
        row["peak/budget"] = ""
    row |= {"ppl": q["ppl"], "agree": q["agree"], "sensitivity": sens, "sensitivity_limit": limit,
            "plan_s": plan_s}  # fmt: skip
    row["streamed_KiB"] = streamed_bytes(plan) / 1024 if plan else 0.0
    row["formats"] = formats_of(plan) if plan else "float"
    if plan is not None:
        graph = plan.graph()
        row["weights_stored_bytes"] = sum(v.size_bytes for v in graph.values
                                          if v.role == Role.PARAMETER and v.alias_of is None)  # fmt: skip
        report = next((p for p in plan.passes if p.name == "placement"), None)
        row["placement_notes"] = list(report.notes) if report else []
        row["solver"] = (report.solver.status, report.solver.time_s) if report else None
    return row


def _by(rows: list[dict[str, Any]], frac: float, config: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("fraction") == frac and r["config"] == config and "ppl" in r), None)


def _notes(cfg: Config, name: str, how: str, hw: Hardware, cal: Any, W: int, rest_float: int, rest_q: int,
           rows: list[dict[str, Any]], table: SensitivityTable, elapsed: float) -> list[str]:  # fmt: skip
    gains = []
    for frac in cfg.fractions:
        fit, joint = _by(rows, frac, "seq-fit"), _by(rows, frac, "joint @ seq-fit S")
        pairs = [(fit, joint, "seq-fit S")] + [
            (_by(rows, frac, f"seq @ {x:g} S"), _by(rows, frac, f"joint @ {x:g} S"), f"{x:g} S")
            for x in cfg.shares
        ]
        for s, j, at in pairs:
            if s and j:
                gains.append(
                    f"{frac:.0%} at {at}: predicted {j['pred_tok/s'] / s['pred_tok/s']:.2f}x, measured "
                    f"{j['meas_tok/s'] / s['meas_tok/s']:.2f}x; ppl joint {j['ppl']:.4f} vs seq "
                    f"{s['ppl']:.4f}; "
                    f"sensitivity {j['sensitivity']:.3g} vs {s['sensitivity']:.3g}"
                )
    held = [r for r in rows if r.get("budget_bytes") and "within_budget" in r]
    ssd = next(t for t in hw.tiers if t.name == "ssd")
    return [
        f"model: {name} ({how}); fp32 weights {format_size(W)}; batch 1, prompt {cfg.prompt} bytes of "
        f"held-out "
        f"text, {cfg.gen} new tokens greedily; decode tok/s = 1 / mean decode forward (the runtime's clock), "
        f"best of {cfg.repeats} runs",
        f"budgets: rest + fraction x fp32 weights, rest = {format_size(rest_q)}: what a plan needs "
        "besides its "
        f"weights when they are quantized (activations {format_size(rest_float)} incl. KV caches and "
        "workspaces, plus the reference path's dequantize transient of the largest weight, "
        "`TensorBits.dequant_workspace_bytes`)",
        "gain of joint over sequential at equal budget and equal sensitivity limit: " + "; ".join(gains),
        f"budget held (measured peak <= device budget): "
        f"{sum(r['within_budget'] for r in held)} of {len(held)} "
        "runs",
        f"sensitivity: {table.description}; one table for every configuration (the joint candidates are the "
        "bitwidth pass's priced candidates, `joint_candidates`)",
        "seq (default limit): the bitwidth pass's own size limit (budget less everything else before "
        "quantization) leaves out the dequantize transients its choice adds, so placement streams the "
        "excess; "
        "seq-fit: size limit = budget - rest, the weights fit beside those transients (a careful "
        "user's choice)",
        "seq @ x S: the bitwidth pass at the smallest size limit whose optimum is within x times seq-fit's "
        "sensitivity (bisection), then placement; joint @ x S: the joint pass with that sensitivity limit",
        f"hardware: cpu preset calibrated here ({cal.seconds:.1f} s): {hw.flops:.3g} FLOP/s, {hw.mem_bw:.3g} "
        f"B/s memory, SSD tier read {ssd.read_bw:.3g} B/s (O_DIRECT, CRC included)",
        f"total {elapsed:.0f} s, {THREADS} torch thread on 2 cores shared with other work",
    ]
