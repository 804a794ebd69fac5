"""memplan: a compiler-style offline planner for memory placement and quantization, with a runtime.

import memplan
plan = memplan.plan("zoo:gpt2", mode="train", budget="2GiB", hardware="cpu")
plan.save("plan.json"); print(memplan.summary(plan)); assert memplan.verify(plan).ok

`import memplan` imports no torch: the names below load their modules on first use (PEP 562).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "InfeasibleBudget": "memplan.errors",
    "MemplanError": "memplan.errors",
    "Plan": "memplan.plans.plan",
    "load": "memplan.planner.api",
    "plan": "memplan.planner.api",
    "summary": "memplan.planner.api",
    "verify": "memplan.planner.api",
    "run_plan": "memplan.planner.run",
    "applied": "memplan.runtime.training",
}

if TYPE_CHECKING:
    from memplan.errors import InfeasibleBudget, MemplanError
    from memplan.planner.api import load, plan, summary, verify
    from memplan.planner.run import run_plan
    from memplan.plans.plan import Plan
    from memplan.runtime.training import applied

__all__ = [
    "InfeasibleBudget",
    "MemplanError",
    "Plan",
    "__version__",
    "applied",
    "load",
    "plan",
    "run_plan",
    "summary",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")
