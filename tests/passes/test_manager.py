"""The pass manager: passes compose (a later pass keeps what an earlier one placed), requirements and
ordering are checked before a pass, budgets of every tier after it, and a failing pass is named."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from memplan.errors import InfeasibleBudget, InternalError, InvalidInput
from memplan.ir.graph import Graph, Role
from memplan.ir.hardware import Hardware
from memplan.passes import allocate, remat_swap
from memplan.passes.base import PassOutput, PassSpec
from memplan.passes.baseline import rebased
from memplan.passes.manager import run_pipeline
from memplan.planner.models import capture, load_model
from memplan.plans.decisions import DeviceCopy, PlacementDecision, TensorPlacement
from memplan.plans.plan import Event, PassReport, Plan, SolverReport, Workload
from memplan.plans.verify import verify_plan

WORK = Workload("train", 4, 64)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return capture(load_model("zoo:gpt2-tiny", "train", batch=4, seq=64), "train")[0]


@dataclass(frozen=True)
class PinOptions:
    """Which storage the test pass keeps on the host (its device copy only from `from_step`)."""

    value_id: int
    from_step: int


def pin_to_host(graph: Graph, hardware: Hardware, plan: Plan, options: PinOptions) -> PassOutput:
    """A stand-in for a placement pass: one storage lives on the host and is prefetched to the device."""
    placed = TensorPlacement(
        options.value_id, "host", copies=(DeviceCopy(options.from_step, len(graph.ops) - 1),)
    )
    new = rebased(plan.with_(decisions=plan.decisions.with_(placement=PlacementDecision((placed,)))))
    size = graph.value(options.value_id).size_bytes
    prefetch = Event(
        "prefetch",
        options.from_step,
        value_id=options.value_id,
        src_tier="host",
        dst_tier="device",
        duration_s=size / hardware.tier("host").read_bw,
    )
    new = new.with_(events=(*new.events, prefetch))
    return PassOutput(new, PassReport("pin_to_host", 0.0, SolverReport("none", "trivial")))


PIN = PassSpec("pin_to_host", pin_to_host, PinOptions, before=frozenset({"allocate"}))


def _pinned(graph: Graph) -> PinOptions:
    """The largest parameter, on the device only from its first use."""
    param = max((v for v in graph.storages() if v.role == Role.PARAMETER), key=lambda v: v.size_bytes)
    return PinOptions(param.id, graph.consumers(param.id)[0])


def test_remat_swap_keeps_an_earlier_placement(graph: Graph, fast_host_hw: Hardware) -> None:
    pin = _pinned(graph)
    placed = run_pipeline(graph, fast_host_hw, WORK, 2**40, "t", [PIN], {"pin_to_host": pin})
    budget = int(placed.predictions.peak_bytes["device"] * 0.6)
    plan = run_pipeline(
        graph, fast_host_hw, WORK, budget, "t", [PIN, remat_swap.PASS, allocate.PASS], {"pin_to_host": pin}
    )
    assert plan.decisions.placement == placed.decisions.placement
    assert plan.decisions.remat is not None and plan.decisions.remat.moved()
    mine = sorted((iv.tier, iv.start, iv.end) for iv in plan.residency if iv.value_id == pin.value_id)
    before = sorted((iv.tier, iv.start, iv.end) for iv in placed.residency if iv.value_id == pin.value_id)
    assert mine == before and ("host", 0, len(graph.ops)) in mine
    assert any(e.kind == "prefetch" and e.value_id == pin.value_id for e in plan.events)
    assert plan.predictions.peak_bytes["device"] <= budget
    assert plan.predictions.peak_bytes["host"] >= graph.value(pin.value_id).size_bytes
    assert verify_plan(plan).ok, verify_plan(plan).violations
    assert pin.value_id in plan.offsets["host"]


def test_pass_order_and_options_are_checked(graph: Graph, fast_host_hw: Hardware) -> None:
    with pytest.raises(
        InvalidInput, match="'remat_swap' cannot run after baseline, allocate: it must run before allocate"
    ):
        run_pipeline(graph, fast_host_hw, WORK, 2**40, "t", [allocate.PASS, remat_swap.PASS])
    with pytest.raises(InvalidInput, match="options for pass 'remat_swap' must be a RematSwapOptions"):
        run_pipeline(graph, fast_host_hw, WORK, 2**40, "t", [remat_swap.PASS], {"remat_swap": {"x": 1}})
    with pytest.raises(InvalidInput, match="options given for passes not in the pipeline: allocate"):
        run_pipeline(graph, fast_host_hw, WORK, 2**40, "t", [remat_swap.PASS], {"allocate": None})
    needs = PassSpec("needs_order", pin_to_host, PinOptions, requires=frozenset({"order"}))
    with pytest.raises(InvalidInput, match="needs order decided first"):
        run_pipeline(graph, fast_host_hw, WORK, 2**40, "t", [needs])


def test_a_failing_pass_is_named_with_the_passes_before(graph: Graph, fast_host_hw: Hardware) -> None:
    def broken(graph: Graph, hardware: Hardware, plan: Plan, options: PinOptions) -> PassOutput:
        raise ValueError("boom")

    spec = PassSpec("broken", broken, PinOptions)
    with pytest.raises(
        InternalError, match=r"pass 'broken' failed \(after baseline, pin_to_host\): ValueError: boom"
    ):
        run_pipeline(
            graph,
            fast_host_hw,
            WORK,
            2**40,
            "t",
            [PIN, spec],
            {"pin_to_host": _pinned(graph), "broken": _pinned(graph)},
        )


def test_a_pass_that_breaks_the_plan_is_caught(graph: Graph, fast_host_hw: Hardware) -> None:
    def no_prefetch(graph: Graph, hardware: Hardware, plan: Plan, options: PinOptions) -> PassOutput:
        out = pin_to_host(graph, hardware, plan, options)
        return PassOutput(out.plan.with_(events=plan.events), out.report)

    spec = PassSpec("no_prefetch", no_prefetch, PinOptions)
    with pytest.raises(InternalError, match="plan invalid after pass 'no_prefetch': prefetch-late"):
        run_pipeline(graph, fast_host_hw, WORK, 2**40, "t", [spec], {"no_prefetch": _pinned(graph)})


def test_every_tier_budget_is_held(graph: Graph, fast_host_hw: Hardware) -> None:
    pin = _pinned(graph)
    size = graph.value(pin.value_id).size_bytes
    with pytest.raises(InfeasibleBudget, match="host budget .* is infeasible") as info:
        run_pipeline(graph, fast_host_hw, WORK, {"host": size // 2}, "t", [PIN], {"pin_to_host": pin})
    assert info.value.lower_bound_bytes == size and "Raise the host budget" in str(info.value)
    with pytest.raises(InvalidInput, match="budget for tier 'cxl', which fast-host lacks"):
        run_pipeline(graph, fast_host_hw, WORK, {"cxl": 2**30}, "t", [])
    with pytest.raises(InvalidInput, match="the host budget must be a positive size"):
        run_pipeline(graph, fast_host_hw, WORK, {"host": 0}, "t", [])


def test_remat_swap_is_skipped_for_inference(fast_host_hw: Hardware) -> None:
    graph = capture(load_model("zoo:gpt2-tiny", "infer", batch=1, seq=16), "infer")[0]
    plan = run_pipeline(graph, fast_host_hw, Workload("infer", 1, 16), 2**40, "t", [remat_swap.PASS])
    assert [p.name for p in plan.passes] == ["baseline"] and plan.decisions.remat is None
