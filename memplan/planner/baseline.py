"""The baseline plan: every storage on the device for its whole lifetime, ops in the captured order.

This is what running the model as captured would do; every pass starts from it. Its predictions come from
the same analyses every pass uses (`memplan.ir.analysis`) and the hardware's roofline time per op.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from memplan import __version__
from memplan.ir.analysis import Interval, device_intervals, peaks, working_set_bound
from memplan.ir.graph import Graph, Op, Role
from memplan.ir.hardware import Hardware
from memplan.planner.plan import (
    Event,
    ModelInfo,
    PassReport,
    Plan,
    Predictions,
    SolverReport,
    Workload,
    fingerprint,
)


def op_time_s(op: Op, hw: Hardware) -> float:
    """Roofline time of one op on the device: the slower of its arithmetic and its memory traffic."""
    return max(op.flops / hw.flops, (op.bytes_read + op.bytes_written) / hw.mem_bw)


def compute_events(graph: Graph, hw: Hardware) -> list[Event]:
    """One compute event per op, back to back, timed by the roofline model."""
    events, t = [], 0.0
    for i, op in enumerate(graph.ops):
        d = op_time_s(op, hw)
        events.append(Event("compute", i, op_id=op.id, start_s=t, duration_s=d))
        t += d
    return events


def predictions_for(
    graph: Graph,
    residency: Sequence[Interval],
    events: Sequence[Event],
    arena_bytes: dict[str, int] | None = None,
) -> Predictions:
    """Peaks per tier from a residency, time from the events, and the two lower bounds."""
    n = max(len(graph.ops), 1)
    pk = peaks(residency, n)
    base = peaks(device_intervals(graph), n).get("device")
    ws, _ = working_set_bound(graph)
    end = max((e.start_s + e.duration_s for e in events), default=0.0)
    return Predictions(
        peak_bytes={t: p.bytes for t, p in pk.items()},
        peak_step={t: p.step for t, p in pk.items()},
        time_s=end,
        max_load_bytes=base.bytes if base else 0,
        working_set_bytes=ws,
        arena_bytes=dict(arena_bytes or {}),
    )


def baseline_plan(
    graph: Graph, hardware: Hardware, workload: Workload, budget_bytes: dict[str, int], source: str
) -> Plan:
    """Everything on the device, in the captured order."""
    t0 = time.perf_counter()
    residency = device_intervals(graph)
    events = compute_events(graph, hardware)
    params = sum(_numel(v.shape) for v in graph.values if v.role == Role.PARAMETER and v.alias_of is None)
    report = PassReport(
        "baseline",
        time.perf_counter() - t0,
        SolverReport("none", "trivial"),
        ("every storage on the device for its whole lifetime, captured op order",),
    )
    return Plan(
        model=ModelInfo(graph.name, source, fingerprint(graph), params),
        hardware=hardware,
        workload=workload,
        budget_bytes=budget_bytes,
        tensors=graph.values,
        ops=graph.ops,
        outputs=graph.outputs,
        residency=tuple(residency),
        events=tuple(events),
        predictions=predictions_for(graph, residency, events),
        passes=(report,),
        warnings=graph.warnings,
        memplan_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
