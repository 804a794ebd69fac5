"""The Chrome trace exporter: valid JSON, a slice per plan event on the right track, µs timings, counters."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pytest

from memplan.ir.analysis import Interval, timeline
from memplan.ir.graph import Role
from memplan.planner.exporters import EXPORTERS
from memplan.planner.exporters.chrome_trace import (
    MAX_COUNTER_SAMPLES,
    chrome_trace,
    counter_steps,
    step_times_s,
)
from memplan.plans.effective import predictions_for
from memplan.plans.plan import Event, Plan


@pytest.fixture(scope="module")
def plan(train_plan: Plan) -> Plan:
    return train_plan


def offloaded(plan: Plan) -> Plan:
    """The plan with an activation swapped to host and back, a weight prefetched from SSD, a recompute, a
    free, and predictions recomputed from that residency."""
    by_id = {v.id: v for v in plan.tensors}
    acts = [
        iv for iv in plan.residency if by_id[iv.value_id].role == Role.ACTIVATION and iv.end - iv.start >= 6
    ]
    swapped = max(acts, key=lambda iv: (iv.size_bytes, iv.end - iv.start))
    streamed = max(
        (iv for iv in plan.residency if by_id[iv.value_id].role == Role.PARAMETER),
        key=lambda iv: iv.size_bytes,
    )
    s, e, mid = swapped.start, swapped.end, (swapped.start + swapped.end) // 2
    residency = [iv for iv in plan.residency if iv not in (swapped, streamed)] + [
        Interval(swapped.value_id, "device", s, s + 2, swapped.size_bytes),
        Interval(swapped.value_id, "host", s + 2, e - 2, swapped.size_bytes),
        Interval(swapped.value_id, "device", e - 2, e, swapped.size_bytes),
        Interval(streamed.value_id, "ssd", 0, streamed.end, streamed.size_bytes),
        Interval(streamed.value_id, "device", mid, streamed.end, streamed.size_bytes),
    ]
    t = {ev.step: ev.start_s for ev in plan.events if ev.kind == "compute"}
    rebuilt = next(op for op in plan.ops[mid:] if by_id[op.outputs[0]].size_bytes > 0)
    step_r = plan.ops.index(rebuilt)
    extra = [
        Event(
            "swap_out",
            s + 1,
            value_id=swapped.value_id,
            src_tier="device",
            dst_tier="host",
            start_s=t[s + 1],
            duration_s=2e-6,
        ),
        Event(
            "swap_in",
            e - 3,
            value_id=swapped.value_id,
            src_tier="host",
            dst_tier="device",
            start_s=t[e - 3],
            duration_s=2e-6,
        ),
        Event(
            "prefetch",
            mid - 1,
            value_id=streamed.value_id,
            src_tier="ssd",
            dst_tier="device",
            start_s=t[mid - 1],
            duration_s=5e-6,
        ),
        Event(
            "recompute",
            step_r,
            op_id=rebuilt.id,
            value_id=rebuilt.outputs[0],
            start_s=t[step_r],
            duration_s=1e-6,
        ),
        Event("free", step_r + 1, value_id=rebuilt.outputs[0], src_tier="device", start_s=t[step_r + 1]),
    ]
    events = tuple(sorted((*plan.events, *extra), key=lambda ev: (ev.start_s, ev.step)))
    return plan.with_(
        residency=tuple(residency),
        events=events,
        predictions=predictions_for(plan.graph(), residency, events),
    )


@pytest.fixture(scope="module")
def moved(plan: Plan) -> Plan:
    return offloaded(plan)


@pytest.fixture(scope="module")
def trace(moved: Plan) -> dict[str, Any]:
    return json.loads(chrome_trace(moved))


def _slices(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] in ("X", "i")]


def _track_names(trace: dict[str, Any]) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}


def test_registered_and_returns_json_text(plan: Plan) -> None:
    assert EXPORTERS["chrome-trace"] is chrome_trace
    text = EXPORTERS["chrome-trace"](plan)
    assert isinstance(text, str)
    assert isinstance(json.loads(text)["traceEvents"], list)


def test_one_slice_per_event_of_each_kind(moved: Plan, trace: dict[str, Any]) -> None:
    slices = _slices(trace)
    assert len(slices) == len(moved.events)
    assert Counter(e["cat"] for e in slices) == Counter(ev.kind for ev in moved.events)
    assert {"swap_out", "swap_in", "prefetch", "recompute", "free"} <= {e["cat"] for e in slices}


def test_tracks(trace: dict[str, Any]) -> None:
    names = _track_names(trace)
    by_cat = defaultdict(set)
    for e in _slices(trace):
        by_cat[e["cat"]].add(names[e["tid"]])
    assert by_cat["compute"] == {"compute"}
    assert by_cat["recompute"] == {"compute"}
    assert by_cat["swap_out"] == {"host<-device"}
    assert by_cat["swap_in"] == {"device<-host"}
    assert by_cat["prefetch"] == {"device<-ssd"}
    assert any(e["name"] == "process_name" for e in trace["traceEvents"])


def test_timestamps_monotone_per_track(trace: dict[str, Any]) -> None:
    last: dict[int, float] = {}
    for e in _slices(trace):
        assert e["ts"] >= last.get(e["tid"], 0.0), e
        last[e["tid"]] = e["ts"]
    counter_ts: dict[str, float] = {}
    for e in (e for e in trace["traceEvents"] if e["ph"] == "C"):
        assert e["ts"] >= counter_ts.get(e["name"], 0.0)
        counter_ts[e["name"]] = e["ts"]


def test_durations_in_microseconds_and_args(moved: Plan, trace: dict[str, Any]) -> None:
    computes = sorted((e for e in _slices(trace) if e["cat"] == "compute"), key=lambda e: e["args"]["step"])
    events = [ev for ev in moved.events if ev.kind == "compute"]
    ops = {op.id: op for op in moved.ops}
    for e, ev in zip(computes, events, strict=True):
        assert ev.op_id is not None
        assert e["ts"] == pytest.approx(ev.start_s * 1e6, abs=1e-6)
        assert e["dur"] == pytest.approx(ev.duration_s * 1e6, abs=1e-6)
        assert e["args"]["op"] == ops[ev.op_id].name and e["args"]["target"] == ops[ev.op_id].target
    total_us = sum(e["dur"] for e in computes)
    assert total_us == pytest.approx(sum(ev.duration_s for ev in events) * 1e6, rel=1e-6)
    swap = next(e for e in _slices(trace) if e["cat"] == "swap_out")
    value = next(v for v in moved.tensors if v.id == swap["args"]["value_id"])
    assert swap["dur"] == pytest.approx(2.0)
    assert swap["args"]["value"] == value.name and swap["args"]["size_bytes"] == value.size_bytes


def test_counters_reach_the_predicted_peaks(moved: Plan, trace: dict[str, Any]) -> None:
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    peaks: dict[str, int] = defaultdict(int)
    for e in counters:
        tier = e["name"].removeprefix("live bytes ")
        peaks[tier] = max(peaks[tier], e["args"]["bytes"])
    assert dict(peaks) == moved.predictions.peak_bytes
    assert set(peaks) == {"device", "host", "ssd"}


def test_counter_steps_keep_peaks_under_the_cap() -> None:
    rng = np.random.default_rng(0)
    live = np.cumsum(rng.integers(-100, 101, size=50_000))
    steps = counter_steps(live, cap=1000)
    assert len(steps) <= 1000
    assert int(np.argmax(live)) in steps and int(np.argmin(live)) in steps
    assert np.all(np.diff(steps) > 0)
    flat = np.array([5, 5, 5, 7, 7, 3])
    assert counter_steps(flat, cap=100).tolist() == [0, 3, 5]


def test_huge_plan_is_capped(plan: Plan) -> None:
    rng = np.random.default_rng(1)
    n, k = 50_000, 50_000
    vids = rng.choice([v.id for v in plan.tensors], size=k).tolist()
    starts = rng.integers(0, n - 1, size=k)
    ends = np.minimum(starts + rng.integers(1, 2000, size=k), n).tolist()
    sizes = rng.integers(1, 10**8, size=k).tolist()
    res = tuple(
        Interval(vids[i], "device" if i % 3 else "host", s, ends[i], sizes[i])
        for i, s in enumerate(starts.tolist())
    )
    events = tuple(Event("compute", i, start_s=i * 1e-5, duration_s=1e-5) for i in range(0, n, 10))
    big = plan.with_(residency=res, events=events)
    counters = [e for e in json.loads(chrome_trace(big))["traceEvents"] if e["ph"] == "C"]
    assert 0 < len(counters) <= MAX_COUNTER_SAMPLES
    for tier, live in timeline(res, n).items():
        samples = [e["args"]["bytes"] for e in counters if e["name"] == f"live bytes {tier}"]
        assert max(samples) == int(live.max())


def test_step_times_fill_gaps_and_never_decrease(plan: Plan) -> None:
    events = (
        Event("compute", 0, start_s=0.0, duration_s=1.0),
        Event("compute", 3, start_s=2.0, duration_s=0.5),
    )
    times = step_times_s(plan.with_(events=events), 4)
    assert times.tolist() == [0.0, 0.0, 0.0, 2.0, 2.5]
