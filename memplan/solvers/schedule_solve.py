"""The scheduling portfolio: an order (and, under a capacity, a replacement) for a `ScheduleProblem`.

Without a capacity it minimises the peak (plan model): per region (`schedule_heuristics.regions`: the whole
segment up to `exact_ops` ops, else repeated blocks of at most `region_ops`), the best list schedule, then
the exact order ILP started from it; a region whose signature was solved before takes that order. The peak
of the whole order is the largest region's (plus what crosses it), so with whole-segment regions solved to
optimality the order is optimal.

Under a capacity it minimises the non-compulsory traffic: the baseline is the captured order with Belady's
replacement; candidate orders (captured, the regions' lowest-peak orders in the capacity model, and in the
plan model) each get Belady's replacement, the best goes to the exact replacement ILP for its order, and
graphs of at most `joint_ops` ops to the joint order-and-replacement ILP, whose dual bound is a bound over
every order. Nothing returned is worse than the baseline, and every answer is replayed by
`check_replacement`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from memplan.solvers.milp import MilpResult
from memplan.solvers.schedule_heuristics import (
    Region,
    best_list_order,
    region_of,
    region_peak,
    regions,
    signature,
)
from memplan.solvers.schedule_milp import (
    exact_unit,
    integral,
    order_columns,
    solve_joint,
    solve_region_order,
    solve_replacement,
)
from memplan.solvers.schedule_problem import (
    Replacement,
    ScheduleProblem,
    belady,
    check_order,
    check_replacement,
    need_bound,
    peak,
    require_capacity,
)


@dataclass(frozen=True)
class ScheduleOptions:
    """Time limit for all solves together, and the sizes up to which each exact method is tried."""

    time_limit_s: float = 10.0
    exact_ops: int = 300
    """A segment of at most this many ops is one region (its order solved exactly)."""
    region_ops: int = 80
    """Beyond, regions are the repeated blocks, chunked to at most this many ops."""
    joint_ops: int = 40
    """Graphs of at most this many ops also get the joint order-and-replacement ILP."""
    replacement_gaps: int = 50_000
    """The exact replacement ILP is skipped for orders with more gaps between uses than this."""
    exact: bool = True
    """False: heuristics only (list schedules, Belady)."""
    max_columns: int = 20_000
    """A region whose order ILP would have more position columns keeps its best list schedule."""


@dataclass(frozen=True)
class ScheduleResult:
    """The chosen order and replacement (None without a capacity), the baseline's figures, and what the
    solvers did: status (optimal, feasible, heuristic), objective and bound (bytes: the peak, or the
    non-compulsory traffic), relative gap and time."""

    order: list[int]
    replacement: Replacement | None
    baseline: Replacement | None
    captured_peak_bytes: int
    peak_bytes: int
    status: str
    solver: str
    objective: float
    bound: float | None
    gap: float | None
    time_s: float
    time_limit_s: float
    notes: tuple[str, ...] = field(default=())


def solve_schedule(
    p: ScheduleProblem, capacity: int | None, opts: ScheduleOptions | None = None
) -> ScheduleResult:
    """Order (and replacement under `capacity` bytes) for `p`; see the module docstring."""
    opts = opts or ScheduleOptions()
    t0 = time.perf_counter()
    deadline = t0 + opts.time_limit_s
    captured = list(range(p.n_ops))
    if capacity is None:
        order, status, bound, notes = _lowest_peak(p, "peak", opts, deadline)
        obj = peak(p, order)
        base = peak(p, captured)
        if obj >= base:
            order, obj = captured, base
        check_order(p, order)
        gap = (obj - bound) / obj if bound is not None and obj else None
        return ScheduleResult(order, None, None, base, obj, status, "regions+list+milp", float(obj), bound,
                              gap, time.perf_counter() - t0, opts.time_limit_s, notes)  # fmt: skip
    require_capacity(p, capacity)
    baseline = belady(p, captured, capacity)
    notes: list[str] = []
    cands: dict[tuple[int, ...], Replacement] = {tuple(captured): baseline}
    for model in ("capacity", "peak"):
        order, _, _, n = _lowest_peak(p, model, opts, t0 + (deadline - t0) * 0.4)
        notes += [f"{model} model: {x}" for x in n]
        if tuple(order) not in cands:
            cands[tuple(order)] = belady(p, order, capacity)
    best_order, best = min(cands.items(), key=lambda kv: (kv[1].moved_bytes, kv[1].peak_bytes))
    order = list(best_order)
    solver, status, bound, tolerance = "belady", "heuristic", 0.0, 0.0
    result: MilpResult | None = None
    if opts.exact and best.moved_bytes > 0:
        gaps = sum(max(len(u) - 1, 0) for u in p.users())
        if gaps <= opts.replacement_gaps and time.perf_counter() < deadline:
            left = max(deadline - time.perf_counter(), 0.5)
            share = left * (0.5 if p.n_ops <= opts.joint_ops else 1.0)
            rr = solve_replacement(p, order, capacity, share, best)
            best, result, solver = rr.replacement, rr.result, "belady+replacement-milp"
        if p.n_ops <= opts.joint_ops and time.perf_counter() < deadline:
            left = max(deadline - time.perf_counter(), 0.5)
            jr = solve_joint(p, capacity, left, order, best)
            tolerance = 0.5 * jr.unit_bytes
            if jr.result.bound is not None:
                units = integral(jr.result.bound - jr.offset_units, exact_unit(p.sizes, jr.unit_bytes))
                bound = max(bound, (units or 0.0) * jr.unit_bytes)
            if jr.order != order:
                rr = solve_replacement(p, jr.order, capacity, max(deadline - time.perf_counter(), 1.0),
                                       belady(p, jr.order, capacity))  # fmt: skip
                if rr.replacement.moved_bytes < best.moved_bytes:
                    order, best = jr.order, rr.replacement
            solver, result = "joint-milp", jr.result
    if best.moved_bytes == 0:
        status, bound = "optimal", 0.0
    elif result is not None:
        status = "optimal" if tolerance and bound >= best.moved_bytes - tolerance else "feasible"
    check_order(p, order)
    check_replacement(p, order, capacity, best)
    obj = float(best.moved_bytes)
    gap = (obj - bound) / obj if obj else 0.0
    if status == "optimal":
        gap = 0.0
    notes.append(f"{len(cands)} candidate orders under Belady")
    return ScheduleResult(order, best, baseline, peak(p, captured), peak(p, order), status, solver, obj,
                          bound, gap, time.perf_counter() - t0, opts.time_limit_s, tuple(notes))  # fmt: skip


def _lowest_peak(
    p: ScheduleProblem, model: str, opts: ScheduleOptions, deadline: float
) -> tuple[list[int], str, float | None, list[str]]:
    """The lowest-peak order in `model`, region by region: (order, status, bound in bytes, notes)."""
    whole = p.n_ops <= opts.exact_ops
    regs = _regions(p, model, whole, opts)
    by_sig: dict[tuple[object, ...], list[int]] = {}
    orders: list[list[int]] = []
    optimal, solved, reused, bound = True, 0, 0, 0.0
    distinct = len({signature(p, r) for r in regs}) if len(regs) > 1 else 1
    for i, reg in enumerate(regs):
        sig = signature(p, reg) if len(regs) > 1 else ()
        if sig in by_sig:
            orders.append([reg.ops[j] for j in by_sig[sig]])
            reused += 1
            continue
        order, pk = best_list_order(p, reg)
        crossing = _crossing(p, reg, model)
        status_opt = False
        small = order_columns(p, list(reg.ops)) <= opts.max_columns
        if opts.exact and small and len(reg.ops) > 1 and time.perf_counter() < deadline:
            share = max((deadline - time.perf_counter()) / max(distinct - solved, 1), 0.05)
            res = solve_region_order(p, list(reg.ops), reg.live_before, reg.live_after, share, order)
            solved += 1
            if region_peak(p, reg, res.order) <= pk:
                order = res.order
            pk = region_peak(p, reg, order)
            status_opt = res.result.status == "optimal"
            if res.result.bound is not None:
                units = integral(res.result.bound, exact_unit(p.sizes, res.unit_bytes)) or 0.0
                bound = max(bound, crossing + units * res.unit_bytes)
        else:
            status_opt = len(reg.ops) <= 1
            if status_opt:
                bound = max(bound, crossing + pk)
        optimal = optimal and status_opt
        index = {v: j for j, v in enumerate(reg.ops)}
        by_sig[sig] = [index[v] for v in order]
        orders.append(order)
    full = [v for o in orders for v in o]
    exact_regions = whole or len({p.segment(v) for v in range(p.n_ops)}) == len(regs)
    lower = max(bound, _trivial_bound(p, model))
    if not exact_regions:
        lower = _trivial_bound(p, model)  # regions restrict the orders: their bounds prove nothing globally
    status = "optimal" if optimal and exact_regions else ("feasible" if opts.exact else "heuristic")
    notes = [f"{len(regs)} regions ({reused} reused, {solved} solved exactly)"]
    return full, status, lower, notes


def _regions(p: ScheduleProblem, model: str, whole: bool, opts: ScheduleOptions) -> list[Region]:
    if whole:
        segs: dict[int, list[int]] = {}
        for v in range(p.n_ops):
            segs.setdefault(p.segment(v), []).append(v)
        return [region_of(p, tuple(o), model) for o in segs.values()]
    return [region_of(p, r.ops, model) for r in regions(p, opts.region_ops)]


def _crossing(p: ScheduleProblem, reg: Region, model: str) -> float:
    """Bytes live across the whole region that it does not use (the same in every order of it)."""
    lo, hi = min(reg.ops), max(reg.ops)
    used = {t for v in reg.ops for t in p.uses[v]}
    users = _users(p)
    total = 0
    for t in range(p.n_tensors):
        if t in used or (not users[t] and not (model == "peak" and p.initial[t])):
            continue
        us = users[t]
        first = 0 if (model == "peak" and p.initial[t]) else us[0]
        whole = model == "peak" and (p.initial[t] or p.keep[t])
        last = p.n_ops if whole else us[-1]
        if first < lo and last > hi:
            total += p.sizes[t]
    return float(total)


_USERS: dict[int, list[list[int]]] = {}


def _users(p: ScheduleProblem) -> list[list[int]]:
    if id(p) not in _USERS:
        _USERS.clear()
        _USERS[id(p)] = p.users()
    return _USERS[id(p)]


def _trivial_bound(p: ScheduleProblem, model: str) -> float:
    """No order goes below: the largest op working set, plus (plan model) every initial tensor."""
    if model != "peak":
        return float(need_bound(p)[0])
    init = sum(s for t, s in enumerate(p.sizes) if p.initial[t])
    extra = max((sum(p.sizes[t] for t in set(u) if not p.initial[t]) for u in p.uses), default=0)
    return float(init + extra)
