"""The plan's event schedule in the Chrome Trace Event format, for Perfetto (ui.perfetto.dev) or chrome://tracing.

One trace process per plan, with one thread ("track") per resource:

    compute          every compute event as a complete slice ("ph": "X"); recompute slices too, under
                     their own name and category; frees as instant events ("ph": "i")
    device<-ssd ...  one track per link a transfer (prefetch, swap_in, swap_out, evict) uses, named
                     `dst<-src` ("gone" when an eviction has no destination)

plus one counter ("ph": "C") per tier, `live bytes <tier>`, sampled at every step where the tier's live bytes
change and timed at the start of that step. Huge plans keep at most `MAX_COUNTER_SAMPLES` counter samples in
all: each tier's change points are cut into bins and only each bin's highest and lowest sample are kept, so
every peak survives. Timestamps and durations are microseconds (the format's unit), from the events'
`start_s` and `duration_s`; slices on a track are written in time order. Every slice's `args` name the op
(name, target, module, layer) or the tensor (name, role, size, tiers) it is about.

Format reference: "Trace Event Format" (Google, the document chrome://tracing and Perfetto implement).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from memplan.ir.analysis import timeline
from memplan.ir.graph import Op, Value
from memplan.planner.report import ordered_tiers, tier_rank
from memplan.plans.plan import Event, Plan, jsonable

MAX_COUNTER_SAMPLES = 20_000
TRANSFER_KINDS = frozenset({"prefetch", "swap_in", "swap_out", "evict"})
COMPUTE_TRACK = "compute"
PID = 1
_US = 1e6

TraceEvent = dict[str, Any]


def chrome_trace(plan: Plan) -> str:
    """The trace as JSON text (an object with `traceEvents`)."""
    return json.dumps(trace_dict(plan), separators=(",", ":")) + "\n"


def trace_dict(plan: Plan) -> dict[str, Any]:
    """The trace as a JSON-ready dict: metadata, then slices per track in time order, then counters."""
    tracks = _tracks(plan.events)
    ops = {op.id: op for op in plan.ops}
    values = {v.id: v for v in plan.tensors}
    slices = [_slice(ev, tracks, ops, values) for ev in plan.events]
    slices.sort(key=lambda e: (e["tid"], e["ts"]))
    return {
        "traceEvents": [*_metadata(plan, tracks), *slices, *_counters(plan)],
        "displayTimeUnit": "ns",
        "otherData": _other_data(plan),
    }


def track_of(ev: Event) -> str:
    """The track an event is drawn on: `compute`, or the link `dst<-src` of a transfer."""
    if ev.kind in TRANSFER_KINDS:
        return f"{ev.dst_tier or 'gone'}<-{ev.src_tier or '?'}"
    return COMPUTE_TRACK


def _tracks(events: tuple[Event, ...]) -> dict[str, int]:
    """Track name -> thread id: compute first, then links by destination tier, then source tier."""
    links = {track_of(ev) for ev in events} - {COMPUTE_TRACK}

    def key(name: str) -> tuple[tuple[int, str], tuple[int, str]]:
        dst, src = name.split("<-", 1)
        return tier_rank(dst), tier_rank(src)

    return {name: tid for tid, name in enumerate([COMPUTE_TRACK, *sorted(links, key=key)], start=1)}


def _us(seconds: float) -> float:
    return round(seconds * _US, 6)


def _slice(ev: Event, tracks: dict[str, int], ops: dict[int, Op], values: dict[int, Value]) -> TraceEvent:
    op = ops.get(ev.op_id) if ev.op_id is not None else None
    value = values.get(ev.value_id) if ev.value_id is not None else None
    args: dict[str, Any] = {"step": ev.step}
    if op is not None:
        args |= {
            "op_id": op.id,
            "op": op.name,
            "target": op.target,
            "module": op.module_path,
            "layer": op.layer,
        }
    if value is not None:
        args |= {
            "value_id": value.id,
            "value": value.name,
            "role": str(value.role),
            "size_bytes": value.size_bytes,
        }
    if ev.src_tier or ev.dst_tier:
        args |= {"src_tier": ev.src_tier, "dst_tier": ev.dst_tier}
    out: TraceEvent = {
        "name": _name(ev, op, value),
        "cat": ev.kind,
        "pid": PID,
        "tid": tracks[track_of(ev)],
        "ts": _us(ev.start_s),
        "args": args,
    }
    if ev.kind == "free":
        return out | {"ph": "i", "s": "t"}
    return out | {"ph": "X", "dur": _us(ev.duration_s)}


def _name(ev: Event, op: Op | None, value: Value | None) -> str:
    if ev.kind == "compute":
        return op.name if op is not None else "compute"
    subject = value.name if value is not None else (op.name if op is not None else "?")
    return f"{ev.kind} {subject}"


def _metadata(plan: Plan, tracks: dict[str, int]) -> list[TraceEvent]:
    meta: list[TraceEvent] = [
        {
            "name": "process_name",
            "ph": "M",
            "pid": PID,
            "tid": 0,
            "args": {"name": f"memplan {plan.model.name} ({plan.workload.mode})"},
        },
    ]
    for name, tid in tracks.items():
        meta.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}})
        meta.append(
            {"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}}
        )
    return meta


def step_times_s(plan: Plan, n_steps: int) -> np.ndarray:
    """Start time (s) of every step `0..n_steps` (the last one: the end of the schedule), never decreasing.

    A step starts with its earliest event; a step without events starts when the one before it did.
    """
    t = np.full(n_steps + 1, np.nan)
    steps = np.array([ev.step for ev in plan.events], dtype=np.int64)
    starts = np.array([ev.start_s for ev in plan.events], dtype=np.float64)
    keep = steps <= n_steps
    np.fmin.at(t, steps[keep], starts[keep])
    end = max((ev.start_s + ev.duration_s for ev in plan.events), default=0.0)
    t[n_steps] = end if np.isnan(t[n_steps]) else t[n_steps]
    filled = np.maximum.accumulate(np.where(np.isnan(t), -np.inf, t))
    return np.where(np.isfinite(filled), filled, 0.0)


def counter_steps(live: np.ndarray, cap: int) -> np.ndarray:
    """Steps where `live` changes (and step 0); above `cap` of them, each bin's highest and lowest sample."""
    if len(live) == 0:
        return np.zeros(0, dtype=np.int64)
    changes = np.flatnonzero(np.diff(live, prepend=live[0] - 1))
    if len(changes) <= cap:
        return changes
    bins = np.array_split(changes, max(cap // 2, 1))
    picks = [(b[np.argmax(live[b])], b[np.argmin(live[b])]) for b in bins if len(b)]
    return np.unique(np.array(picks, dtype=np.int64).ravel())


def _counters(plan: Plan) -> list[TraceEvent]:
    n = max([len(plan.ops), *(iv.end for iv in plan.residency)], default=0)
    lives = timeline(plan.residency, n)
    tiers = ordered_tiers(lives)
    times = step_times_s(plan, n)
    cap = MAX_COUNTER_SAMPLES // max(len(tiers), 1)
    out: list[TraceEvent] = []
    for tier in tiers:
        live = lives[tier]
        for s in counter_steps(live, cap):
            out.append(
                {
                    "name": f"live bytes {tier}",
                    "ph": "C",
                    "pid": PID,
                    "ts": _us(float(times[s])),
                    "args": {"bytes": int(live[s])},
                }
            )
    return out


def _other_data(plan: Plan) -> dict[str, Any]:
    return {
        "model": jsonable(plan.model),
        "workload": jsonable(plan.workload),
        "hardware": plan.hardware.name,
        "budget_bytes": dict(plan.budget_bytes),
        "predicted_peak_bytes": dict(plan.predictions.peak_bytes),
        "predicted_time_s": plan.predictions.time_s,
        "memplan_version": plan.memplan_version,
    }
