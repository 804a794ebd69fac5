"""The pass interface. A pass is a function `run(graph, hardware, plan, options) -> PassOutput`, described
to the pass manager by a `PassSpec`.

`graph` is the plan's effective graph (`memplan.plans.effective`: the order and sizes under the passes
before), so a step index in it is a schedule step. A pass starts from the plan it is given, adds its own
typed decision record and updates residency, events and predictions; it never mutates its inputs and
never drops what an earlier pass decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.plans.plan import PassReport, Plan

Guarantee = Literal["device-budget", "offsets"]
"""What a pass can promise about the plan it returns: the device peak within the device budget (or it
raised `InfeasibleBudget`), or every resident storage has an offset in its tier's arena."""


@dataclass(frozen=True)
class PassOutput:
    """A pass's result: the plan with its decisions, and its report (solver status, bound, gap, time)."""

    plan: Plan
    report: PassReport


class PassFn(Protocol):
    """The function of a pass."""

    def __call__(self, graph: Graph, hardware: Hardware, plan: Plan, options: Any) -> PassOutput: ...


@dataclass(frozen=True)
class PassSpec:
    """A pass as the manager sees it: its name, function and options type (whose defaults are the pass's
    defaults), the decisions it needs before it, the decisions that must not be made yet (it would
    invalidate them), the guarantees it makes and the modes it applies to."""

    name: str
    run: PassFn
    options: type
    requires: frozenset[str] = frozenset()
    """Fields of `Decisions` that an earlier pass must have filled."""
    before: frozenset[str] = frozenset()
    """Fields of `Decisions` that must still be empty: this pass changes what they were decided on."""
    ensures: frozenset[Guarantee] = frozenset()
    modes: frozenset[str] = frozenset({"train", "infer", "generate"})
    """Workload kinds it applies to (`workload_kind`): training step, one inference forward, generation."""


def workload_kind(mode: str, gen: int) -> str:
    """`generate` for an inference workload that generates tokens, else its mode."""
    return "generate" if mode == "infer" and gen > 0 else mode
