"""memplan.applied: a plan applied from a training script gives the same loss and gradients as the plain
step, and the real peak, measured by the live-storage tracker, stays under the budget."""

import pytest
import torch

import memplan
from memplan.errors import InvalidInput, PlanMismatch
from memplan.passes.remat_swap import RematSwapOptions
from memplan.planner.models import load_model
from tests.runtime.step import tracked_step


@pytest.fixture(scope="module")
def setup():
    loaded = load_model("zoo:gpt2-tiny", "train", batch=4, seq=64, device="cpu")
    model, inputs = loaded.module, loaded.example_inputs
    base = memplan.plan(model, inputs, mode="train", passes=[], budget="1GiB")
    ref_loss, ref_grads, ref_peak = _step(model, inputs)
    return model, inputs, base.predictions.peak_bytes["device"], ref_loss, ref_grads, ref_peak


_step = tracked_step


@pytest.mark.parametrize(
    "fraction, opts", [(0.75, {"allow_swap": False}), (0.5, {}), (0.6, {"per_layer": True})]
)
def test_same_gradients_and_peak_under_budget(setup, fraction, opts):
    model, inputs, base_peak, ref_loss, ref_grads, ref_peak = setup
    budget = int(base_peak * fraction)
    from memplan.passes import remat_swap
    from memplan.passes.manager import run_pipeline
    from memplan.planner.models import capture
    from memplan.plans.plan import Workload

    loaded = load_model(model, "train", inputs)
    graph, _ = capture(loaded, "train")
    plan = run_pipeline(
        graph,
        memplan.ir.load_hardware("cpu"),
        Workload("train", 4, 64),
        budget,
        "module",
        [remat_swap.PASS],
        {"remat_swap": RematSwapOptions(**opts)},
    )
    moved = {t.decision for t in plan.decisions.remat.tensors} - {"keep"}
    assert moved
    loss, grads, peak = _step(model, inputs, plan)
    assert torch.equal(loss, ref_loss)
    assert all(
        torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True)
    )  # bitwise: same ops, same order
    assert peak <= budget < ref_peak
    assert abs(peak - plan.predictions.peak_bytes["device"]) <= 0.05 * peak


def test_applied_twice_and_model_restored(setup):
    model, inputs, base_peak, ref_loss, *_ = setup
    plan = memplan.plan(model, inputs, mode="train", budget=int(base_peak * 0.6))
    with memplan.applied(plan, model):
        for _ in range(2):
            for p in model.parameters():
                p.grad = None
            loss = model(*inputs)
            loss.backward()
            assert torch.equal(loss.detach(), ref_loss)
    assert "forward" not in vars(model)  # the class's forward is back


def test_wrong_model_or_mode_refused(setup):
    model, inputs, *_ = setup
    plan = memplan.plan(model, inputs, mode="train", budget="1GiB")
    other = load_model("zoo:llama-tiny", "train", batch=4, seq=64, device="cpu")
    with (
        pytest.raises(PlanMismatch, match="not the one the plan was made for"),
        memplan.applied(plan, other.module),
    ):
        other.module(*other.example_inputs)
    infer = memplan.plan("zoo:gpt2-tiny", mode="infer", budget="1GiB")
    with pytest.raises(InvalidInput, match="training plan"), memplan.applied(infer, model):
        pass


def test_measured_peak_holds_at_the_lowest_feasible_budget(setup):
    """At the exact lower bound the pass reports, the run's real peak is still within the budget (no slack
    hides a modelling error: recompute siblings, the autograd seed and held inputs are all accounted)."""
    model, inputs, *_ = setup
    with pytest.raises(memplan.InfeasibleBudget) as err:
        memplan.plan(model, inputs, mode="train", budget=1000)
    budget = err.value.lower_bound_bytes
    plan = memplan.plan(model, inputs, mode="train", budget=budget)
    _, _, peak = _step(model, inputs, plan)
    assert peak <= budget
