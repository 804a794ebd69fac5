"""What several exporters read from a plan."""

from __future__ import annotations

from typing import Any

from memplan.errors import InvalidInput
from memplan.planner.plan import Plan


def remat_tensors(plan: Plan, fmt: str) -> list[dict[str, Any]]:
    """The `remat_swap` decision of every saved activation; a clear error for a plan without them."""
    decisions = plan.decisions.get("remat_swap")
    if plan.workload.mode != "train" or not decisions:
        raise InvalidInput(
            f"plan of {plan.model.name} ({plan.workload.mode}) has no remat_swap decisions: the {fmt} "
            "export needs a training plan (memplan plan MODEL --mode train --budget ...)"
        )
    tensors: list[dict[str, Any]] = decisions["tensors"]
    return tensors
