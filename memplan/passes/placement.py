"""The `placement` pass: which tier holds each weight tensor and each layer's KV cache during a generation,
and when its device copies are prefetched and evicted, for the most tokens per second within every tier's
budget.

It reads the units and costs off the generation graph (`placement_model`), solves the MILP of
`placement_formulation` (identical layers once, as counts) within its time limit, spreads the counts over
the layers, and writes the `PlacementDecision`: a tensor off the device is read into a device buffer
`lookahead` unit calls before each use and dropped after it (uses close enough share one copy). Residency
follows (`baseline_residency`), and the predicted time comes from replaying the schedule with one
transfer queue per tier: a copy starts when its step starts and its tier's link is free, an op starts when
the op before it is done and its copies have arrived, and on a CPU device the transfers also slow the op
by their compute share. Activations and workspaces stay on the device (they are what the device computes
on; between units a generation carries only a few hidden states).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from memplan.errors import InfeasibleBudget, InvalidInput
from memplan.ir.analysis import lifetimes
from memplan.ir.cost import op_time_s
from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.passes.base import PassOutput, PassSpec
from memplan.passes.placement_formulation import Choice, least_device_bytes, solve
from memplan.passes.placement_joint import Candidate, solve_joint
from memplan.passes.placement_model import (
    GenerationModel,
    fixed_bytes,
    fixed_live,
    is_generation,
    read_model,
    spread,
)
from memplan.passes.remat_schedule import compute_share
from memplan.plans.decisions import BitsDecision, Decisions, DeviceCopy, PlacementDecision, TensorPlacement
from memplan.plans.effective import (
    baseline_residency,
    generation_times,
    predictions_for,
)
from memplan.plans.plan import Event, PassReport, Plan, SolverReport
from memplan.solvers.milp import MilpResult
from memplan.units import format_size

NAME = "placement"


@dataclass(frozen=True, slots=True)
class PlacementOptions:
    """`kv_tiers`: tiers the KV caches may live on besides the device (a layer's cache then comes back
    before the layer runs and leaves after it); `lookahead`: unit calls between a copy's prefetch and its
    use."""

    time_limit_s: float = 10.0
    kv_tiers: tuple[str, ...] = ("host", "cxl")
    lookahead: int = 1
    bits_candidates: dict[int, tuple[Candidate, ...]] | None = None
    """Value id -> the ways its weight may be stored (format, sensitivity, stored bytes): with them, bits
    and tiers are decided together (`placement_joint`), the plan's bits decision included."""
    sensitivity_limit: float = 0.0
    """The joint mode's limit on the total sensitivity of the chosen formats."""


def run(graph: Graph, hardware: Hardware, plan: Plan, options: PlacementOptions | None = None) -> PassOutput:
    """Place a generation's weights and KV caches (see the module docstring)."""
    opts = options or PlacementOptions()
    t0 = time.perf_counter()
    if not is_generation(graph):
        note = "nothing placed: placement plans a generation (mode infer with gen > 0)"
        return PassOutput(plan, PassReport(NAME, 0.0, SolverReport("none", "trivial"), (note,)))
    w = plan.workload
    model = read_model(graph, hardware, w.gen, w.seq or 1)
    budgets = dict(plan.budget_bytes)
    if opts.bits_candidates is not None:
        return _run_joint(graph, hardware, plan, opts, model, t0)
    result, choice = solve(model, hardware, budgets, opts.kv_tiers, opts.time_limit_s)
    if choice is None:
        raise _infeasible(plan, model, hardware, opts)
    tiers = _tiers_of(model, choice)
    return _finish(graph, hardware, plan, opts, tiers, result, t0, plan.decisions)


def _finish(
    graph: Graph, hardware: Hardware, plan: Plan, opts: PlacementOptions, tiers: dict[int, str],
    result: MilpResult, t0: float, decisions: Decisions, extra: tuple[str, ...] = (),
) -> PassOutput:  # fmt: skip
    """The plan with `tiers` placed (copies, residency, replayed events, predictions) and its report."""
    w = plan.workload
    placed = _placements(graph, tiers, opts.lookahead)
    decided = plan.with_(decisions=decisions.with_(placement=PlacementDecision(tuple(placed))))
    graph = decided.graph()
    residency = tuple(baseline_residency(decided))
    events = _replay(graph, hardware, placed)
    predictions = predictions_for(graph, residency, events)
    new_plan = decided.with_(residency=residency, events=tuple(events), predictions=predictions)
    report = SolverReport(
        "highs-milp", result.status, result.objective, result.bound, result.gap, result.time_s,
        opts.time_limit_s,
    )  # fmt: skip
    return PassOutput(
        new_plan,
        PassReport(NAME, time.perf_counter() - t0, report, (*_notes(graph, tiers, events, w.batch), *extra)),
    )


