"""Pass `remat_swap`: for every activation a training step saves for its backward, keep it on the device,
swap it to a slower tier and prefetch it back, or recompute it, so that the device's peak stays under the
budget at the least added step time (after MEMO, SIGMOD 2025, and Checkmate / Moccasin).

Exact MILP (HiGHS, time limit, incumbent and gap reported), per candidate c three binaries k+s+r = 1:

    minimise   sum_c r_c * recompute_time_c + s_c * eps * transfer_time_c
    s.t.       base(t) + sum_c size_c * (s_c * dS_c(t) + r_c * dR_c(t)) <= budget   for every row step t
               r_c + r_a <= 1  (or r_c <= k_a)  for each candidate a that c's recompute reads
               sum_c s_c * transfer_c <= link seconds available            (hiding needs a free link)

base(t) is the baseline live bytes (everything kept); dS, dR in {-1, 0} are the steps where swapping or
recomputing c frees it, and dR includes the transient +bytes of c's recompute closure at its first backward
use. Rows only at steps where the baseline is over the budget or a transient lands, one per run of steps
with the same coefficients (the one with the largest base). For large models the per-layer formulation
shares one decision among the same tensor of every repeated layer (`Candidate.signature`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from memplan.errors import InfeasibleBudget
from memplan.ir.analysis import device_intervals, timeline
from memplan.ir.graph import Graph
from memplan.ir.hardware import TIER_ORDER, Hardware, Tier
from memplan.passes.base import PassOutput
from memplan.passes.remat_candidates import Candidate, find_candidates
from memplan.passes.remat_schedule import Decision, apply_decisions, copies_overlap, decided_residency
from memplan.planner.plan import PassReport, Plan, SolverReport
from memplan.planner.sizes import format_size
from memplan.solvers.milp import MilpProblem, MilpResult, solve_milp

MIB = float(2**20)
SWAP_COST_FRACTION = 0.01
"""Swaps hidden under compute (GPU copy engines) still cost this share of their transfer time (contention,
sync); where copies run on the compute cores (a CPU device) they cost all of it."""


@dataclass(frozen=True)
class RematSwapOptions:
    """Switches for benchmarks and ablations; defaults are what `memplan plan` uses."""

    time_limit_s: float = 30.0
    mip_rel_gap: float = 1e-3
    allow_swap: bool = True
    allow_recompute: bool = True
    swap_tier: str | None = None
    """Tier to swap to; None: the fastest tier after the device that the hardware has."""
    per_layer: bool | None = None
    """Share decisions across repeated layers; None: only when there are more than `exact_limit` candidates."""
    exact_limit: int = 600


@dataclass(frozen=True)
class _Formulation:
    groups: list[list[int]]
    """Candidate indices that share one decision."""
    problem: MilpProblem


def run(graph: Graph, hardware: Hardware, plan: Plan, options: RematSwapOptions | None = None) -> PassOutput:
    """Decide keep / swap / recompute for every saved activation of a training step."""
    opts = options or RematSwapOptions()
    t0 = time.perf_counter()
    budget = plan.budget_bytes["device"]
    tier = _swap_tier(hardware, opts)
    ph, cands = find_candidates(graph, hardware, tier)
    base = timeline(device_intervals(graph), len(graph.ops)).get("device", np.zeros(1, dtype=np.int64))
    if plan.workload.mode != "train" or not cands or int(base.max()) <= budget:
        report = PassReport(
            "remat_swap",
            time.perf_counter() - t0,
            SolverReport("none", "trivial"),
            (f"nothing to do: {len(cands)} saved activations, baseline peak within budget",),
        )
        return PassOutput(plan, report)
    per_layer = opts.per_layer if opts.per_layer is not None else len(cands) > opts.exact_limit
    clock = sum(e.duration_s for e in plan.events if e.kind == "compute")
    swap_cost = SWAP_COST_FRACTION if copies_overlap(hardware) else 1.0
    form = _formulate(cands, base, budget, tier, per_layer, opts, link_s=clock, swap_cost=swap_cost)
    result = solve_milp(form.problem, opts.time_limit_s, opts.mip_rel_gap)
    if result.x is None:
        _raise_infeasible(graph, plan, cands, base, budget, result, tier, per_layer, opts, clock)
    assert result.x is not None
    choice = _decode(result.x, form.groups, len(cands))
    new_plan = apply_decisions(graph, hardware, plan, cands, choice, tier)
    notes = _notes(cands, choice, per_layer, tier)
    report = PassReport("remat_swap", time.perf_counter() - t0, _solver_report(result), notes)
    return PassOutput(new_plan, report)


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


def _profiles(c: Candidate, n: int, swap: bool) -> tuple[np.ndarray, np.ndarray]:
    """dS, dR: change in device bytes, in units of c's size, per step, if c is swapped / recomputed
    (without the recompute's transient, which lands at its first backward use)."""
    ds = np.zeros(n)
    dr = np.zeros(n)
    if swap and c.can_swap:
        ds[max(c.last_fwd_use + 1, c.swap_write_done) : c.prefetch_step] = -1.0
    if c.can_recompute:
        dr[c.last_fwd_use + 1 : c.first_bwd_use] = -1.0
    return ds, dr


def _coefficients(
    cands: list[Candidate], groups: list[list[int]], base: np.ndarray, budget: int, tier: Tier | None
) -> tuple[np.ndarray, np.ndarray]:
    """Dense memory rows (one per kept step) over columns [s_0..s_G, r_0..r_G], and their right-hand sides."""
    n = len(base)
    steps = set(np.nonzero(base > budget)[0].tolist())
    steps |= {c.first_bwd_use for c in cands if c.transient_bytes}
    rows = np.array(sorted(steps), dtype=np.int64)
    g_count = len(groups)
    mat = np.zeros((len(rows), 2 * g_count))
    for g, members in enumerate(groups):
        for i in members:
            c = cands[i]
            ds, dr = _profiles(c, n, tier is not None)
            mat[:, g] += c.size_bytes * ds[rows]
            mat[:, g_count + g] += c.size_bytes * dr[rows]
            if c.transient_bytes:
                mat[rows == c.first_bwd_use, g_count + g] += c.transient_bytes
    rhs = budget - base[rows].astype(np.float64)
    return _dedupe(mat, rhs)


def _dedupe(mat: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep one row per distinct coefficient pattern, with the tightest right-hand side."""
    if len(rhs) == 0:
        return mat, rhs
    uniq, inverse = np.unique(mat, axis=0, return_inverse=True)
    tight = np.full(len(uniq), np.inf)
    np.minimum.at(tight, inverse.ravel(), rhs)
    return uniq, tight


def _formulate(
    cands: list[Candidate],
    base: np.ndarray,
    budget: int,
    tier: Tier | None,
    per_layer: bool,
    opts: RematSwapOptions,
    link_s: float,
    swap_cost: float = SWAP_COST_FRACTION,
    min_peak: bool = False,
) -> _Formulation:
    """Columns: s_g for every group g, then r_g (then the peak P in MiB when `min_peak`); rows: memory (in
    MiB, for conditioning), one decision per group, recompute inputs, link. With `min_peak` the objective
    is the device peak itself, over every step: the lowest peak this pass can reach. A swap costs
    `swap_cost` times its transfer seconds (a small share where copies overlap compute, all of it where
    they run on the compute cores)."""
    groups = _groups(cands, per_layer)
    g_count = len(groups)
    mem, mem_rhs = _coefficients(cands, groups, base, 0 if min_peak else budget, tier)
    logic, logic_rhs = _logic_rows(cands, groups, tier, link_s)
    extra = 1 if min_peak else 0
    mem = np.hstack([mem / MIB, -np.ones((len(mem), extra))])
    logic = np.hstack([logic, np.zeros((len(logic), extra))])
    a = np.vstack([mem, logic])
    rhs = np.concatenate([mem_rhs / MIB, logic_rhs])
    cost = np.zeros(2 * g_count + extra)
    upper = np.ones(2 * g_count + extra)
    for g, members in enumerate(groups):
        ms = [cands[i] for i in members]
        cost[g] = swap_cost * sum(c.swap_s for c in ms)
        cost[g_count + g] = sum(c.recompute_s for c in ms)
        upper[g] = float(tier is not None and all(c.can_swap for c in ms))
        upper[g_count + g] = float(opts.allow_recompute and all(c.can_recompute for c in ms))
    if min_peak:
        cost[:] = 0.0
        cost[-1], upper[-1] = 1.0, np.inf
    n_cols = len(cost)
    cols, rows = np.nonzero(a.T)  # sorted by column, then row: CSC order
    problem = MilpProblem(
        c=cost,
        lower=np.zeros(n_cols),
        upper=upper,
        integrality=np.array([1] * (2 * g_count) + [0] * extra, dtype=np.int8),
        a_data=a[rows, cols],
        a_indices=rows,
        a_indptr=np.searchsorted(cols, np.arange(n_cols + 1)),
        row_lower=np.full(len(rhs), -np.inf),
        row_upper=rhs,
    )
    return _Formulation(groups, problem)


def _logic_rows(
    cands: list[Candidate], groups: list[list[int]], tier: Tier | None, link_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """s_g + r_g <= 1; a recompute's inputs stay available; swaps fit the link's time and the tier's bytes."""
    g_count = len(groups)
    group_of = {cands[i].value_id: g for g, ms in enumerate(groups) for i in ms}
    rows: list[np.ndarray] = []
    rhs: list[float] = []
    for g in range(g_count):
        row = np.zeros(2 * g_count)
        row[[g, g_count + g]] = 1.0
        rows.append(row)
        rhs.append(1.0)
    by_id = {c.value_id: c for c in cands}
    pairs = set()
    for g, ms in enumerate(groups):
        for i in ms:
            c = cands[i]
            for a in c.frontier:
                pairs.add((g, group_of[a], by_id[a].first_bwd_use > c.first_bwd_use))
    for g, h, needs_keep in sorted(pairs):
        row = np.zeros(2 * g_count)
        row[g_count + g] += 1.0
        row[g_count + h] += 1.0  # the input must not be recomputed itself...
        if needs_keep:
            row[h] += 1.0  # ...nor be away on the tier when c is rebuilt
        rows.append(row)
        rhs.append(1.0)
    if tier is not None:
        link = np.zeros(2 * g_count)
        cap = np.zeros(2 * g_count)
        for g, ms in enumerate(groups):
            link[g] = sum(cands[i].swap_s for i in ms)
            cap[g] = sum(cands[i].size_bytes for i in ms)
        rows += [link, cap]
        rhs += [link_s, float(tier.capacity_bytes)]
    return np.array(rows), np.array(rhs)


def _decode(x: np.ndarray, groups: list[list[int]], n: int) -> list[Decision]:
    g_count = len(groups)
    out: list[Decision] = ["keep"] * n
    for g, members in enumerate(groups):
        d: Decision = "swap" if x[g] > 0.5 else "recompute" if x[g_count + g] > 0.5 else "keep"
        for i in members:
            out[i] = d
    return out


def _notes(
    cands: list[Candidate], choice: list[Decision], per_layer: bool, tier: Tier | None
) -> tuple[str, ...]:
    count: dict[str, int] = defaultdict(int)
    size: dict[str, int] = defaultdict(int)
    for c, d in zip(cands, choice, strict=True):
        count[d] += 1
        size[d] += c.size_bytes
    mib = 2**20
    split = ", ".join(f"{d} {count[d]} ({size[d] / mib:.1f} MiB)" for d in ("keep", "swap", "recompute"))
    form = (
        "per-layer (shared decisions across repeated layers)"
        if per_layer
        else "exact (one decision per tensor)"
    )
    return (
        f"{len(cands)} saved activations: {split}",
        f"formulation: {form}",
        f"swap tier: {tier.name if tier else 'none'}",
    )


def _solver_report(r: MilpResult) -> SolverReport:
    return SolverReport("highs-milp", r.status, r.objective, r.bound, r.gap, r.time_s, r.time_limit_s)


def _raise_infeasible(
    graph: Graph,
    plan: Plan,
    cands: list[Candidate],
    base: np.ndarray,
    budget: int,
    result: MilpResult,
    tier: Tier | None,
    per_layer: bool,
    opts: RematSwapOptions,
    link_s: float,
) -> None:
    """No assignment fits: find the lowest peak any keep / swap / recompute plan reaches (a second MILP,
    objective = peak) and name the tensors that no decision can move at the step where it happens."""
    form = _formulate(cands, base, budget, tier, per_layer, opts, link_s, min_peak=True)
    low = solve_milp(form.problem, opts.time_limit_s, opts.mip_rel_gap)
    if low.x is not None:
        choice = _decode(low.x, form.groups, len(cands))
        residency = decided_residency(graph, cands, choice, tier)
        live = timeline(residency, len(graph.ops))["device"]
        step, reach = int(np.argmax(live)), int(live.max())
    else:
        step, reach = int(np.argmax(base)), int(base.max())
    bound = int((low.bound or 0.0) * MIB)
    movable = {c.value_id for c in cands}
    stuck = sorted(
        (iv for iv in device_intervals(graph) if iv.start <= step < iv.end and iv.value_id not in movable),
        key=lambda iv: -iv.size_bytes,
    )
    names = [
        f"{graph.value(iv.value_id).name} ({graph.value(iv.value_id).role}, {format_size(iv.size_bytes)})"
        for iv in stuck[:8]
    ]
    why = (
        "proved infeasible"
        if result.status == "infeasible"
        else f"no plan found in {result.time_limit_s:.0f} s"
    )
    raise InfeasibleBudget(
        f"budget {format_size(budget)} for {plan.model.name}: {why}. The lowest device peak a keep / swap / "
        f"recompute plan reaches is {format_size(reach)} (lower bound {format_size(bound)}, {low.status}), at step "
        f"{step} ({graph.ops[step].name}), where tensors no decision can move hold: "
        + "; ".join(names)
        + f". Raise the budget to at least {format_size(reach)}.",
        max(reach, bound),
        budget,
        names,
    )
