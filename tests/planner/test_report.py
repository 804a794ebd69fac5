"""The plan summary: the numbers behind it, and both renderers (plain text and rich tables) showing them."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import memplan
from memplan.planner.report import TOP_TENSORS, _describe, render_summary, summarize, summary_text
from memplan.plans.decisions import (
    BitsDecision,
    OrderDecision,
    PlacementDecision,
    TensorBits,
    TensorPlacement,
)
from memplan.plans.effective import predictions_for
from memplan.plans.plan import PassReport, Plan, SolverReport
from memplan.units import format_size
from tests.planner.conftest import host_midlife


@pytest.fixture(scope="module")
def plan(train_plan: Plan) -> Plan:
    return train_plan


@pytest.fixture(scope="module")
def rich_plan(plan: Plan) -> Plan:
    """The plan with its largest activation on the host mid-life, a solver pass, decisions, warnings."""
    moved, _ = host_midlife(plan)
    residency = moved.residency
    solver = SolverReport(
        "highs", "feasible", objective=1234.5, bound=1200.0, gap=0.0279, time_s=0.5, time_limit_s=10
    )
    extra = PassReport("remat_swap", 0.75, solver, ("swap 1 activation to host", "saves [64 KiB]"))
    return plan.with_(
        residency=tuple(residency),
        predictions=predictions_for(plan.graph(), residency, plan.events),
        passes=(*plan.passes, extra),
        decisions=plan.decisions.with_(order=OrderDecision(tuple(sorted(op.id for op in plan.ops)))),
        warnings=("op foo had no cost formula [estimated]",),
    )


def test_peaks_and_ratios(plan: Plan) -> None:
    s = summarize(plan)
    device = next(t for t in s.tiers if t.tier == "device")
    pred = plan.predictions
    assert device.peak_bytes == pred.peak_bytes["device"] and device.step == pred.peak_step["device"]
    assert device.budget_bytes == 2**30
    assert device.op.startswith(plan.ops[pred.peak_step["device"]].name)
    assert device.vs_max_load == pytest.approx(pred.peak_bytes["device"] / pred.max_load_bytes)
    assert device.vs_working_set == pytest.approx(pred.peak_bytes["device"] / pred.working_set_bytes)
    assert [t.tier for t in s.tiers] == ["device", "ssd"]
    ssd = s.tiers[1]
    assert ssd.peak_bytes == 0 and ssd.step is None and ssd.vs_max_load is None


def test_tensors_and_roles_at_the_device_peak(plan: Plan) -> None:
    s = summarize(plan)
    step = plan.predictions.peak_step["device"]
    live = [iv for iv in plan.residency if iv.tier == "device" and iv.start <= step < iv.end]
    assert s.live_tensor_count == len(live)
    sizes = sorted((iv.size_bytes for iv in live), reverse=True)
    assert [t.size_bytes for t in s.top_tensors] == sizes[:TOP_TENSORS]
    assert sum(b for _, b in s.role_bytes) == plan.predictions.peak_bytes["device"]
    by_id = {v.id: v for v in plan.tensors}
    expect: dict[str, int] = {}
    for iv in live:
        role = str(by_id[iv.value_id].role)
        expect[role] = expect.get(role, 0) + iv.size_bytes
    assert dict(s.role_bytes) == expect
    assert [b for _, b in s.role_bytes] == sorted(expect.values(), reverse=True)


def test_summary_text(plan: Plan) -> None:
    text = summary_text(plan)
    assert memplan.summary(plan) == text
    s = summarize(plan)
    for needle in (
        "gpt2-tiny",
        "train, batch 2",
        "Peak per tier",
        "device",
        "1.00 GiB",
        format_size(plan.predictions.peak_bytes["device"]),
        "baseline",
        "trivial",
        "Warnings (0)",
    ):
        assert needle in text, needle
    for t in s.top_tensors:
        assert t.name in text
    assert f"top {TOP_TENSORS} of {s.live_tensor_count}" in text


def test_passes_decisions_and_warnings(rich_plan: Plan) -> None:
    s = summarize(rich_plan)
    row = s.passes[-1]
    assert (row.name, row.solver, row.status, row.objective, row.bound, row.gap) == (
        "remat_swap",
        "highs",
        "feasible",
        1234.5,
        1200.0,
        0.0279,
    )
    n = len(rich_plan.ops)
    assert dict(s.decisions)["schedule"] == f"{n} ops, 0 away from their captured position"
    text = summary_text(rich_plan)
    for needle in (
        "remat_swap",
        "highs",
        "feasible",
        "1234.5",
        "2.79%",
        "swap 1 activation to host",
        "0 away from their captured position",
        "Warnings (1)",
        "op foo had no cost formula [estimated]",
    ):
        assert needle in text, needle
    host = next(t for t in s.tiers if t.tier == "host")
    assert host.peak_bytes > 0 and host.budget_bytes is None and host.vs_max_load is None


def test_long_decisions_are_cut() -> None:
    formats = ("int2", "int3", "int4", "int8") * 3
    bits = BitsDecision(tuple(TensorBits(i, fmt) for i, fmt in enumerate(formats)))
    assert _describe(bits) == "12 tensors: int2 3, int3 3, int4 3, int8 3"
    placed = PlacementDecision(tuple(TensorPlacement(i, f"tier-{i}") for i in range(40)))
    text = _describe(placed)
    assert len(text) == 100 and text.endswith("…")


def test_render_summary_shows_the_same_tables(rich_plan: Plan) -> None:
    console = Console(file=io.StringIO(), width=240, record=True, color_system=None)
    render_summary(rich_plan, console)
    out = console.export_text()
    s = summarize(rich_plan)
    needles = [
        "Peak per tier",
        "host",
        "remat_swap",
        "2.79%",
        "0 away from their captured position",
        "op foo had no cost formula [estimated]",
        "saves [64 KiB]",
        *(t.name for t in s.top_tensors),
    ]
    for needle in needles:
        assert needle in out, needle