def _run_joint(
    graph: Graph, hardware: Hardware, plan: Plan, opts: PlacementOptions, model: GenerationModel, t0: float
) -> PassOutput:
    """Bits and tiers together (see `placement_joint`); KV caches stay on the device."""
    if plan.decisions.bits is not None:
        raise InvalidInput("joint placement decides the bits itself: run it without the bitwidth pass")
    assert opts.bits_candidates is not None
    kv = sum(graph.value(v).size_bytes for v in model.kv_values.values())
    candidates = {v: list(c) for v, c in opts.bits_candidates.items()}
    unit_fixed = _unit_fixed(graph)
    result, choice = solve_joint(
        graph, hardware, dict(plan.budget_bytes), fixed_bytes(graph) + kv, candidates, opts.sensitivity_limit,
        plan.workload.gen, opts.time_limit_s, {u: b + kv for u, b in unit_fixed.items()},
    )  # fmt: skip
    if choice is None:
        raise InfeasibleBudget(
            f"no storage formats and tiers fit the budgets ({_budgets_text(plan)}) "
            f"within the sensitivity limit {opts.sensitivity_limit:g} (solver: {result.status}); raise the "
            "limit or a budget",
            plan.budget_bytes["device"], plan.budget_bytes["device"], [],
        )  # fmt: skip
    chosen = [
        opts.bits_candidates[v][f].bits for v, f in choice.candidate.items() if v in opts.bits_candidates
    ]
    bits = BitsDecision(tuple(b for b in chosen if b is not None))
    decisions = plan.decisions.with_(bits=bits)
    note = f"joint bits: {len(bits.tensors)} tensors quantized, total sensitivity {choice.sensitivity:.6g}"
    return _finish(graph, hardware, plan, opts, choice.tier, result, t0, decisions, (note,))


def _unit_fixed(graph: Graph) -> dict[str, int]:
    """Unit -> the most the storages placement leaves where they are (activations, workspaces) take at any
    of its calls, before the dequantize transients of the formats the joint MILP chooses (it adds those per
    unit: `placement_joint`)."""
    out: dict[str, int] = {}
    for op, live in zip(graph.ops, fixed_live(graph), strict=True):
        if op.target.startswith("unit:"):
            out[op.module_path] = max(out.get(op.module_path, 0), live)
    return out


def _budgets_text(plan: Plan) -> str:
    return ", ".join(f"{t} {format_size(b)}" for t, b in plan.budget_bytes.items())


def _tiers_of(model: GenerationModel, choice: Choice) -> dict[int, str]:
    """Value id -> tier, for every placed weight and KV cache (device included)."""
    out: dict[int, str] = dict(choice.other_tiers)
    for c, cls in enumerate(model.classes):
        for j, suffix in enumerate(cls.suffixes):
            for layer, tier in zip(cls.layers, spread(choice.layer_tiers[(c, j)]), strict=True):
                out[model.layer_values[(layer, suffix)]] = tier
        if c in choice.kv_tiers:
            for layer, tier in zip(cls.layers, spread(choice.kv_tiers[c]), strict=True):
                out[model.kv_values[layer]] = tier
    return out


def _placements(graph: Graph, tiers: dict[int, str], lookahead: int) -> list[TensorPlacement]:
    """A `TensorPlacement` per storage off the device, with a device copy around each use."""
    spans = lifetimes(graph)
    out = []
    for vid, tier in sorted(tiers.items()):
        if tier == "device":
            continue
        start = spans[vid][0]
        uses = sorted(
            {start, *graph.consumers(vid)} if graph.producer(vid) is not None else graph.consumers(vid)
        )
        copies: list[DeviceCopy] = []
        for use in uses:
            begin = max(use - lookahead, 0, start)
            if copies and begin <= copies[-1].evict_step + 1:
                copies[-1] = DeviceCopy(copies[-1].prefetch_step, use)
            else:
                copies.append(DeviceCopy(begin, use))
        out.append(TensorPlacement(vid, tier, copies=tuple(copies)))
    return out


def _replay(graph: Graph, hw: Hardware, placed: list[TensorPlacement]) -> list[Event]:
    """Compute, prefetch and evict events with their times (see the module docstring)."""
    issue: dict[int, list[tuple[TensorPlacement, DeviceCopy]]] = defaultdict(list)
    evict: dict[int, list[int]] = defaultdict(list)
    covering: dict[tuple[int, int], int] = {}
    """(value id, use step) -> prefetch step of the copy that serves it."""
    for p in placed:
        for c in p.copies:
            issue[c.prefetch_step].append((p, c))
            evict[c.evict_step].append(p.value_id)
    for p in placed:
        for c in p.copies:
            for use in graph.consumers(p.value_id):
                if c.prefetch_step <= use <= c.evict_step:
                    covering[(p.value_id, use)] = c.prefetch_step
    link_free: dict[str, float] = {}
    arrival: dict[tuple[int, int], float] = {}
    events: list[Event] = []
    done = 0.0
    for step, op in enumerate(graph.ops):
        slowdown = 0.0
        for p, c in issue.get(step, ()):
            tier = hw.tier(p.tier)
            produced_here = graph.producer(p.value_id) == c.prefetch_step
            took = (
                0.0 if produced_here else graph.value(p.value_id).size_bytes / tier.read_bw + tier.latency_s
            )
            begin = max(link_free.get(p.tier, 0.0), done)
            link_free[p.tier] = begin + took
            arrival[(p.value_id, c.prefetch_step)] = begin + took
            slowdown += compute_share(hw, tier) * took
            events.append(Event("prefetch", step, value_id=p.value_id, src_tier=p.tier, dst_tier="device",
                                start_s=begin, duration_s=took))  # fmt: skip
        keys = [(vid, covering[(vid, step)]) for vid in op.inputs if (vid, step) in covering]
        start = max([done, *(arrival[k] for k in keys)])
        took = op_time_s(op, hw) + slowdown
        events.append(Event("compute", step, op_id=op.id, start_s=start, duration_s=took))
        done = start + took
        events += [
            Event("evict", step, value_id=vid, src_tier="device", start_s=done) for vid in evict.get(step, ())
        ]
    return events


