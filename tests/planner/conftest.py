"""Plans several planner test modules read: gpt2-tiny's training step, and the same with its largest
activation moved to the host for the middle of its life."""

from __future__ import annotations

import pytest

import memplan
from memplan.ir.analysis import Interval
from memplan.ir.graph import Role
from memplan.plans.plan import Plan


@pytest.fixture(scope="session")
def train_plan() -> Plan:
    """gpt2-tiny's training step under a budget it fits without decisions (remat_swap has nothing to do)."""
    return memplan.plan("zoo:gpt2-tiny", mode="train", budget="1GiB")


def host_midlife(plan: Plan) -> tuple[Plan, Interval]:
    """`plan` with its largest long-lived activation on the host but for its first and last step, and that
    activation's original interval (predictions are left as they were)."""
    by_id = {v.id: v for v in plan.tensors}
    acts = [
        iv for iv in plan.residency if by_id[iv.value_id].role == Role.ACTIVATION and iv.end - iv.start > 4
    ]
    iv = max(acts, key=lambda iv: iv.size_bytes)
    moved = [
        Interval(iv.value_id, "device", iv.start, iv.start + 1, iv.size_bytes),
        Interval(iv.value_id, "host", iv.start + 1, iv.end - 1, iv.size_bytes),
        Interval(iv.value_id, "device", iv.end - 1, iv.end, iv.size_bytes),
    ]
    return plan.with_(residency=tuple([r for r in plan.residency if r != iv] + moved)), iv
