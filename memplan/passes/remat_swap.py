"""Pass `remat_swap`: for every activation a training step saves for its backward, keep it on the device,
swap it to a slower tier and prefetch it back, recompute it, or split it (swap a fraction of its rows and
recompute the rest, MEMO's token-wise split), so that the device's peak stays under the budget at the least
added step time (after MEMO, SIGMOD 2025, and Checkmate / Moccasin).

The decision space and its MILP are in `remat_formulation`; decoding the solution in `remat_decode`; an
infeasible budget is explained by `remat_diagnose`; the chosen decisions become residency, events and a
`RematDecision` in `remat_schedule`. Candidates (saved activations) come from `remat_candidates`,
checkpointable blocks from `remat_blocks`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import numpy as np

from memplan.ir.analysis import Interval, timeline
from memplan.ir.graph import Graph
from memplan.ir.hardware import TIER_ORDER, Hardware, Tier
from memplan.passes.base import PassOutput, PassSpec
from memplan.passes.remat_blocks import Block, find_blocks
from memplan.passes.remat_candidates import Candidate, find_candidates
from memplan.passes.remat_decode import decode, solver_report, summary_notes
from memplan.passes.remat_diagnose import lowest_peak_or_raise
from memplan.passes.remat_formulation import Space, formulate
from memplan.passes.remat_options import RematSwapOptions
from memplan.passes.remat_schedule import apply_decisions, compute_share
from memplan.plans.plan import PassReport, Plan, SolverReport
from memplan.solvers.milp import solve_milp

__all__ = ["PASS", "RematSwapOptions", "run"]


def run(graph: Graph, hardware: Hardware, plan: Plan, options: RematSwapOptions | None = None) -> PassOutput:
    """Decide keep / swap / recompute for every saved activation of a training step."""
    opts = options or RematSwapOptions()
    t0 = time.perf_counter()
    budget = plan.budget_bytes["device"]
    tier = _swap_tier(hardware, opts)
    ph, found = find_candidates(graph, hardware, tier)
    cands = _on_device(found, plan.residency)
    device = [iv for iv in plan.residency if iv.tier == "device"]
    base = timeline(device, len(graph.ops)).get("device", np.zeros(1, dtype=np.int64))
    if plan.workload.mode != "train" or not cands or int(base.max()) <= budget:
        report = PassReport(
            "remat_swap",
            time.perf_counter() - t0,
            SolverReport("none", "trivial"),
            (f"nothing to do: {len(cands)} saved activations, baseline peak within budget",),
        )
        return PassOutput(plan, report)
    per_layer = opts.per_layer if opts.per_layer is not None else len(cands) > opts.exact_limit
    blocks = find_blocks(graph, hardware, cands, ph) if opts.allow_blocks and opts.allow_recompute else []
    space = Space(cands, _groups(cands, per_layer), blocks, _block_groups(blocks, per_layer))
    clock = sum(e.duration_s for e in plan.events if e.kind == "compute")
    swap_cost = compute_share(hardware, tier)
    form = formulate(space, base, budget, tier, opts, link_s=clock, swap_cost=swap_cost)
    result = solve_milp(form.problem, opts.time_limit_s, opts.mip_rel_gap)
    if result.x is None:  # raises InfeasibleBudget unless the lowest-peak plan fits: then start from it
        start = lowest_peak_or_raise(graph, plan, space, base, budget, result, tier, opts, clock)
        result = solve_milp(form.problem, opts.time_limit_s, opts.mip_rel_gap, start=start)
        if result.x is None:  # HiGHS rejected the start: it fits all the same
            result = replace(result, status="feasible", x=start)
    assert result.x is not None
    choice, chosen = decode(result.x, space)
    new_plan = apply_decisions(graph, hardware, plan, cands, choice, tier, chosen)
    notes = summary_notes(cands, choice, chosen, per_layer, tier)
    report = PassReport("remat_swap", time.perf_counter() - t0, solver_report(result), notes)
    return PassOutput(new_plan, report)


def _on_device(cands: list[Candidate], residency: tuple[Interval, ...]) -> list[Candidate]:
    """The candidates that the plan so far keeps on the device from their making to their last use (an
    earlier pass may have placed or moved others; their decisions stand)."""
    device = {(iv.value_id, iv.start, iv.end) for iv in residency if iv.tier == "device"}
    return [c for c in cands if (c.value_id, c.produced, c.last_use + 1) in device]


def _swap_tier(hw: Hardware, opts: RematSwapOptions) -> Tier | None:
    if not opts.allow_swap:
        return None
    if opts.swap_tier is not None:
        return hw.tier(opts.swap_tier)
    others = [t for t in hw.tiers if t.name != "device"]
    return min(others, key=lambda t: TIER_ORDER.index(t.name)) if others else None


def _groups(cands: list[Candidate], per_layer: bool) -> list[list[int]]:
    if not per_layer:
        return [[i] for i in range(len(cands))]
    by_sig: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for i, c in enumerate(cands):
        key = c.signature if c.layer is not None else ("single", c.value_id)
        by_sig[key].append(i)
    return list(by_sig.values())


def _block_groups(blocks: list[Block], per_layer: bool) -> list[list[int]]:
    if not per_layer:
        return [[k] for k in range(len(blocks))]
    by_sig: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for k, b in enumerate(blocks):
        by_sig[b.signature].append(k)
    return list(by_sig.values())


PASS = PassSpec(
    "remat_swap",
    run,
    RematSwapOptions,
    before=frozenset({"remat", "allocate"}),
    ensures=frozenset({"device-budget"}),
    modes=frozenset({"train"}),
)
"""Runs after schedule, bitwidth and kv_budget (it prices their order and sizes) and before allocate (which
packs what it leaves where); after a placement, it keeps what was placed and decides the rest."""
