"""What several exporters read from a plan."""

from __future__ import annotations

from memplan.errors import InvalidInput
from memplan.plans.decisions import RematDecision
from memplan.plans.plan import Plan


def remat_decision(plan: Plan, fmt: str) -> RematDecision:
    """The `remat_swap` decision record; a clear error for a plan without one."""
    remat = plan.decisions.remat
    if plan.workload.mode != "train" or remat is None:
        raise InvalidInput(
            f"plan of {plan.model.name} ({plan.workload.mode}) has no remat_swap decisions: the {fmt} "
            "export needs a training plan (memplan plan MODEL --mode train --budget ...)"
        )
    return remat
