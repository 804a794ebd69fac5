"""Why a budget cannot be met: the lowest device peak the `remat_swap` pass can reach, its proven bound,
and the tensors no decision can move, as an `InfeasibleBudget` that says what to do."""

from __future__ import annotations

import numpy as np

from memplan.errors import InfeasibleBudget
from memplan.ir.analysis import timeline
from memplan.ir.graph import Graph
from memplan.ir.hardware import Tier
from memplan.passes.remat_decode import decode
from memplan.passes.remat_formulation import MIB, Space, formulate
from memplan.passes.remat_options import RematSwapOptions
from memplan.passes.remat_schedule import decided_residency
from memplan.plans.plan import Plan
from memplan.solvers.milp import MilpResult, solve_milp
from memplan.units import format_size


def lowest_peak_or_raise(
    graph: Graph,
    plan: Plan,
    space: Space,
    base: np.ndarray,
    budget: int,
    result: MilpResult,
    tier: Tier | None,
    opts: RematSwapOptions,
    link_s: float,
) -> np.ndarray:
    """The time MILP found no plan: find the lowest peak any keep / swap / recompute plan reaches (a second
    MILP, objective = peak). If it fits the budget (the time MILP ran out of time before finding any plan
    in a tiny feasible set), return its columns as a start; otherwise raise `InfeasibleBudget`, naming the
    tensors that no decision can move at the step where the peak happens."""
    cands = space.cands
    form = formulate(space, base, budget, tier, opts, link_s, min_peak=True)
    low = solve_milp(form.problem, opts.time_limit_s, opts.mip_rel_gap)
    if low.x is not None:
        choice, chosen = decode(low.x, space)
        residency = decided_residency(graph, plan.residency, cands, choice, tier, chosen)
        live = timeline(residency, len(graph.ops))["device"]
        step, reach = int(np.argmax(live)), int(live.max())
        if reach <= budget and result.status != "infeasible":
            return low.x[: space.width]
    else:
        step, reach = int(np.argmax(base)), int(base.max())
    bound = int((low.bound or 0.0) * MIB)
    movable = {c.value_id for c in cands}
    stuck = sorted(
        (
            iv
            for iv in plan.residency
            if iv.tier == "device" and iv.start <= step < iv.end and iv.value_id not in movable
        ),
        key=lambda iv: -iv.size_bytes,
    )
    names = [
        f"{graph.value(iv.value_id).name} ({graph.value(iv.value_id).role}, {format_size(iv.size_bytes)})"
        for iv in stuck[:8]
    ]
    message, lower = _verdict(budget, reach, bound, result, low)
    raise InfeasibleBudget(
        f"budget {format_size(budget)} for {plan.model.name}: {message}, at step {step} "
        f"({graph.ops[step].name}), where tensors no decision can move hold: "
        + "; ".join(names)
        + f". {_advice(reach, bound, low)}",
        lower,
        budget,
        names,
        reach,
    )


def _verdict(budget: int, reach: int, bound: int, result: MilpResult, low: MilpResult) -> tuple[str, int]:
    """What is proved, and the proven lower bound: the lowest peak when the min-peak MILP proved it optimal;
    otherwise only the solver's bound (and what it found), never "proved infeasible"."""
    if low.status == "optimal":
        why = (
            "proved infeasible"
            if result.status == "infeasible"
            else f"no plan found in {result.time_limit_s:.0f} s"
        )
        return (
            f"{why}. The lowest device peak any keep / swap / recompute / split plan reaches is "
            f"{format_size(reach)} (proved optimal: a lower bound for this pass)",
            reach,
        )
    return (
        f"no plan found. Lowest found {format_size(reach)} in {low.time_limit_s:.0f} s, proven lower bound "
        f"{format_size(bound)} (the min-peak solver stopped before proving its answer optimal)",
        bound,
    )


def _advice(reach: int, bound: int, low: MilpResult) -> str:
    if low.status == "optimal":
        return f"Raise the budget to at least {format_size(reach)}."
    return f"A budget of {format_size(reach)} works; between {format_size(bound)} and that, it is undecided."
