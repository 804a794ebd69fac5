"""The user's report (issue 10): a plain HF GPT-2 in training mode, the loss written the usual way, under
`memplan.applied`. With the config's dropout (0.1) loss and gradients are bitwise the plain step's at every
budget, and the generator ends where eager leaves it; the default call (`use_cache` on: a `DynamicCache`
built in training mode, whose empty start is a constant of the trace) runs, at no extra planned cost."""

import pytest
import torch

import memplan
from memplan.errors import InfeasibleBudget
from tests.runtime.hf import LossOf, assert_bitwise, gpt2, step


@pytest.fixture(scope="module")
def user_model():
    """GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=256), batch 4, seq 128."""
    model = LossOf(gpt2(4, 256), use_cache=False)
    x = torch.randint(0, 2048, (4, 128), generator=torch.Generator().manual_seed(0))
    base = memplan.plan(model, (x,), mode="train", passes=[], budget="1GiB", hardware="cpu")
    fixed = sum(p.numel() * p.element_size() for p in model.parameters()) + x.numel() * x.element_size()
    return model, x, base.predictions.peak_bytes["device"], fixed, step(model, (x,))


def _plan(model, x, budget):
    """The plan at `budget`, or at the lowest feasible budget if that one is infeasible (and which one)."""
    try:
        return memplan.plan(model, (x,), mode="train", budget=budget, hardware="cpu"), budget
    except InfeasibleBudget as e:
        low = e.lower_bound_bytes
        return memplan.plan(model, (x,), mode="train", budget=low, hardware="cpu"), low


@pytest.mark.parametrize(
    "share, of",
    [(0.5, "peak"), (0.35, "peak"), (0.5, "activations"), (0.35, "activations")],
)
def test_dropout_bitwise_at_every_budget(user_model, share, of):
    """50% of the plain peak is feasible; 35% is not (the lowest feasible, ~39%, is used: parameters and
    gradients are a third of the peak), so 35% and 50% of the activation part (peak minus parameters and
    input) are tested too."""
    model, x, peak, fixed, ref = user_model
    wanted = int(peak * share) if of == "peak" else int(fixed + share * (peak - fixed))
    plan, budget = _plan(model, x, wanted)
    assert budget == wanted or (of, share) == ("peak", 0.35)
    assert {t.decision for t in plan.decisions.remat.tensors} - {"keep"}
    got = step(model, (x,), plan)
    assert_bitwise(got, ref)
    assert got[3] <= budget < ref[3]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_default_call_with_cache(attn):
    """The user's 2-layer, width-128 variant (`KeyError: 55` before) at ten times its peak and at 60%."""
    model = LossOf(gpt2(2, 128, attn_implementation=attn))
    x = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(0))
    base = memplan.plan(model, (x,), mode="train", passes=[], budget="1GiB", hardware="cpu")
    peak = base.predictions.peak_bytes["device"]
    no_cache = LossOf(model.model, use_cache=False)
    base_no_cache = memplan.plan(no_cache, (x,), mode="train", passes=[], budget="1GiB", hardware="cpu")
    assert peak <= base_no_cache.predictions.peak_bytes["device"]  # the cache costs nothing it does not
    ref = step(model, (x,))
    for budget in (10 * peak, int(0.6 * peak)):
        plan = memplan.plan(model, (x,), mode="train", budget=budget, hardware="cpu")
        got = step(model, (x,), plan)
        assert_bitwise(got, ref)
        assert got[3] <= budget


def test_unused_outputs_cost_nothing_and_run():
    """Attention maps, hidden states and the cache (a `ModelOutput` the loss does not read) are made and
    dropped: the plan runs, bitwise, and plans no more than the bare call."""
    model = LossOf(
        gpt2(2, 64, attn_implementation="eager"), output_attentions=True, output_hidden_states=True
    )
    x = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    bare = LossOf(model.model, use_cache=False)
    peaks = [
        memplan.plan(m, (x,), mode="train", passes=[], budget="1GiB").predictions.peak_bytes["device"]
        for m in (model, bare)
    ]
    assert peaks[0] <= peaks[1]
    plan = memplan.plan(model, (x,), mode="train", budget=int(0.7 * peaks[0]), hardware="cpu")
    assert_bitwise(step(model, (x,), plan), step(model, (x,)))
