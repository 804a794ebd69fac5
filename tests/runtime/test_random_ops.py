"""Random ops under `memplan.applied`: a recompute or a checkpointed block's re-run that runs a random op
again draws what its first run drew (the generator state is replayed), so loss and gradients are bitwise
those of the plain eager step with the same seed, and the generator ends the step where eager leaves it."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memplan
from memplan.errors import PlanMismatch
from memplan.ir.hardware import load_hardware
from memplan.passes.manager import run_pipeline
from memplan.passes.remat_blocks import find_blocks
from memplan.passes.remat_candidates import ROW_OPS, find_candidates
from memplan.passes.remat_schedule import Choice, apply_decisions
from memplan.planner.models import capture, load_model
from memplan.plans.plan import Workload
from memplan.runtime.executor import PlannedStep
from memplan.runtime.rng import is_random


def _attention(a):
    h = a.view(4, 8, 4, 16).transpose(1, 2)
    return F.scaled_dot_product_attention(h, h, h).transpose(1, 2).reshape(4, 8, 64)


RANDOM_OPS = {
    # found in the captured training steps of the corpus's HF models with dropout on (GPT-2, BERT, RoBERTa,
    # DistilBERT, T5, BART, OPT, Llama with attention dropout), on CPU tensors: every dropout is
    # `empty_like` + `bernoulli_(1 - p)` + `div_`
    "aten.bernoulli_.float": lambda a: a * F.dropout(torch.ones_like(a), 0.1, True),
    # SDPA without dropout on CPU tensors (BART, OPT, Llama, Mistral, Qwen2, Phi, GPT-NeoX, ViT, Whisper of
    # the corpus): tagged as seeded, it draws only with a dropout (then CPU SDPA takes the math path)
    "aten._scaled_dot_product_flash_attention_for_cpu.default": _attention,
    # a dropout on a CUDA tensor (ATen's fused kernel), in the same models' CUDA graphs
    "aten.native_dropout.default": lambda a: torch.native_dropout(a, 0.1, True)[0],
    # written by hand in models: masks, noise, stochastic depth
    "aten.bernoulli.p": lambda a: a * torch.bernoulli(a.detach(), 0.7),
    "aten.bernoulli.default": lambda a: a * torch.bernoulli(torch.sigmoid(a)),
    "aten.rand_like.default": lambda a: a * (torch.rand_like(a) > 0.2),
    "aten.randn_like.default": lambda a: a + 0.1 * torch.randn_like(a),
    "aten.rand.default": lambda a: a * torch.rand(a.shape),
    "aten.normal_.default": lambda a: a + torch.empty_like(a).normal_(),
    "aten.uniform_.default": lambda a: a - torch.empty_like(a).uniform_(),
}


class _Layer(nn.Module):
    def __init__(self, noise):
        super().__init__()
        self.fc1, self.fc2, self.noise = nn.Linear(32, 64), nn.Linear(64, 32), noise

    def forward(self, h):
        return h + self.fc2(torch.tanh(self.noise(torch.tanh(self.fc1(h)))))


class _Net(nn.Module):
    """Two repeated layers (`layers.N`), each with the random op between two saved activations."""

    def __init__(self, noise):
        super().__init__()
        self.inp, self.out = nn.Linear(16, 32), nn.Linear(32, 8)
        self.layers = nn.ModuleList([_Layer(noise) for _ in range(2)])

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h).pow(2).mean()


def _aten(target: str):
    _, name, overload = target.split(".")
    return getattr(getattr(torch.ops.aten, name), overload)


def _forced_plan(model, x, blocks: bool):
    """A plan that re-runs every random op it can: recomputes each saved activation whose closure holds one
    (or checkpoints each block holding one), keeping the rest."""
    hw = load_hardware("cpu")
    graph, cap = capture(load_model(model, "train", (x,)), "train")
    base = run_pipeline(graph, hw, Workload("train", x.shape[0], None), 2**40, "module", [], {})
    ph, cands = find_candidates(graph, hw, None)
    random = {i for i, op in enumerate(graph.ops) if is_random(_aten(op.target))}
    chosen = [b for b in find_blocks(graph, hw, cands, ph) if random & set(b.ops)] if blocks else []
    member = {m: b.layer for b in chosen for m in b.members}
    choice = []
    for c in cands:
        if c.value_id in member:
            choice.append(Choice("recompute", block=member[c.value_id]))
        elif not blocks and random & set(c.recompute_ops):
            choice.append(Choice("recompute"))
        else:
            choice.append(Choice("keep"))
    plan = apply_decisions(graph, hw, base, cands, choice, None, chosen)
    return plan, cap, random


def _two_steps(model, x, plan=None):
    """Loss, gradients and generator state after each of two steps from seed 1 (under `plan` if given)."""
    torch.manual_seed(1)
    out = []
    ctx = memplan.applied(plan, model) if plan is not None else torch.enable_grad()
    with ctx:
        for _ in range(2):
            for p in model.parameters():
                p.grad = None
            loss = model(x)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()))
    return out


def _assert_same(got, ref):
    for (loss, grads, state), (ref_loss, ref_grads, ref_state) in zip(got, ref, strict=True):
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
        assert torch.equal(state, ref_state)  # the next step's draws are eager's too


@pytest.mark.parametrize("target", sorted(RANDOM_OPS))
def test_recomputed_random_op_draws_the_same(target):
    torch.manual_seed(0)
    model, x = _Net(RANDOM_OPS[target]), torch.randn(4, 8, 16)
    plan, cap, random = _forced_plan(model, x, blocks=False)
    assert {plan.graph().ops[i].target for i in random} == {target}
    step = PlannedStep(plan, cap, None)
    assert set(step.rng.watched) & random  # the plan does re-run the random op
    _assert_same(_two_steps(model, x, plan), _two_steps(model, x))


@pytest.mark.parametrize(
    "target", [t for t in sorted(RANDOM_OPS) if not t.endswith("_.float") and not t.endswith("_.default")]
)
def test_checkpointed_block_rerun_draws_the_same(target):
    """A block's re-run replays each random op it holds (blocks writing in place are never checkpointed)."""
    torch.manual_seed(0)
    model, x = _Net(RANDOM_OPS[target]), torch.randn(4, 8, 16)
    plan, cap, random = _forced_plan(model, x, blocks=True)
    assert len(plan.decisions.remat.blocks) == 2
    assert set(PlannedStep(plan, cap, None).rng.watched) == random
    _assert_same(_two_steps(model, x, plan), _two_steps(model, x))


def test_no_row_op_is_random():
    """A split rebuilds rows [k:] with its closure on fewer rows: a random op there would draw the first
    rows' numbers (MKL skip-ahead by chunk on CPU, Philox offsets by element on CUDA), not rows [k:]'s.
    So splits never hold one: their closures are made of `ROW_OPS` only, and none reads a generator."""
    assert not [t for t in ROW_OPS if is_random(_aten(t))]


def test_split_replaying_a_random_op_is_refused():
    """A plan from elsewhere that splits a tensor rebuilt through a random op is refused at once."""
    torch.manual_seed(0)
    model, x = _Net(RANDOM_OPS["aten.rand_like.default"]), torch.randn(4, 8, 16)
    plan, cap, random = _forced_plan(model, x, blocks=False)
    rs = plan.decisions.remat
    tensors = tuple(
        replace(t, decision="split", swap_rows=1) if random & set(t.recompute_ops) else t for t in rs.tensors
    )
    edited = plan.with_(decisions=plan.decisions.with_(remat=replace(rs, tensors=tensors)))
    with pytest.raises(PlanMismatch, match="re-runs the random op aten.rand_like.default"):
        PlannedStep(edited, cap, None)
