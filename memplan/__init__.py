"""memplan: a compiler-style offline planner for memory placement and quantization, with a runtime.

import memplan
plan = memplan.plan("zoo:gpt2", mode="train", budget="2GiB", hardware="cpu")
plan.save("plan.json"); print(plan.summary()); assert memplan.verify(plan).ok
"""

__version__ = "0.1.0"

from memplan.errors import InfeasibleBudget, MemplanError  # noqa: E402
from memplan.planner.api import load, plan, verify  # noqa: E402
from memplan.planner.plan import Plan  # noqa: E402
from memplan.runtime.training import applied  # noqa: E402

__all__ = ["InfeasibleBudget", "MemplanError", "Plan", "__version__", "applied", "load", "plan", "verify"]
