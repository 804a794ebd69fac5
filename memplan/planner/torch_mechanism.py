"""Plans the torch mechanism holds: `plan_for_torch` plans, predicts the torch mechanism's peak with a dry run
(`memplan.runtime.eager_peak.predict_peak`) and plans lower by the excess until the prediction fits.

It plans, so it lives with the doors (the runtime never plans).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memplan.errors import InfeasibleBudget
from memplan.planner import api
from memplan.plans.plan import PassReport, Plan, SolverReport
from memplan.runtime.eager_peak import TorchOverBudget, TorchPeak, predict_peak
from memplan.units import parse_size


@dataclass(frozen=True)
class TorchFit:
    """A plan for the torch mechanism: the plan (its device budget the one asked for), the budget it was
    planned at, and the torch mechanism's predicted peak under it."""

    plan: Plan
    budget_bytes: int
    planned_at_bytes: int
    predicted_peak_bytes: int


def plan_for_torch(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    budget: str | int,
    rounds: int = 6,
    **plan_options: Any,
) -> TorchFit:
    """A training plan whose step, under the torch mechanism, is predicted to peak within `budget`: plan at
    `budget`, predict the torch mechanism's peak, and plan again lower by the excess, up to `rounds` times
    (the torch mechanism keeps more than the plan counts, so the plan must leave room for it). The plan's
    device budget is `budget`; a last pass report, `torch_mechanism`, says where it was planned and what is
    predicted. Raises `TorchOverBudget` with the lowest peak found when no round fits."""
    target = parse_size(budget)
    at, best = target, None
    for _ in range(rounds):
        try:
            plan = api.plan(model, example_inputs, mode="train", budget=at, **plan_options)
        except InfeasibleBudget as e:
            low = f"the planner's lower bound is {e.lower_bound_bytes} B"
            raise _not_found(target, best, low) from e
        peak = predict_peak(plan, model)
        if best is None or peak.peak_bytes < best.peak_bytes:
            best = peak
        excess = peak.peak_bytes - target
        if excess <= 0:
            note = (
                f"planned at {at} B for a torch-mechanism budget of {target} B; predicted torch-mechanism "
                f"peak {peak.peak_bytes} B (dry run on fake tensors)"
            )
            report = PassReport("torch_mechanism", 0.0, SolverReport("dry-run", "feasible"), (note,))
            budgets = {**plan.budget_bytes, "device": target}
            fitted = plan.with_(budget_bytes=budgets, passes=(*plan.passes, report))
            return TorchFit(fitted, target, at, peak.peak_bytes)
        at -= excess
    raise _not_found(target, best, f"{rounds} rounds of planning lower did not fit")


def _not_found(target: int, best: TorchPeak | None, why: str) -> TorchOverBudget:
    """The refusal of `plan_for_torch`: the lowest predicted peak it reached, and why it stopped."""
    lowest = best.peak_bytes if best is not None else 0
    return TorchOverBudget(
        "memplan.planner.torch_mechanism.plan_for_torch: no plan found whose step under mechanism='torch' "
        f"fits {target} B ({why}; the lowest predicted peak was {lowest} B, over by {lowest - target} B). "
        "Use mechanism='graph', which holds plans down to the planner's lower bound, or a budget of at least "
        f"{lowest} B for the torch mechanism",
        lowest,
        target,
    )
