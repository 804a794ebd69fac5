"""The baseline plan: every storage on the device for its whole lifetime, ops in the captured order.

This is what running the model as captured would do; the pass manager starts every pipeline from it. Its
predictions come from the same functions every pass uses (`memplan.plans.effective`).
"""

from __future__ import annotations

import time

from memplan import __version__
from memplan.ir.graph import Graph, Role
from memplan.ir.hardware import Hardware
from memplan.plans.effective import baseline_residency, compute_events, predictions_for
from memplan.plans.plan import ModelInfo, PassReport, Plan, Predictions, SolverReport, Workload, fingerprint


def baseline_plan(
    graph: Graph, hardware: Hardware, workload: Workload, budget_bytes: dict[str, int], source: str
) -> Plan:
    """Everything on the device, in the captured order."""
    t0 = time.perf_counter()
    params = sum(_numel(v.shape) for v in graph.values if v.role == Role.PARAMETER and v.alias_of is None)
    report = PassReport(
        "baseline",
        time.perf_counter() - t0,
        SolverReport("none", "trivial"),
        ("every storage on the device for its whole lifetime, captured op order",),
    )
    empty = Predictions({}, {}, 0.0, 0, 0)
    plan = Plan(
        model=ModelInfo(graph.name, source, fingerprint(graph), params),
        hardware=hardware,
        workload=workload,
        budget_bytes=budget_bytes,
        tensors=graph.values,
        ops=graph.ops,
        outputs=graph.outputs,
        residency=(),
        events=(),
        predictions=empty,
        passes=(report,),
        warnings=graph.warnings,
        memplan_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return rebased(plan)


def rebased(plan: Plan) -> Plan:
    """`plan` with its residency, events and predictions derived afresh from its effective state (order,
    bits, placement): what a pass that changes those calls before the passes that move tensors run."""
    graph = plan.graph()
    residency = baseline_residency(plan)
    events = compute_events(graph, plan.hardware)
    return plan.with_(
        residency=tuple(residency),
        events=tuple(events),
        predictions=predictions_for(graph, residency, events),
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
