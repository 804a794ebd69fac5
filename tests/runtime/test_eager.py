"""memplan.applied(..., mechanism="torch"): the plan applied by selective activation checkpointing and
saved-tensor hooks gives the plain step's loss and gradients, lowers the measured peak when it recomputes,
sends the plan's swaps through the tier store (and leaves it empty), and restores the model. Its peak is
predicted at entry (a dry run on fake tensors, equal to the measured peak here): a plan whose budget it
would exceed is refused with the numbers, one it accepts is held; `plan_for_torch` plans lower until the
mechanism fits a budget."""

from __future__ import annotations

import copy
import gc
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import pytest
import torch

import memplan
from memplan.errors import InvalidInput, PlanMismatch
from memplan.ir.hardware import Hardware, load_hardware
from memplan.passes import remat_swap
from memplan.passes.manager import run_pipeline
from memplan.passes.remat_swap import RematSwapOptions
from memplan.planner.models import capture, load_model
from memplan.planner.torch_mechanism import plan_for_torch
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan, Workload
from memplan.runtime.eager import EagerInfo, applied_torch, find_blocks
from memplan.runtime.eager_peak import TorchOverBudget, predict_peak
from memplan.runtime.tiers.factory import open_tier
from memplan.runtime.tracker import LiveStorageTracker

BATCH, SEQ = 4, 64
Step = tuple[torch.Tensor, list[torch.Tensor], int, Any]


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], int, Step]:
    """gpt2-tiny, its inputs, the unplanned predicted peak, the plain step (loss, grads, measured peak)."""
    loaded = load_model("zoo:gpt2-tiny", "train", batch=BATCH, seq=SEQ, device="cpu")
    model, inputs = loaded.module, loaded.example_inputs
    assert model is not None
    base = memplan.plan(model, inputs, mode="train", passes=[], budget="1GiB")
    return model, inputs, base.predictions.peak_bytes["device"], _step(model, inputs, torch.enable_grad())


def _step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], ctx: AbstractContextManager[Any]) -> Step:
    """(loss, gradients, measured peak bytes, what `ctx` yielded) of one forward + backward inside `ctx`."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    gc.collect()
    with ctx as info, LiveStorageTracker() as tracker:
        tracker.track([*params, *inputs])
        loss = model(*inputs)
        loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    return loss.detach(), grads, tracker.result.peak_bytes, info


def _plan(model: torch.nn.Module, inputs: Any, hw: Hardware, budget: int, **opts: Any) -> Plan:
    graph, _ = capture(load_model(model, "train", inputs), "train")
    options = {"remat_swap": RematSwapOptions(**opts)}
    work = Workload("train", BATCH, SEQ)
    return run_pipeline(graph, hw, work, budget, "module", [remat_swap.PASS], options)


def _torch(plan: Plan, model: torch.nn.Module, store: Any = None) -> AbstractContextManager[Any]:
    """The mechanism without its budget check: these plans are planned for the graph mechanism's peak."""
    return applied_torch(plan, model, store=store, refuse_over_budget=False)


def _restored(model: torch.nn.Module) -> bool:
    return all("forward" not in vars(m) for m in model.modules())


def test_recompute_plan_same_gradients_lower_peak(setup: Any) -> None:
    model, inputs, base_peak, (ref_loss, ref_grads, ref_peak, _) = setup
    plan = _plan(model, inputs, load_hardware("cpu"), int(base_peak * 0.75), allow_swap=False)
    assert "recompute" in {t.decision for t in plan.decisions.remat.tensors}
    loss, grads, peak, info = _step(model, inputs, _torch(plan, model))
    assert isinstance(info, EagerInfo) and info.checkpointed == [0, 1]
    assert info.sac["recompute"] > 0 and info.sac["save"] > 0 and info.sac["unlisted"] == 0
    assert torch.equal(loss, ref_loss)  # the same ops on the same inputs, recomputed or not
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    predicted = plan.predictions.peak_bytes["device"]
    print(f"\nrecompute plan: measured peak {peak} B, plan predicts {predicted} B, plain step {ref_peak} B")
    assert peak < ref_peak  # not necessarily <= predicted: SAC's granularity differs (module docstring)
    assert _restored(model)


def test_swap_plan_bitwise_through_the_store(setup: Any, fast_host_hw: Hardware) -> None:
    model, inputs, base_peak, (ref_loss, ref_grads, ref_peak, _) = setup
    plan = _plan(model, inputs, fast_host_hw, int(base_peak * 0.8), allow_recompute=False)
    assert {t.decision for t in plan.decisions.remat.tensors} == {"keep", "swap"}
    with open_tier(fast_host_hw, "host") as store:
        loss, grads, peak, info = _step(model, inputs, _torch(plan, model, store))
        stats = store.stats()
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))  # same ops, same bytes back
    assert info.checkpointed == [] and info.swap_layers == [0, 1] and info.missed_swaps == 0
    assert info.swapped_tensors > 0 and stats.puts == info.swapped_tensors == info.loaded_tensors
    assert stats.bytes_written == info.swapped_bytes == stats.bytes_read
    assert info.prefetched_tensors > 0  # block 0's tensors were prefetched when backward reached block 1
    assert stats.live_bytes == 0  # every swapped tensor came back and was freed on the tier
    predicted = plan.predictions.peak_bytes["device"]
    print(f"\nswap plan: measured peak {peak} B, plan predicts {predicted} B, plain step {ref_peak} B")
    assert peak < ref_peak and info.held_on_device == 0  # the swapped storages left the device
    loss2, _, _, info2 = _step(model, inputs, _torch(plan, model))  # store opened and closed by applied
    assert torch.equal(loss2, ref_loss) and info2.swapped_tensors == info.swapped_tensors
    assert _restored(model)


