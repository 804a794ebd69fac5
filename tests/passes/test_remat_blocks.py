"""Checkpointed blocks as a `remat_swap` decision: which layers qualify, what a block holds, and that the
MILP's options never get worse (lowest peak, predicted time) for having them."""

import pytest

from memplan.errors import InfeasibleBudget
from memplan.ir.hardware import load_hardware
from memplan.passes.baseline import baseline_plan
from memplan.passes.remat_blocks import find_blocks
from memplan.passes.remat_candidates import find_candidates
from memplan.passes.remat_swap import RematSwapOptions, run
from memplan.planner.models import capture, load_model
from memplan.plans.plan import Workload
from memplan.plans.verify import verify_plan

HW = load_hardware("cpu")


@pytest.fixture(scope="module", params=["zoo:gpt2-tiny", "zoo:llama-tiny"])
def graph(request):
    return capture(load_model(request.param, "train", batch=4, seq=64), "train")[0]


def _plan(graph, budget, **opts):
    start = baseline_plan(graph, HW, Workload("train", 4, 64), {"device": budget, "ssd": 2**36}, "zoo:tiny")
    return run(graph, HW, start, RematSwapOptions(**opts))


def _lowest(graph, **opts):
    with pytest.raises(InfeasibleBudget) as err:
        _plan(graph, 1, **opts)
    return err.value.lower_bound_bytes


def test_every_layer_is_a_block(graph):
    ph, cands = find_candidates(graph, HW, HW.tier("ssd"))
    blocks = find_blocks(graph, HW, cands, ph)
    layers = sorted({op.layer for op in graph.ops[: ph.fwd_end] if op.layer is not None})
    assert [b.layer for b in blocks] == layers
    by_id = {c.value_id: c for c in cands}
    for b in blocks:
        assert all(graph.ops[i].layer == b.layer for i in b.ops) and b.recompute_s > 0
        assert b.members and all(by_id[m].produced in b.ops for m in b.members)
        assert b.rebuild_step == min(by_id[m].first_bwd_use for m in b.members) >= ph.fwd_end
        assert b.frontier and not set(b.frontier) & set(b.members)
        assert any(graph.producer(f) not in b.ops for f in b.frontier)  # the block's input comes from outside


def test_blocks_lower_the_lowest_peak(graph):
    assert _lowest(graph) <= _lowest(graph, allow_blocks=False)


def test_checkpointed_plan_is_valid(graph):
    """Every block checkpointed (`checkpoint_blocks`), recompute only, at a budget that needs it."""
    base = _plan(graph, 2**40).plan
    budget = int(base.predictions.peak_bytes["device"] * 0.8)
    out = _plan(graph, budget, allow_swap=False, checkpoint_blocks=True)
    plan = out.plan
    assert plan.predictions.peak_bytes["device"] <= budget
    assert verify_plan(plan).ok
    decided = plan.decisions.remat
    blocks = decided.blocks
    ph, cands = find_candidates(graph, HW, None)
    assert [b.layer for b in blocks] == [b.layer for b in find_blocks(graph, HW, cands, ph)]
    members = {m for b in blocks for m in b.members}
    for t in decided.tensors:
        if t.value_id in members:
            assert t.decision == "recompute" and t.block is not None and not t.recompute_ops
    assert any("checkpointed blocks" in n for n in out.report.notes)
    rebuilds = {(e.step, e.value_id) for e in plan.events if e.kind == "recompute"}
    assert all((b.rebuild_step, m) in rebuilds for b in blocks for m in b.members)
    free = _plan(graph, budget, allow_swap=False).plan
    assert free.predictions.time_s <= plan.predictions.time_s  # the MILP's own choice is never slower
