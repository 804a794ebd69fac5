"""The pass interface: a pass is a function `(graph, hardware, plan, options) -> PassOutput`.

A pass reads the IR, the hardware and the plan so far, and returns a new plan with its own decisions added
and a report of what its solver did. It never mutates its inputs (plans and IR records are immutable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.planner.plan import PassReport, Plan


@dataclass(frozen=True)
class PassOutput:
    """A pass's result: the plan with its decisions, and its report (solver status, bound, gap, time)."""

    plan: Plan
    report: PassReport


class Pass(Protocol):
    """What the pipeline calls. `name` is the key of the pass's decisions in `Plan.decisions`."""

    name: str

    def __call__(self, graph: Graph, hardware: Hardware, plan: Plan, options: Any) -> PassOutput: ...
