"""The `schedule` pass on real zoo graphs: its order is topological and verified, its replacement is
executed by the arena runner (inference) and the training executor with outputs equal to the captured
order's, `verify_plan` catches a read of an evicted tensor, the captured order is kept when nothing is
lower, in-place updates keep their readers in order, and a capacity below one op's operands is refused
with the bound."""

from dataclasses import replace

import pytest
import torch

import memplan
from memplan.errors import InfeasibleBudget
from memplan.ir.graph import Graph, Op, Role, Value
from memplan.ir.hardware import load_hardware
from memplan.passes import allocate, schedule
from memplan.passes.manager import run_pipeline
from memplan.passes.schedule import ScheduleOptions
from memplan.passes.schedule_model import build_problem
from memplan.planner.cli import main
from memplan.planner.models import capture, load_model
from memplan.plans.plan import Workload
from memplan.plans.verify import verify_plan
from memplan.runtime.arena import check_arena_run, run_in_arena
from memplan.solvers.schedule_problem import need_bound, peak
from tests.runtime.step import tracked_step

HW = load_hardware("cpu")


def _capacity(graph, mode, share):
    p, _ = build_problem(graph, mode)
    return max(int(peak(p, list(range(p.n_ops)), "capacity") * share), need_bound(p)[0])


@pytest.fixture(scope="module")
def infer():
    loaded = load_model("zoo:gpt2-tiny", "infer", batch=2, seq=32, device="cpu")
    graph, cap = capture(loaded, "infer")
    opts = ScheduleOptions(replace=True, capacity_bytes=_capacity(graph, "infer", 0.5), time_limit_s=2)
    plan = run_pipeline(graph, HW, Workload("infer", 2, 32), 2**30, loaded.source,
                        [schedule.PASS, allocate.PASS], {"schedule": opts})  # fmt: skip
    return loaded, cap, plan, opts.capacity_bytes


def test_replacement_plan_is_verified_and_under_capacity(infer):
    _, _, plan, capacity = infer
    assert verify_plan(plan).ok
    assert plan.predictions.peak_bytes["device"] <= capacity
    kinds = {e.kind for e in plan.events}
    assert {"evict", "swap_in"} <= kinds
    report = plan.passes[1]
    assert report.name == "schedule" and report.solver.status in ("optimal", "feasible", "heuristic")
    assert report.solver.objective is not None and "off-device bytes" in report.notes[1]


def test_arena_runs_the_replacement_with_equal_outputs(infer):
    loaded, cap, plan, _ = infer
    run = run_in_arena(plan, cap, loaded.module, loaded.example_inputs)
    check = check_arena_run(run, plan, cap, loaded.module, loaded.example_inputs)
    assert check.ok, check


def test_verify_catches_a_read_of_an_evicted_tensor(infer):
    _, _, plan, _ = infer
    # drop one reload: the device interval it began is gone, so the op there reads a tensor not resident
    load = next(e for e in plan.events if e.kind == "swap_in" and e.step > 0)
    begun = (load.value_id, "device", load.step)
    kept = tuple(iv for iv in plan.residency if (iv.value_id, iv.tier, iv.start) != begun)
    found = verify_plan(plan.with_(residency=kept)).violations
    assert any(v.kind == "use-before-def" for v in found)


def test_training_step_under_reorder_and_replacement_gives_equal_gradients():
    loaded = load_model("zoo:gpt2-tiny", "train", batch=2, seq=32, device="cpu")
    model, inputs = loaded.module, loaded.example_inputs
    ref_loss, ref_grads, _ = tracked_step(model, inputs)
    graph, _ = capture(load_model(model, "train", inputs), "train")
    opts = ScheduleOptions(replace=True, capacity_bytes=_capacity(graph, "train", 0.5), time_limit_s=2)
    plan = run_pipeline(graph, HW, Workload("train", 2, 32), 2**30, "module", [schedule.PASS],
                        {"schedule": opts})  # fmt: skip
    assert plan.decisions.order is not None and any(e.kind == "evict" for e in plan.events)
    loss, grads, _ = tracked_step(model, inputs, plan)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


def _fork_graph() -> Graph:
    """x -> big1 -> small1, x -> big2 -> small2, add(small1, small2): captured with both bigs live."""
    v = [Value(0, "x", 64, "float32", (16,), Role.INPUT)]
    made = [(1, "big1", 4096), (2, "big2", 4096), (3, "s1", 64), (4, "s2", 64), (5, "y", 64)]
    v += [Value(i, n, s, "float32", (s // 4,), Role.ACTIVATION) for i, n, s in made]
    ops = [Op(0, "b1", "aten.relu.default", (0,), (1,)), Op(1, "b2", "aten.relu.default", (0,), (2,)),
           Op(2, "r1", "aten.sum.default", (1,), (3,)), Op(3, "r2", "aten.sum.default", (2,), (4,)),
           Op(4, "add", "aten.add.Tensor", (3, 4), (5,))]  # fmt: skip
    return Graph("fork", tuple(v), tuple(ops), (5,))


def test_order_lowers_the_peak_and_is_kept_only_when_lower():
    graph = _fork_graph()
    plan = run_pipeline(graph, HW, Workload("infer", 1), 2**30, "fork", [schedule.PASS])
    assert plan.decisions.order is not None and verify_plan(plan).ok
    assert plan.predictions.peak_bytes["device"] == 64 + 4096 + 64 + 64  # one big live at a time
    chain = replace(graph, ops=graph.ops[:1])
    kept = run_pipeline(chain, HW, Workload("infer", 1), 2**30, "chain", [schedule.PASS])
    assert kept.decisions.order is None and "captured order kept" in kept.passes[-1].notes[0]


def test_in_place_updates_keep_their_readers_in_order():
    v = [Value(0, "x", 64, "float32", (16,), Role.INPUT),
         Value(1, "a", 64, "float32", (16,), Role.ACTIVATION),
         Value(2, "r", 64, "float32", (16,), Role.ACTIVATION),
         Value(3, "a2", 0, "float32", (16,), Role.ACTIVATION, alias_of=1),
         Value(4, "s", 64, "float32", (16,), Role.ACTIVATION)]  # fmt: skip
    ops = [Op(0, "mk", "aten.relu.default", (0,), (1,)),
           Op(1, "rd", "aten.neg.default", (1,), (2,)),
           Op(2, "upd", "aten.add_.Tensor", (1,), (3,)),
           Op(3, "rd2", "aten.neg.default", (3,), (4,))]  # fmt: skip
    p, _ = build_problem(Graph("inplace", tuple(v), tuple(ops), (2, 4)), "infer")
    assert 1 in p.preds[2]  # the read of `a` before its in-place update stays before it


def test_capacity_below_one_op_is_refused_with_the_bound():
    graph = _fork_graph()
    with pytest.raises(InfeasibleBudget, match="No order or replacement can go below 4160 bytes"):
        run_pipeline(graph, HW, Workload("infer", 1), 1000, "fork", [schedule.PASS])


def test_cli_plan_with_schedule_and_allocate(tmp_path, capsys):
    path = tmp_path / "p.json"
    argv = ["plan", "zoo:gpt2-tiny", "--mode", "infer", "--batch", "1", "--seq", "8", "--budget", "600KiB",
            "--passes", "schedule,allocate", "-o", str(path)]  # fmt: skip
    assert main(argv) == 0
    assert main(["verify", str(path)]) == 0
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Schedule" in out and "off-device" in out
    plan = memplan.load(str(path))
    assert plan.predictions.peak_bytes["device"] <= 600 * 1024
