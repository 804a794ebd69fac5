"""The allocate pass: offsets per tier from a plan's residency, checked by the plan verifier and the packer's
own checker; several intervals of one storage share one offset; the SSD tier is page-aligned."""

from __future__ import annotations

from memplan.ir.analysis import Interval
from memplan.ir.graph import Graph, Op, Role, Value
from memplan.ir.hardware import load_hardware
from memplan.passes import allocate
from memplan.passes.baseline import baseline_plan
from memplan.plans.plan import Plan, Workload
from memplan.plans.verify import verify_plan
from memplan.solvers.packing import validate


def chain_graph(n_ops: int = 6) -> Graph:
    """x -> op0 -> a0 -> op1 -> a1 ... with a weight read by every op; sizes vary so packing matters."""
    values = [
        Value(0, "x", 4096, "float32", (1024,), Role.INPUT),
        Value(1, "w", 8192, "float32", (2048,), Role.PARAMETER),
    ]
    ops = []
    for i in range(n_ops):
        out = Value(
            2 + i, f"a{i}", 1024 * (1 + (i * 7) % 5), "float32", (256 * (1 + (i * 7) % 5),), Role.ACTIVATION
        )
        values.append(out)
        src = 0 if i == 0 else 2 + i - 1
        extra = (2 + i - 3,) if i >= 3 else ()  # a skip connection keeps an older activation alive
        ops.append(Op(i, f"op{i}", "aten.mul.Tensor", (src, 1, *extra), (out.id,)))
    return Graph("chain", tuple(values), tuple(ops), (2 + n_ops - 1,))


def base_plan() -> tuple[Graph, Plan]:
    graph = chain_graph()
    hw = load_hardware("cpu")
    return graph, baseline_plan(graph, hw, Workload("infer", 1), {"device": 1 << 30}, "test")


def test_offsets_pass_the_plan_verifier() -> None:
    graph, plan = base_plan()
    out = allocate.run(graph, plan.hardware, plan, allocate.AllocateOptions(timeout_s=2.0))
    new = out.plan
    assert set(new.offsets["device"]) == {iv.value_id for iv in plan.residency}
    assert all(off % 64 == 0 for off in new.offsets["device"].values())
    assert verify_plan(new).ok, verify_plan(new).violations
    arena = new.predictions.arena_bytes["device"]
    assert arena >= plan.predictions.max_load_bytes
    assert out.report.name == "allocate" and out.report.solver.objective == arena
    assert new.decisions.allocate.packing("device").arena_bytes == arena
    assert plan.offsets == {}  # the input plan is untouched


def test_several_intervals_share_one_offset_and_ssd_is_page_aligned() -> None:
    ivs = [
        Interval(1, "device", 0, 2, 3000),
        Interval(1, "device", 5, 8, 3000),  # swapped out over [2, 5)
        Interval(1, "ssd", 2, 5, 3000),
        Interval(2, "device", 2, 5, 5000),  # may reuse value 1's bytes while it is away
        Interval(3, "device", 0, 8, 1000),
        Interval(4, "ssd", 0, 8, 10000),
        Interval(5, "ssd", 3, 4, 100),
    ]
    allocs = allocate.allocate_intervals(ivs, {"device": 64}, timeout_s=2.0)
    dev, ssd = allocs["device"], allocs["ssd"]
    assert dev.solution.height_bytes == dev.solution.lower_bound_bytes  # 5000 + 1000 (aligned) at best
    assert all(o % 4096 == 0 for o in ssd.offsets_bytes.values())
    for tier, a in allocs.items():
        problem, ids = allocate.tier_problem(
            [iv for iv in ivs if iv.tier == tier], 4096 if tier == "ssd" else 64
        )
        assert validate(problem, [a.offsets_bytes[v] for v in ids]) == []


def test_budget_overrun_is_noted() -> None:
    graph, plan = base_plan()
    tight = plan.with_(budget_bytes={"device": 1024})
    out = allocate.run(graph, tight.hardware, tight, allocate.AllocateOptions(timeout_s=1.0))
    assert any("exceeds the device budget 1024" in n for n in out.report.notes)
