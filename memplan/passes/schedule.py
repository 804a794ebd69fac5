"""Pass `schedule`: the op order, and for a device of limited capacity which tensors leave it and come back
(tensor replacement, after COSMA: Li, Gupta, Malik; OLLA's reordering for the peak).

Without replacement it reorders to lower the peak of the plan's memory model (every op keeps its segment:
forward, backward, optimizer), and keeps the captured order unless the new one is strictly lower. With
replacement (asked for, or `replace=None` on an inference workload whose best order still exceeds the
device budget) it minimises the bytes moved off the device under the capacity: the order goes into the
`OrderDecision`, the replacement into device and next-tier residency with `evict` and `swap_in` events
(`schedule_model`), which the training executor and the arena runner execute and `verify_plan` checks.
The solvers are in `memplan.solvers.schedule_*`; the baseline they are measured against is the captured
order with Belady's replacement, and compulsory traffic (first loads of inputs and weights, one store of
each output the step writes) is reported apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from memplan.ir.graph import Graph
from memplan.ir.hardware import TIER_ORDER, Hardware, Tier
from memplan.passes.base import PassOutput, PassSpec
from memplan.passes.baseline import rebased
from memplan.passes.schedule_model import build_problem, replacement_events, replacement_residency
from memplan.plans.decisions import OrderDecision
from memplan.plans.effective import predictions_for
from memplan.plans.plan import PassReport, Plan, SolverReport
from memplan.solvers.schedule_solve import ScheduleOptions as SolverOptions
from memplan.solvers.schedule_solve import ScheduleResult, solve_schedule
from memplan.units import format_size

__all__ = ["PASS", "ScheduleOptions", "run"]


@dataclass(frozen=True)
class ScheduleOptions:
    """`replace`: True, replace under `capacity_bytes` (None: the device budget); False, order only; None
    (default), replace only for inference when the best order's peak is over the budget. `tier`: where
    evicted tensors go (None: the fastest tier after the device)."""

    replace: bool | None = None
    capacity_bytes: int | None = None
    tier: str | None = None
    time_limit_s: float = 2.0
    exact: bool = True
    exact_ops: int = 300
    region_ops: int = 80
    joint_ops: int = 40

    def solver(self) -> SolverOptions:
        return SolverOptions(self.time_limit_s, self.exact_ops, self.region_ops, self.joint_ops,
                             exact=self.exact)  # fmt: skip


def run(graph: Graph, hardware: Hardware, plan: Plan, options: ScheduleOptions | None = None) -> PassOutput:
    """Choose the order (and the replacement under a capacity) of `graph`."""
    opts = options or ScheduleOptions()
    t0 = time.perf_counter()
    mode = plan.workload.mode
    problem, roots = build_problem(graph, mode)
    capacity = opts.capacity_bytes if opts.capacity_bytes is not None else plan.budget_bytes["device"]
    by_order = solve_schedule(problem, None, opts.solver())
    want = opts.replace if opts.replace is not None else mode == "infer" and by_order.peak_bytes > capacity
    tier = _tier(hardware, opts)
    if not want or tier is None:
        return _ordered(graph, plan, by_order, roots, t0)
    result = solve_schedule(problem, capacity, opts.solver())
    ids = [graph.ops[k].id for k in result.order]
    ordered = rebased(plan.with_(decisions=plan.decisions.with_(order=OrderDecision(tuple(ids)))))
    g2 = ordered.graph()
    assert result.replacement is not None and result.baseline is not None
    n = len(g2.ops)
    moved = {roots[t] for t in range(problem.n_tensors)}
    kept = [iv for iv in ordered.residency if iv.value_id not in moved]
    residency = kept + replacement_residency(problem, roots, result.replacement, n, tier.name)
    compute = [e for e in ordered.events if e.kind == "compute"]
    events = sorted(
        [*ordered.events, *replacement_events(problem, roots, result.replacement, compute, tier)],
        key=lambda e: (e.step, e.kind == "compute"),
    )
    new = ordered.with_(
        residency=tuple(residency), events=tuple(events), predictions=predictions_for(g2, residency, events)
    )
    report = PassReport("schedule", time.perf_counter() - t0, _solver_report(result),
                        _replace_notes(result, capacity, tier.name))  # fmt: skip
    return PassOutput(new, report)


def _ordered(graph: Graph, plan: Plan, res: ScheduleResult, roots: list[int], t0: float) -> PassOutput:
    """The order alone: taken when its peak is below the captured order's, else the plan as it was."""
    notes = [f"peak (every tensor on the device): captured order {format_size(res.captured_peak_bytes)}, "
             f"scheduled {format_size(res.peak_bytes)}", *res.notes]  # fmt: skip
    if res.peak_bytes >= res.captured_peak_bytes:
        notes.insert(0, "captured order kept: no order found with a lower peak")
        report = PassReport("schedule", time.perf_counter() - t0, _solver_report(res), tuple(notes))
        return PassOutput(plan, report)
    ids = tuple(graph.ops[k].id for k in res.order)
    new = rebased(plan.with_(decisions=plan.decisions.with_(order=OrderDecision(ids))))
    report = PassReport("schedule", time.perf_counter() - t0, _solver_report(res), tuple(notes))
    return PassOutput(new, report)


def _solver_report(res: ScheduleResult) -> SolverReport:
    return SolverReport(
        res.solver, res.status, res.objective, res.bound, res.gap, res.time_s, res.time_limit_s
    )


def _replace_notes(res: ScheduleResult, capacity: int, tier: str) -> tuple[str, ...]:
    rep, base = res.replacement, res.baseline
    assert rep is not None and base is not None
    removed = 1 - rep.moved_bytes / base.moved_bytes if base.moved_bytes else 0.0
    return (
        f"capacity {format_size(capacity)}, evicted tensors go to {tier}",
        f"off-device bytes beyond the compulsory {format_size(rep.compulsory_bytes)}: captured order with "
        f"Belady {format_size(base.moved_bytes)}, scheduled {format_size(rep.moved_bytes)} "
        f"({removed:.0%} removed)",
        f"device peak: captured order with Belady {format_size(base.peak_bytes)}, scheduled "
        f"{format_size(rep.peak_bytes)}; peak with every tensor on the device: captured order "
        f"{format_size(res.captured_peak_bytes)}, scheduled order {format_size(res.peak_bytes)}",
        *res.notes,
    )


def _tier(hw: Hardware, opts: ScheduleOptions) -> Tier | None:
    if opts.tier is not None:
        return hw.tier(opts.tier)
    others = [t for t in hw.tiers if t.name != "device"]
    return min(others, key=lambda t: TIER_ORDER.index(t.name)) if others else None


PASS = PassSpec(
    "schedule",
    run,
    ScheduleOptions,
    before=frozenset({"order", "remat", "placement", "allocate"}),
)
"""Runs first: the order it chooses defines the lifetimes every later pass prices."""
