"""The bits record: candidates fitted to each tensor, transposed weights priced as the matrix they multiply
by, and `verify` refusing candidates priced for another tensor, a choice outside its candidates, broken
ties."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memplan.ir.graph import Graph, Op, Role, Value
from memplan.ir.hardware import load_hardware
from memplan.passes.baseline import baseline_plan, rebased
from memplan.plans.decisions import (
    BitsDecision,
    Candidate,
    CandidateCost,
    Decisions,
    TensorBits,
    TensorCandidates,
    largest_divisor,
)
from memplan.plans.plan import Plan, Workload
from memplan.plans.serialize import plan_from_dict, plan_to_dict, validate_plan_dict
from memplan.plans.verify import verify_plan


def test_a_group_is_fitted_to_the_rows_it_divides() -> None:
    int4 = Candidate("int4", False, "per-group", 128)
    assert int4.label == "int4-g128-asym" and Candidate("int8", True, "per-channel").label == "int8-ch-sym"
    assert int4.for_tensor(0, (64, 256)).group_size == 128
    assert int4.for_tensor(0, (256, 96)).group_size == 96  # 128 does not divide 96: its largest divisor below
    assert int4.for_tensor(0, (96, 256), transposed=True).group_size == 96  # rows of the [256, 96] transpose
    assert [largest_divisor(n, 128) for n in (256, 96, 100, 7)] == [128, 96, 100, 7]
    assert largest_divisor(1000, 128) == 125


def test_transposed_weights_are_priced_as_the_matrix_they_multiply_by() -> None:
    shape = (64, 256)  # a Conv1D weight: [in, out]
    per_channel = TensorBits(0, "int8", None, True, "per-channel", transposed=True)
    assert per_channel.quantized_shape(shape) == (256, 64)
    assert per_channel.stored_bytes(shape) == 64 * 256 + 256 * 2  # one fp16 scale per output channel
    assert replace(per_channel, transposed=False).stored_bytes(shape) == 64 * 256 + 64 * 2


def _plan() -> Plan:
    values = (
        Value(0, "x", 256, "float32", (1, 64), Role.INPUT),
        Value(1, "a.q_proj.weight", 16384, "float32", (64, 64), Role.PARAMETER),
        Value(2, "a.k_proj.weight", 16384, "float32", (64, 64), Role.PARAMETER),
        Value(3, "y", 256, "float32", (1, 64), Role.ACTIVATION),
        Value(4, "z", 256, "float32", (1, 64), Role.OUTPUT),
    )
    ops = (Op(0, "q", "aten.mm.default", (0, 1), (3,)), Op(1, "k", "aten.mm.default", (3, 2), (4,)))
    graph = Graph("two", values, ops, (4,))
    return baseline_plan(graph, load_hardware("cpu"), Workload("infer", 1, 1), {"device": 2**20}, "test:two")


def _row(vid: int) -> TensorCandidates:
    shape = (64, 64)
    keep = TensorBits(vid, "fp32")
    int8 = Candidate("int8", True, "per-channel").for_tensor(vid, shape)
    return TensorCandidates(vid, 0.5, "hutchinson", (
        CandidateCost("fp32", keep, 0.0, keep.stored_bytes(shape)),
        CandidateCost("int8-ch-sym", int8, 0.1, int8.stored_bytes(shape)),
    ))  # fmt: skip


def _with(plan: Plan, bits: BitsDecision) -> Plan:
    return rebased(plan.with_(decisions=Decisions(bits=bits)))


def test_a_consistent_record_verifies_and_survives_json() -> None:
    plan = _plan()
    int8 = _row(1).candidates[1].bits
    good = _with(plan, BitsDecision((int8, replace(int8, value_id=2)), (_row(1), _row(2)), ((1, 2),), "t"))
    assert verify_plan(good).ok, verify_plan(good).violations
    assert good.graph().value(1).size_bytes == 64 * 64 + 64 * 2
    d = plan_to_dict(good)
    validate_plan_dict(d, "test")
    assert plan_from_dict(d).decisions == good.decisions


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("priced", "is not priced for it"),
        ("outside", "none of its candidates"),
        ("tie", "tied values [1, 2] are stored as fp32, int8-ch-sym"),
        ("unknown", "not a storage of the plan"),
    ],
)
def test_verify_refuses_an_inconsistent_record(broken: str, message: str) -> None:
    plan = _plan()
    rows = [_row(1), _row(2)]
    int8 = rows[0].candidates[1].bits
    tensors: tuple[TensorBits, ...] = (int8, replace(int8, value_id=2))
    if broken == "priced":
        bad = replace(rows[0].candidates[1], stored_bytes=1)
        rows[0] = replace(rows[0], candidates=(rows[0].candidates[0], bad))
    elif broken == "outside":
        tensors = (replace(int8, format="int4", scale_layout="per-group", group_size=32), tensors[1])
    elif broken == "tie":
        tensors = (int8,)
    else:
        rows.append(replace(_row(1), value_id=9))
    report = verify_plan(_with(plan, BitsDecision(tensors, tuple(rows), ((1, 2),), "t")))
    found = [v.message for v in report.violations if v.kind == "bad-decision"]
    assert any(message in m for m in found), found