def test_swaps_left_on_the_tier_are_freed_on_error(setup: Any, fast_host_hw: Hardware) -> None:
    model, inputs, base_peak, _ = setup
    plan = _plan(model, inputs, fast_host_hw, int(base_peak * 0.8), allow_recompute=False)
    with open_tier(fast_host_hw, "host") as store:
        with pytest.raises(RuntimeError, match="boom"), _torch(plan, model, store) as info:
            loss = model(*inputs)  # forward only: the swapped tensors are on the tier
            assert info.swapped_tensors > 0 and store.stats().live_bytes > 0
            raise RuntimeError("boom")
        assert store.stats().live_bytes == 0 and _restored(model)
        del loss  # its graph's packed tensors go; the store was already emptied
        assert store.stats().live_bytes == 0


def test_sac_and_swap_blocks_together(setup: Any, fast_host_hw: Hardware) -> None:
    """Layer 0 recomputes (SAC; a swap there stays on the device), layer 1 swaps through the hooks."""
    model, inputs, base_peak, (ref_loss, ref_grads, _, _) = setup
    plan = _plan(model, inputs, fast_host_hw, int(base_peak * 0.75), allow_swap=False)
    tensors = plan.decisions.remat.tensors
    kept0 = next(t for t in tensors if t.layer == 0 and t.decision == "keep" and t.size_bytes > 4096)
    kept1 = [
        t for t in tensors if t.layer == 1 and t.decision != "recompute" and t.size_bytes > 4096
    ]
    swapped1 = {t.name for t in kept1[:3]}

    def changed(t: TensorRemat) -> TensorRemat:
        if t is kept0 or t.name in swapped1:
            return replace(t, decision="swap")
        if t.layer == 1 and t.decision == "recompute":
            return replace(t, decision="keep", recompute_ops=())
        return t

    remat = replace(plan.decisions.remat, tier="host", tensors=tuple(changed(t) for t in tensors))
    mixed = plan.with_(decisions=plan.decisions.with_(remat=remat))
    with open_tier(fast_host_hw, "host") as store:
        loss, grads, _, info = _step(model, inputs, _torch(mixed, model, store))
        stats = store.stats()
    assert info.checkpointed == [0] and info.swap_layers == [1]
    assert info.swaps_recomputed == [kept0.name]  # SAC cannot swap: recomputed, not kept on the device
    assert info.sac["recompute"] > 0 and 0 < info.swapped_tensors <= len(swapped1)
    assert stats.puts == info.swapped_tensors and stats.live_bytes == 0
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


def test_forwards_restored_no_grad_plain_and_after_error(setup: Any, fast_host_hw: Hardware) -> None:
    model, inputs, base_peak, (ref_loss, *_) = setup
    blocks = [b for _, b in find_blocks(model)]
    assert [p for p, _ in find_blocks(model)] == ["model.transformer.h.0", "model.transformer.h.1"]
    plan = _plan(model, inputs, fast_host_hw, int(base_peak * 0.75), allow_swap=False)
    with _torch(plan, model) as info:
        assert all("forward" in vars(b) for b in blocks)
        with torch.no_grad():
            assert torch.equal(model(*inputs), ref_loss)
        assert sum(info.sac.values()) == 0  # evaluation ran the blocks plainly
    assert _restored(model)
    with pytest.raises(RuntimeError, match="boom"), _torch(plan, model):
        raise RuntimeError("boom")
    assert _restored(model)


def test_unknown_mechanism_and_block_mismatch_refused(setup: Any) -> None:
    model, inputs, *_ = setup
    plan = memplan.plan(model, inputs, mode="train", budget="1GiB")
    with pytest.raises(InvalidInput, match="'graph', 'torch'"), memplan.applied(plan, model, mechanism="jit"):
        pass

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    other = Stack()
    with pytest.raises(InvalidInput, match="2 repeated layers.*3 blocks"), _torch(plan, other):
        pass
    wider = copy.deepcopy(model)
    wider.model.lm_head = torch.nn.Linear(64, 300, bias=True)  # another head: the state differs
    with pytest.raises(PlanMismatch, match="in the model only.*lm_head.bias"), _torch(plan, wider):
        pass