def _notes(graph: Graph, tiers: dict[int, str], events: list[Event], batch: int) -> tuple[str, ...]:
    by_tier: dict[str, int] = {}
    for vid, tier in tiers.items():
        by_tier[tier] = by_tier.get(tier, 0) + graph.value(vid).size_bytes
    prefill, decode = generation_times(graph, events)
    prompt = graph.value(next(v.id for v in graph.values if v.name == "input_ids")).shape[1]
    notes = [
        "weights and KV caches: " + ", ".join(f"{t} {format_size(b)}" for t, b in sorted(by_tier.items())),
        f"predicted prefill {prefill:.4f} s ({batch * prompt / prefill if prefill else 0:.1f} tok/s), decode "
        f"{decode:.4f} s per token ({batch / decode if decode else 0:.1f} tok/s at batch {batch})",
    ]
    return tuple(notes)


def _infeasible(plan: Plan, model: GenerationModel, hw: Hardware, opts: PlacementOptions) -> InfeasibleBudget:
    """The budget is below the least any placement needs (solved exactly: the same MILP, minimising the
    device bytes), with what makes it up: the two consecutive units that stream the most (the one computing
    and the next arriving), the fixed activations and workspaces, and the KV caches that must stay on the
    device; or the other tiers cannot hold the weights."""
    budget = plan.budget_bytes["device"]
    need, result = least_device_bytes(model, hw, dict(plan.budget_bytes), opts.kv_tiers, opts.time_limit_s)
    weights = sum(sum(c.sizes) * c.count for c in model.classes) + sum(sum(o.sizes) for o in model.others)
    if need is None:
        msg = (
            f"the weights ({format_size(weights)}) and KV caches do not fit the tiers' budgets together "
            f"({', '.join(f'{t} {format_size(b)}' for t, b in plan.budget_bytes.items())}); add a tier or "
            "raise a budget"
        )
        return InfeasibleBudget(msg, weights, sum(plan.budget_bytes.values()), [])
    kv_off = any(t in plan.budget_bytes for t in opts.kv_tiers)
    size = {
        **{("class", c): (f"{cls.path} (one of {cls.count} alike)",
                          sum(cls.sizes) + (cls.kv_bytes if kv_off else 0))
           for c, cls in enumerate(model.classes)},
        **{("other", u): (o.path, sum(o.sizes)) for u, o in enumerate(model.others)},
    }  # fmt: skip
    seq = list(model.sequence)
    pairs = [(size[a], size[b]) for a, b in zip(seq, seq[1:] + seq[:1], strict=True)]
    (name_a, a), (name_b, b) = max(pairs, key=lambda p: p[0][1] + p[1][1])
    kv_dev = 0 if kv_off else sum(cls.kv_bytes * cls.count for cls in model.classes)
    room = sum(b for t, b in plan.budget_bytes.items() if t != "device")
    if weights > room:
        others = ", ".join(f"{t} {format_size(b)}" for t, b in plan.budget_bytes.items() if t != "device")
        kv_dev += weights - room
        name_a = (
            f"the weights the other tiers ({others}) cannot take, {format_size(weights - room)}; {name_a}"
        )
    w = plan.workload
    proven = "" if result.status == "optimal" else f" (a proven bound: the solver stopped, {result.status})"
    msg = (
        f"device budget {format_size(budget)} is below the least any placement needs to generate with "
        f"{plan.model.name} at batch {w.batch}, prompt {w.seq}, gen {w.gen}: {format_size(need)}{proven}. "
        f"It is made of the activations and workspaces ({format_size(model.fixed_bytes)})"
        + (f", the KV caches, which no host or CXL tier can take ({format_size(kv_dev)})" if kv_dev else "")
        + f", and the prefetch window: the two consecutive units that stream the most, {name_a} "
        f"({format_size(a)}) computing while {name_b} ({format_size(b)}) arrives. Raise the budget to at "
        f"least {format_size(need)}, or lower the batch or prompt."
    )
    return InfeasibleBudget(
        msg, need, budget, [f"{name_a} ({format_size(a)})", f"{name_b} ({format_size(b)})"]
    )


PASS = PassSpec(
    NAME, run, PlacementOptions, before=frozenset({"placement", "allocate"}),
    ensures=frozenset({"device-budget"}), modes=frozenset({"generate"}),
)  # fmt: skip
