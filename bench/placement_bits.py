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
from dataclasses import dataclass, replace
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
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    shares: tuple[float, ...] = (0.5, 0.25)
    """Joint and sequential points at these fractions of seq-fit's sensitivity."""
    probes: int = 4
    calib_batches: int = 4
    eval_batches: int = 8
    train_steps: int = 1200
    calibrate_bytes: int = 32 << 20
    time_limit_s: float = 20.0


FULL = Config()
QUICK = Config(gen=12, fractions=(0.25, 0.5), shares=(0.5,), probes=2, calib_batches=2, eval_batches=4,
               train_steps=240, calibrate_bytes=16 << 20, time_limit_s=10.0)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Helpers (tests/bench/test_placement_bits.py)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sensitivity_table(model: nn.Module, calib: list[torch.Tensor], probes: int) -> SensitivityTable:
    """The bitwidth pass's Hutchinson table for its default candidates, on the generation model's names."""
    settings = SensitivitySettings(estimator="hutchinson", probes=probes)
    return measure_sensitivity(model, calib, BitwidthOptions().resolved_candidates(), settings)


def priced(model: nn.Module, ids: torch.Tensor, hw: Hardware, gen: int, table: SensitivityTable) -> BitsDecision:
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
                    table: SensitivityTable, size_limit: int | None, time_limit_s: float = 10.0) -> Plan:  # fmt: skip
    """The bitwidth pass (size limit None: what fits the device budget), then placement."""
    opts = BitwidthOptions(size_limit_bytes=size_limit, sensitivity=table, time_limit_s=time_limit_s)
    return memplan.plan(model, ids, mode="infer", budget=budget, hardware=hw, gen=gen, passes=PASSES_SEQ,
                        options={"bitwidth": opts})  # fmt: skip


def plan_joint(model: nn.Module, ids: torch.Tensor, hw: Hardware, gen: int, budget: int,
               cands: dict[int, tuple[Candidate, ...]], limit: float, time_limit_s: float = 10.0) -> Plan:  # fmt: skip
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


def size_for_sensitivity(bits: BitsDecision, limit: float) -> int:
    """The smallest size limit under which the bitwidth pass's optimum stays within `limit` nats
    (bisection over bytes, to 0.1% of the float bytes)."""
    lo = sum(min(c.stored_bytes for c in t.candidates) for t in bits.candidates)
    hi = sum(t.candidates[0].stored_bytes for t in bits.candidates)
    if bits_only_sensitivity(bits, lo) <= limit:
        return lo
    tol = max(hi // 1000, 1)
    while hi - lo > tol:
        mid = (lo + hi) // 2
        if bits_only_sensitivity(bits, mid) <= limit:
            hi = mid
        else:
            lo = mid
    return hi


def generate_under(plan: Plan, model: nn.Module, ids: torch.Tensor, gen: int) -> dict[str, Any]:
    """Run `model.generate` under `plan`: the runtime's measured decode tok/s and peak, and the plan's."""
    with memplan.applied(plan, model) as run:
        out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
    m = run.finish()
    cmp = plan.compare(m)
    budget = plan.budget_bytes["device"]
    return {
        "pred_tok/s": cmp.tok_s("decode", False),
        "meas_tok/s": m.decode_tok_s,
        "pred_peak": cmp.predicted_peak_bytes,
        "peak": m.peak_bytes,
        "peak/budget": m.peak_bytes / budget,
        "within_budget": cmp.within_budget,
        "tokens": out[0, ids.shape[1]:].tolist(),
        "bytes_read": sum(m.bytes_read.values()),
    }


@torch.no_grad()
def log_probs(model: nn.Module, evals: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), -1) for ids in evals]


def quality(plan: Plan, model: nn.Module, evals: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """Held-out perplexity and next-token agreement with the float model, stored as `plan` says."""
    from memplan.runtime.quantized import quantize_model

    stored = copy.deepcopy(model)
    if plan.decisions.bits is not None and plan.decisions.bits.tensors:
        quantize_model(plan, stored)
    logp = log_probs(stored, evals)
    nll = sum(float(-lp.gather(-1, ids[:, 1:, None]).mean()) for lp, ids in zip(logp, evals, strict=True))
    agree = sum(float((r.argmax(-1) == lp.argmax(-1)).float().mean()) for r, lp in zip(reference, logp, strict=True))
    return {"ppl": math.exp(nll / len(evals)), "agree": agree / len(evals), "nll": nll / len(evals)}


def windows(stream: torch.Tensor, batches: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq - 1, (batches, batch), generator=gen)
    return list(stream[starts[..., None] + torch.arange(seq)].long())