def test_in_place_change_of_a_saved_tensor_is_refused(setup: Any, fast_host_hw: Hardware) -> None:
    """Saved-tensor hooks turn autograd's version check off; the mechanism's unpack hook makes it again."""
    model, inputs, base_peak, _ = setup
    plan = _plan(model, inputs, fast_host_hw, int(base_peak * 0.8), allow_recompute=False)
    weight = find_blocks(model)[1][1].attn.c_attn.weight  # saved by its matmul for the input's gradient
    with _torch(plan, model) as info:
        loss = model(*inputs)
        with torch.no_grad():
            weight.mul_(1.0)  # same values, new version: plain autograd refuses the backward too
        with pytest.raises(RuntimeError, match="modified by an inplace operation.*memplan"):
            loss.backward()
    assert info.swap_layers == [0, 1]
    for p in model.parameters():
        p.grad = None


def test_over_budget_refused_with_the_numbers(setup: Any) -> None:
    """A plan made for the graph mechanism's peak, which the torch mechanism exceeds: refused at entry, with
    the predicted peak (the one an unchecked run measures), the budget and the excess."""
    model, inputs, base_peak, _ = setup
    plan = _plan(model, inputs, load_hardware("cpu"), int(base_peak * 0.75), allow_swap=False)
    budget = plan.budget_bytes["device"]
    _, _, measured, _ = _step(model, inputs, _torch(plan, model))
    for p in model.parameters():
        p.grad = None
    rng = torch.get_rng_state()
    with pytest.raises(TorchOverBudget) as refused, memplan.applied(plan, model, mechanism="torch"):
        pass
    e = refused.value
    assert e.peak_bytes == measured > budget and e.budget_bytes == budget
    excess = measured - budget
    message = str(e)
    assert f"peak at {measured} B" in message and f"budget of {budget} B by {excess} B" in message
    assert f"({excess / budget:.1%})" in message and f"at least {measured} B" in message
    assert "mechanism='graph'" in message and "plan_for_torch" in message
    assert _restored(model) and all(p.grad is None for p in model.parameters())  # the dry run left no trace
    assert torch.equal(torch.get_rng_state(), rng)


def test_plan_for_torch_holds_its_budget_bitwise(setup: Any, fast_host_hw: Hardware) -> None:
    """Plans made lower until the mechanism fits: accepted, the measured peak within the budget and equal
    to the predicted one, the plain step's loss and gradients bit for bit (recompute plan, swap plan)."""
    model, inputs, _, (ref_loss, ref_grads, ref_peak, _) = setup
    for hw, frac in ((load_hardware("cpu"), 0.85), (fast_host_hw, 0.7)):
        budget = int(ref_peak * frac)
        fit = plan_for_torch(model, inputs, budget, hardware=hw)
        plan = fit.plan
        assert plan.budget_bytes["device"] == budget == fit.budget_bytes > fit.planned_at_bytes
        loss, grads, peak, info = _step(model, inputs, memplan.applied(plan, model, mechanism="torch"))
        print(
            f"\n{hw.name} at {budget} B: planned at {fit.planned_at_bytes} B, predicted "
            f"{info.predicted_peak_bytes} B, measured {peak} B"
        )
        assert peak <= budget and info.predicted_peak_bytes == peak == fit.predicted_peak_bytes
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    assert info.swapped_tensors > 0  # the second plan swaps


def test_plan_for_torch_refuses_what_no_plan_fits(setup: Any) -> None:
    """Below what SAC can reach (each checkpointed block rebuilds all its recomputed tensors at once), the
    planner's lower bound stops the search: refused with the lowest predicted peak."""
    model, inputs, _, (_, _, ref_peak, _) = setup
    budget = int(ref_peak * 0.5)
    with pytest.raises(TorchOverBudget, match="the planner's lower bound is") as refused:
        plan_for_torch(model, inputs, budget, hardware="cpu")
    e = refused.value
    assert e.budget_bytes == budget and e.peak_bytes > budget
    assert f"lowest predicted peak was {e.peak_bytes} B, over by {e.peak_bytes - budget} B" in str(e)
    assert f"a budget of at least {e.peak_bytes} B" in str(e)
    with pytest.raises(TorchOverBudget, match=f"{1} rounds of planning lower did not fit"):
        plan_for_torch(model, inputs, int(ref_peak * 0.8), rounds=1, hardware="cpu")


def test_a_step_that_cannot_run_on_fake_tensors_is_refused(setup: Any) -> None:
    """A forward that reads a tensor's value (`.item()`) cannot be dry-run: refused, saying what to do."""
    model, inputs, base_peak, _ = setup
    plan = _plan(model, inputs, load_hardware("cpu"), int(base_peak * 0.75), allow_swap=False)
    block = find_blocks(model)[0][1]
    hook = block.register_forward_pre_hook(lambda _, args: args[0].sum().item() and None)
    try:
        with pytest.raises(InvalidInput, match="could not predict.*refuse_over_budget=False"):
            predict_peak(plan, model)
    finally:
        hook.remove()
