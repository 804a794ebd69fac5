"""Splitting a saved activation by rows (MEMO's token-wise split): which tensors can be split, when the MILP
splits, and what a split plan holds (rows swapped, the rest rebuilt, budget held, plan valid)."""

import pytest

from memplan.ir.graph import PERSISTENT_ROLES
from memplan.ir.hardware import load_hardware
from memplan.ir.row_ops import ROW_OPS
from memplan.passes.baseline import baseline_plan
from memplan.passes.remat_candidates import find_candidates, rows_of
from memplan.passes.remat_swap import RematSwapOptions, run
from memplan.planner.models import capture, load_model
from memplan.plans.plan import Workload
from memplan.plans.verify import verify_plan


@pytest.fixture(scope="module", params=["zoo:gpt2-tiny", "zoo:llama-tiny"])
def graph(request):
    return capture(load_model(request.param, "train", batch=4, seq=64), "train")[0]


def _plan(graph, hw, fraction, **opts):
    budgets = {"device": 2**40, "host": 2**34}
    base = baseline_plan(graph, hw, Workload("train", 4, 64), budgets, "zoo:tiny")
    budget = int(base.predictions.peak_bytes["device"] * fraction)
    start = baseline_plan(graph, hw, Workload("train", 4, 64), budgets | {"device": budget}, "zoo:tiny")
    out = run(graph, hw, start, RematSwapOptions(**opts))
    return out.plan, budget, out.report


def test_splittable_closures_are_row_wise(graph):
    hw = load_hardware("cpu")
    _, cands = find_candidates(graph, hw, hw.tier("ssd"))
    split = [c for c in cands if c.can_split]
    assert split and len(split) < len(cands)  # MLP and norm outputs split; attention scores do not
    for c in split:
        assert c.rows == rows_of(graph.value(c.value_id).shape) > 1
        for i in c.recompute_ops:
            op = graph.ops[i]
            assert op.target in ROW_OPS
            carried = [
                v
                for v in (*op.inputs, *op.outputs)
                if graph.value(graph.storage_of(v)).role not in PERSISTENT_ROLES
            ]
            assert all(rows_of(graph.value(v).shape) == c.rows for v in carried)
    softmax = [c for c in cands if graph.ops[c.produced].target == "aten._softmax.default"]
    assert softmax and not any(c.can_split for c in softmax)


def test_slow_link_makes_splits_that_hold_the_budget(graph, link_bound_hw):
    plan, budget, report = _plan(graph, link_bound_hw, 0.65)
    assert any("split tensors" in n for n in report.notes)
    assert plan.predictions.peak_bytes["device"] <= budget
    checked = verify_plan(plan)
    assert checked.ok, checked.violations[:3]
    tensors = plan.decisions.remat.tensors
    split = [t for t in tensors if t.decision == "split"]
    assert split, "a link too slow to swap everything should leave some tensor split"
    host = {iv.value_id: iv.size_bytes for iv in plan.residency if iv.tier == "host"}
    for t in split:
        assert 0 < t.swap_rows < t.rows and t.recompute_ops
        assert host[t.value_id] == t.size_bytes // t.rows * t.swap_rows
    kinds = {(e.kind, e.value_id) for e in plan.events}
    assert all({("swap_out", t.value_id), ("recompute", t.value_id)} <= kinds for t in split)


def test_split_switched_off(graph, link_bound_hw):
    plan, budget, _ = _plan(graph, link_bound_hw, 0.65, allow_split=False)
    assert plan.predictions.peak_bytes["device"] <= budget
    assert "split" not in {t.decision for t in plan.decisions.remat.tensors}
