"""A swapped storage that the forward writes in place after making it (dropout's `empty_like` +
`bernoulli_` + `div_`, a residual `add_` on a saved activation) leaves once its last write is done and
comes back as that value: its in-place ops are not run again on arrival, so the mask is not drawn anew nor
the residual added twice (nor its freed operand read)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memplan
from memplan.passes.manager import run_pipeline
from memplan.passes.remat_candidates import find_candidates
from memplan.passes.remat_schedule import Choice, apply_decisions
from memplan.planner.models import capture, load_model
from memplan.plans.plan import Workload
from memplan.runtime.writes import last_forward_writes


def _residual(a):
    b = a.clone()
    b.add_(torch.sin(a))  # written in place after it is made, reading a value freed at once; saved by `b * b`
    return b * b


class _Net(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.fc1, self.fc2, self.inner = nn.Linear(16, 64), nn.Linear(64, 8), inner

    def forward(self, x):
        return self.fc2(self.inner(torch.tanh(self.fc1(x)))).pow(2).mean()


def _swap_written(model, x, hw):
    """A plan swapping every saved storage the forward writes in place after making it, keeping the rest."""
    graph, _ = capture(load_model(model, "train", (x,)), "train")
    base = run_pipeline(graph, hw, Workload("train", x.shape[0], None), 2**40, "module", [], {})
    ph, cands = find_candidates(graph, hw, hw.tier("host"))
    written = last_forward_writes(graph, ph.fwd_end)
    forced = {c.value_id for c in cands if written.get(c.value_id, -1) > c.produced}
    cands = [
        replace(c, swap_write_done=c.last_fwd_use + 1, prefetch_step=c.first_bwd_use - 1)
        if c.value_id in forced
        else c
        for c in cands
    ]
    assert all(c.can_swap for c in cands if c.value_id in forced)
    choice = [Choice("swap" if c.value_id in forced else "keep") for c in cands]
    assert forced
    return apply_decisions(graph, hw, base, cands, choice, hw.tier("host"))


def _step(model, x, plan=None):
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = None
    with memplan.applied(plan, model) if plan is not None else torch.enable_grad():
        loss = model(x)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()


@pytest.mark.parametrize("inner", [lambda a: F.dropout(a, 0.1, True), _residual], ids=["dropout", "add_"])
def test_swapped_storage_written_in_place_comes_back_as_written(inner, fast_host_hw):
    torch.manual_seed(0)
    model, x = _Net(inner), torch.randn(4, 8, 16)
    plan = _swap_written(model, x, fast_host_hw)
    loss, grads, state = _step(model, x, plan)
    ref_loss, ref_grads, ref_state = _step(model, x)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    assert torch.equal(state, ref_state)
