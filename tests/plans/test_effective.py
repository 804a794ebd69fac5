"""The effective state: order and bits decisions change what every analysis sees (steps are positions in
the chosen order, bytes are the stored ones), the fingerprint does not change, and every typed decision
record survives JSON; the decision checker refuses records that contradict the plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.errors import PlanMismatch
from memplan.ir.analysis import timeline
from memplan.ir.graph import Graph, Op, Role, Value
from memplan.ir.hardware import load_hardware
from memplan.passes.baseline import baseline_plan, rebased
from memplan.plans.decisions import (
    AllocateDecision,
    Arena,
    BitsDecision,
    BlockRemat,
    Decisions,
    DeviceCopy,
    KVBudget,
    KVCalibration,
    KVDecision,
    KVHeadStats,
    OrderDecision,
    PlacementDecision,
    RematDecision,
    TensorBits,
    TensorPlacement,
    TensorRemat,
    TierPacking,
)
from memplan.plans.effective import effective_graph
from memplan.plans.plan import Plan, Workload, fingerprint
from memplan.plans.serialize import load_plan, plan_from_dict, plan_to_dict, save_plan, validate_plan_dict
from memplan.plans.verify import verify_plan

HW = load_hardware("a100-40gb")


def diamond() -> Graph:
    """x -> a -> c and x -> b -> c: a and b may run in either order; b is large, so running it first
    keeps it live while a runs."""
    values = (
        Value(0, "x", 1024, "float32", (256,), Role.INPUT),
        Value(1, "w", 4096, "float32", (32, 32), Role.PARAMETER),
        Value(2, "a", 1024, "float32", (256,), Role.ACTIVATION),
        Value(3, "b", 8192, "float32", (2048,), Role.ACTIVATION),
        Value(4, "a2", 1024, "float32", (256,), Role.ACTIVATION),
        Value(5, "c", 1024, "float32", (256,), Role.OUTPUT),
    )
    ops = (
        Op(0, "op_a", "aten.relu.default", (0,), (2,)),
        Op(1, "op_a2", "aten.mul.Tensor", (2, 1), (4,)),
        Op(2, "op_b", "aten.mm.default", (0, 1), (3,)),
        Op(3, "op_c", "aten.add.Tensor", (4, 3), (5,)),
    )
    return Graph("diamond", values, ops, (5,))


@pytest.fixture
def plan() -> Plan:
    return baseline_plan(diamond(), HW, Workload("infer", 1), {"device": 2**20}, "test:diamond")


def test_order_moves_steps_not_the_fingerprint(plan: Plan) -> None:
    b_first = rebased(plan.with_(decisions=Decisions(order=OrderDecision((2, 0, 1, 3)))))
    g = b_first.graph()
    assert [op.name for op in g.ops] == ["op_b", "op_a", "op_a2", "op_c"]
    assert g.producer(3) == 0 and g.producer(2) == 1  # steps are positions in the chosen order
    assert fingerprint(g) == plan.model.fingerprint == fingerprint(plan.captured_graph())
    assert [e.op_id for e in b_first.events if e.kind == "compute"] == [2, 0, 1, 3]
    before = timeline(plan.residency, 4)["device"].tolist()
    after = timeline(b_first.residency, 4)["device"].tolist()
    assert before == [6144, 7168, 14336, 15360] and after == [13312, 14336, 15360, 15360]
    assert verify_plan(b_first).ok, verify_plan(b_first).violations


def test_bits_change_the_bytes_every_analysis_sees(plan: Plan) -> None:
    int4 = TensorBits(1, "int4", group_size=32, symmetric=False, scale_layout="per-group")
    small = rebased(plan.with_(decisions=Decisions(bits=BitsDecision((int4,)))))
    # 1024 elements at 4 bits, plus 32 groups x (fp16 scale + fp16 zero point)
    assert small.graph().value(1).size_bytes == 1024 // 2 + 32 * 4
    assert plan.graph().value(1).size_bytes == 4096
    w = next(iv for iv in small.residency if iv.value_id == 1)
    assert w.size_bytes == 640
    drop = plan.predictions.peak_bytes["device"] - small.predictions.peak_bytes["device"]
    assert drop == 4096 - 640


def test_stored_bytes_by_layout() -> None:
    shape = (64, 128)  # 8192 elements
    assert TensorBits(0, "int8", scale_layout="per-channel").stored_bytes(shape) == 8192 + 64 * 2
    assert TensorBits(0, "int3", scale_layout="none").stored_bytes(shape) == 8192 * 3 // 8
    assert TensorBits(0, "int2", 64, False, "per-group", "float32").stored_bytes(shape) == 2048 + 128 * 8
    assert TensorBits(0, "bf16").stored_bytes(shape) == 16384 and TensorBits(0, "int4").bits == 4


@pytest.mark.parametrize(
    "decisions, message",
    [
        (Decisions(order=OrderDecision((0, 1, 2))), "not a permutation"),
        (Decisions(order=OrderDecision((1, 0, 2, 3))), "reads a first written at step 1"),
        (Decisions(bits=BitsDecision((TensorBits(9, "int8"),))), "value 9 is not a storage"),
        (Decisions(kv=KVDecision((KVBudget(0, -1),))), "layer 0 head None: -1 tokens at None bits"),
        (Decisions(placement=PlacementDecision((TensorPlacement(1, "cxl"),))), "which the hardware lacks"),
        (Decisions(placement=PlacementDecision((TensorPlacement(1, "ssd"),))), "has no residency there"),
    ],
)
def test_contradicting_records_are_caught(plan: Plan, decisions: Decisions, message: str) -> None:
    bad = plan.with_(decisions=decisions)
    found = [v for v in verify_plan(bad).violations if v.kind == "bad-decision"]
    assert any(message in v.message for v in found), found


def test_a_v1_file_is_refused_naming_both_versions(plan: Plan, tmp_path) -> None:
    d = plan_to_dict(plan)
    d["schema_version"] = 1
    d["decisions"] = {"remat_swap": {"tier": None, "tensors": []}}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanMismatch, match="plan schema version 1, this memplan reads version 2"):
        load_plan(path)


def _remat(n: int) -> RematDecision:
    tensors = tuple(
        TensorRemat(
            i,
            f"t{i}",
            kind,
            64 * (i + 1),
            i % 2,
            0,
            1,
            2,
            3,
            2,
            2,
            (0, 1),
            (4,),
            (2,),
            8,
            3 if kind == "split" else 0,
            None,
        )
        for i, kind in zip(range(n), ("keep", "swap", "recompute", "split") * n, strict=False)
    )
    return RematDecision("ssd", tensors, (BlockRemat(0, 2, (0, 1), (0, 1), (4,), (4,)),))


def _calibration() -> KVCalibration:
    heads = tuple(
        KVHeadStats(layer, head, (0.5, 1.0), 1.5, 0.1, 0.2, ((0.01, 0.02), (0.0, 0.001)))
        for layer in range(2)
        for head in (None, 0)
    )
    return KVCalibration((0.5, 1.0), (None, 4), heads, 2, 1, 64, 4, 48, 16, 3)


RECORDS = st.builds(
    Decisions,
    order=st.none() | st.just(OrderDecision((0, 1, 2, 3))),
    bits=st.none()
    | st.lists(st.sampled_from(["int8", "int4", "int3", "int2", "bf16", "fp16"]), min_size=1, max_size=3).map(
        lambda fs: BitsDecision(tuple(TensorBits(i, f, 32) for i, f in enumerate(fs)))
    ),
    kv=st.none()
    | st.integers(0, 4096).map(
        lambda t: KVDecision(
            (KVBudget(0, t, 4, None, 80 * t), KVBudget(1, t, None, 0, 512 * t)), 4, 32, 8, 32, "memplan", t,
            600 * t, _calibration(),
        )
    ),
    remat=st.none() | st.integers(1, 8).map(_remat),
    placement=st.none()
    | st.just(PlacementDecision((TensorPlacement(1, "ssd", 0, 128, (DeviceCopy(1, 3),)),))),
    allocate=st.none()
    | st.just(
        AllocateDecision(
            (Arena("device", "device", 4096, 64),),
            (TierPacking("device", 4096, 4000, "feasible", "greedy", 3, 0.1),),
        )
    ),
)


@settings(max_examples=40, deadline=None)
@given(records=RECORDS)
def test_every_record_survives_json(records: Decisions) -> None:
    plan = baseline_plan(diamond(), HW, Workload("infer", 1), {"device": 2**20}, "test:diamond")
    d = json.loads(json.dumps(plan_to_dict(plan.with_(decisions=records))))
    validate_plan_dict(d, source="test")
    assert plan_from_dict(d).decisions == records


def test_saved_plan_with_records_loads_equal(plan: Plan, tmp_path) -> None:
    ordered = rebased(plan.with_(decisions=Decisions(order=OrderDecision((2, 0, 1, 3)))))
    save_plan(ordered, tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    assert back == ordered and effective_graph(back).ops == ordered.graph().ops
    assert replace(back, decisions=Decisions()).graph().ops == plan.graph().ops
