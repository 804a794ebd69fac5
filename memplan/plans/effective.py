"""The effective state of a plan: the model as the passes so far have changed it.

`effective_graph(plan)` is the one place where decisions change what the analyses see: ops in the order of
the `schedule` pass (`OrderDecision`, else as captured), each storage's bytes as the `bitwidth` pass stores
it (`BitsDecision`, else as captured), each layer's KV cache at its budgets' bytes (`KVDecision`).
Lifetimes, timelines, peaks, bounds, `verify_plan` and the runtime all read this graph, so a schedule step
is a position in it, not an op id. `home_tiers(plan)` says where each storage lives (`PlacementDecision`,
else the device); `baseline_residency` is the residency of a plan in which nothing is moved beyond what
placement says; `predictions_for` prices any residency.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from memplan.errors import InternalError
from memplan.ir.analysis import Interval, lifetimes, peaks, working_set_bound
from memplan.ir.cost import op_time_s
from memplan.ir.graph import Graph, Role
from memplan.ir.hardware import Hardware
from memplan.plans.decisions import Decisions, TensorBits
from memplan.plans.plan import Event, Plan, Predictions


def effective_graph(plan: Plan) -> Graph:
    """The plan's IR with its order and bits applied (the captured one when neither pass has run)."""
    return apply_decisions_to_graph(plan.captured_graph(), plan.decisions)


def apply_decisions_to_graph(graph: Graph, decisions: Decisions) -> Graph:
    """`graph` with the ops in `decisions.order`, the sizes of `decisions.bits` and each layer's KV cache at
    the bytes of its `decisions.kv` budgets."""
    if decisions.order is None and decisions.bits is None and decisions.kv is None:
        return graph
    ops = graph.ops
    if decisions.order is not None:
        by_id = {op.id: op for op in graph.ops}
        if sorted(decisions.order.op_ids) != sorted(by_id):
            raise InternalError("order decision is not a permutation of the plan's op ids")
        ops = tuple(by_id[i] for i in decisions.order.op_ids)
    values = graph.values
    if decisions.bits is not None:
        stored = {b.value_id: b for b in decisions.bits.tensors}
        extra = _dequant_workspaces(graph, stored)
        values = tuple(
            replace(v, size_bytes=stored[v.id].stored_bytes(v.shape))
            if v.id in stored and v.alias_of is None
            else replace(v, size_bytes=v.size_bytes + extra[v.id])
            if v.id in extra
            else v
            for v in values
        )
    if decisions.kv is not None:
        kv_bytes: dict[int, int] = defaultdict(int)
        work: dict[int, int] = defaultdict(int)
        for b in decisions.kv.budgets:
            kv_bytes[b.layer] += b.size_bytes + b.index_bytes
            work[b.layer] += b.work_bytes
        grown = {  # a budgeted layer's unit calls: the compressed cache's transient on their workspace
            v: work[op.layer]
            for op in graph.ops
            if op.target.startswith("unit:") and op.layer in work
            for v in op.outputs
            if graph.value(v).role == Role.WORKSPACE
        }
        values = tuple(
            replace(v, size_bytes=kv_bytes[v.layer])
            if v.role == Role.KV_CACHE and v.layer in kv_bytes and v.alias_of is None
            else replace(v, size_bytes=v.size_bytes + grown[v.id])
            if v.id in grown
            else v
            for v in values
        )
    return Graph(graph.name, values, ops, graph.outputs, graph.warnings)


def _dequant_workspaces(graph: Graph, stored: dict[int, TensorBits]) -> dict[int, int]:
    """Workspace value id -> the bytes a unit call's quantized weights add to it (a generation's graph,
    one op per unit call): the largest transient of a multiply by one of them (`dequant_workspace_bytes`),
    since the unit multiplies by them one after another."""
    out: dict[int, int] = {}
    for op in graph.ops:
        if not op.target.startswith("unit:"):
            continue
        sizes = [stored[v].dequant_workspace_bytes(graph.value(v).shape) for v in op.inputs if v in stored]
        extra = max(sizes, default=0)
        work = next((v for v in op.outputs if graph.value(v).role == Role.WORKSPACE), None)
        if extra and work is not None:
            out[work] = extra
    return out


def home_tiers(plan: Plan) -> dict[int, str]:
    """Storage root -> the tier it lives on when not on the device (only placed storages are listed)."""
    if plan.decisions.placement is None:
        return {}
    return {p.value_id: p.tier for p in plan.decisions.placement.tensors if p.length_bytes is None}


def baseline_residency(plan: Plan) -> list[Interval]:
    """Every storage of the effective graph for its whole lifetime on its home tier (the device unless
    placed elsewhere); a placed storage also has each of its device copies, from its prefetch step
    through its evict step. Zero-byte storages are skipped."""
    graph = plan.graph()
    placed = {p.value_id: p for p in plan.decisions.placement.tensors} if plan.decisions.placement else {}
    out: list[Interval] = []
    for root, (s, e) in sorted(lifetimes(graph).items()):
        size = graph.value(root).size_bytes
        if size <= 0:
            continue
        p = placed.get(root)
        if p is None:
            out.append(Interval(root, "device", s, e, size))
            continue
        part = size if p.length_bytes is None else p.length_bytes
        out.append(Interval(root, p.tier, s, e, part))
        if p.length_bytes is not None and size - part > 0:
            out.append(Interval(root, "device", s, e, size - part))
        out.extend(Interval(root, "device", c.prefetch_step, c.evict_step + 1, part) for c in p.copies)
    return out


def compute_events(graph: Graph, hw: Hardware) -> list[Event]:
    """One compute event per step of `graph`, back to back, timed by the roofline model."""
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
    """Peaks per tier from a residency, time from the events, and the two lower bounds (both on the
    effective `graph`: max load with everything kept on the device, and the largest op working set)."""
    n = max(len(graph.ops), 1)
    pk = peaks(residency, n)
    every = [Interval(r, "device", s, e, graph.value(r).size_bytes) for r, (s, e) in lifetimes(graph).items()]
    base = peaks(every, n).get("device")
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


def generation_times(graph: Graph, events: list[Event] | tuple[Event, ...]) -> tuple[float, float]:
    """(prefill seconds, mean seconds per decode forward) from a generation plan's compute events."""
    ends = {e.step: e.start_s + e.duration_s for e in events if e.kind == "compute"}
    per_forward = sum(1 for op in graph.ops if op.name.startswith("prefill:"))
    if not per_forward or not ends:
        return 0.0, 0.0
    prefill = ends[per_forward - 1]
    decodes = len(graph.ops) // per_forward - 1
    return prefill, (max(ends.values()) - prefill) / decodes if decodes else 0.0
