"""The calls a training loop really makes under `memplan.applied`: a batch of another shape (refused with a
clear `PlanMismatch`, or planned by the `replan` callback), eval mode (the plain model), gradient accumulation
(bitwise the plain accumulation), summed micro-batches (refused), autocast (bitwise the plain autocast step
when planned under it, refused otherwise) and keyword inputs (refused)."""

import pytest
import torch

import memplan
from memplan.errors import InvalidInput, PlanMismatch
from memplan.runtime.calls import CallSpec
from tests.runtime.hf import LossOf, assert_bitwise, gpt2, step


@pytest.fixture(scope="module")
def setup():
    """A 2-layer, width-128 GPT-2 (dropout 0.1), batch 4, seq 64, planned at 60% of its plain peak."""
    model = LossOf(gpt2(2, 128), use_cache=False)
    x = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(0))
    base = memplan.plan(model, (x,), mode="train", passes=[], budget="1GiB", hardware="cpu")
    budget = int(0.6 * base.predictions.peak_bytes["device"])
    plan = memplan.plan(model, (x,), mode="train", budget=budget, hardware="cpu")
    assert {t.decision for t in plan.decisions.remat.tensors} - {"keep"}
    return model, x, plan, budget


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "cut, says",
    [
        (lambda x: x[:3], r"input 0 has shape \[3, 64\] \(int64 on cpu\) where the plan has shape \[4, 64\]"),
        (lambda x: x[:, :32], r"input 0 has shape \[4, 32\]"),
    ],
    ids=["last-smaller-batch", "new-seq-len"],
)
def test_other_shape_refused(setup, cut, says):
    model, x, plan, _ = setup
    with memplan.applied(plan, model):
        model(x).backward()
        with pytest.raises(PlanMismatch, match=says + ".*Re-plan for this call.*replan=.*drop_last=True"):
            model(cut(x))


def test_other_shape_planned_by_callback(setup):
    """The last, smaller batch of an epoch is planned once by `replan` and runs bitwise as the plain step."""
    model, x, plan, budget = setup
    small = x[:2]
    asked = []

    def replan(inputs):
        asked.append(tuple(inputs[0].shape))
        return memplan.plan(model, inputs, mode="train", budget=budget, hardware="cpu")

    ref = step(model, (small,))
    torch.manual_seed(1)
    with memplan.applied(plan, model, replan=replan):
        for batch in (x, small, x, small):
            for p in model.parameters():
                p.grad = None
            if batch is small:
                torch.manual_seed(1)
            model(batch).backward()
    assert asked == [(2, 64)]
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), ref[1], strict=True))


def test_eval_mode_runs_the_plain_model(setup):
    """`model.eval()` inside the block (grad enabled) runs the plain model: no dropout, its own autograd."""
    model, x, plan, _ = setup
    model.eval()
    ref = model(x)
    model.train()
    with memplan.applied(plan, model):
        model.eval()
        try:
            out = model(x)
        finally:
            model.train()
        assert out.requires_grad and out.grad_fn is not None and torch.equal(out, ref)
        model(x).backward()  # training mode again: the planned step


def test_gradient_accumulation_bitwise(setup):
    """Two micro-batches (a forward and a backward each) before the optimizer step: the accumulated
    gradients are bitwise the plain ones, dropout masks included."""
    model, x, plan, _ = setup
    x2 = torch.roll(x, 1, dims=0)

    def accumulate(applied):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(1)
        with applied:
            for b in (x, x2):
                model(b).backward()
        return _grads(model), torch.get_rng_state()

    ref_grads, ref_state = accumulate(torch.enable_grad())
    grads, state = accumulate(memplan.applied(plan, model))
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    assert torch.equal(state, ref_state)


def test_summed_micro_batches_refused(setup):
    """Two planned forwards before one backward would run over each other's tensors: refused at backward;
    a forward whose loss is dropped unused (logging) does not stop the next step."""
    model, x, plan, _ = setup
    with memplan.applied(plan, model):
        with pytest.raises(PlanMismatch, match="a later forward replaced.*call backward on each loss"):
            (model(x) + model(x)).backward()
        model(x)  # a loss computed and dropped
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = None
        model(x).backward()
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), step(model, (x,))[1], strict=True))


def test_autocast_bitwise_when_planned_under_it(setup):
    model, x, _, budget = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = memplan.plan(model, (x,), mode="train", budget=budget, hardware="cpu")
        ref = step(model, (x,))
        got = step(model, (x,), plan)
    assert_bitwise(got, ref)
    assert got[3] <= budget


def test_autocast_refused_when_not_planned_under_it(setup):
    model, x, plan, _ = setup
    with memplan.applied(plan, model):
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            pytest.raises(PlanMismatch, match=r"re-plan .* \(under the same torch.autocast as this call\)"),
        ):
            model(x)
        model(x).backward()
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            pytest.raises(PlanMismatch, match=r"autocast is on \(cpu: bfloat16\) where the plan has off"),
        ):
            model(x)


def test_keyword_inputs_refused(setup):
    model, x, plan, _ = setup
    with memplan.applied(plan, model), pytest.raises(InvalidInput, match="passes x by keyword"):
        model(x=x)


def test_call_spec_says_what_differs():
    planned = CallSpec.of((torch.zeros(2, 3), 4))
    assert planned.difference(CallSpec.of((torch.zeros(2, 3), 4))) is None
    assert (
        planned.difference(CallSpec.of((torch.zeros(2, 3),))) == "number of inputs is 1 where the plan has 2"
    )
    assert (
        planned.difference(CallSpec.of((torch.zeros(2, 3), 5)))
        == "input 1 has the value 5 where the plan has the value 4"
    )
    assert (
        planned.difference(CallSpec.of((torch.zeros(2, 3, dtype=torch.float64), 4)))
        == "input 0 has shape [2, 3] (float64 on cpu) where the plan has shape [2, 3] (float32 on cpu)"
    )
