"""Small Hugging Face GPT-2 models in training mode with the loss written the usual way (shared by the
runtime tests of `memplan.applied` on HF models)."""

import gc

import torch
import transformers
from torch import nn

import memplan
from memplan.runtime.tracker import LiveStorageTracker


class LossOf(nn.Module):
    """`model(input_ids=x, labels=x, **kwargs).loss`: what a training script writes."""

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, x):
        return self.model(input_ids=x, labels=x, **self.kwargs).loss


def gpt2(n_layer: int, n_embd: int, seed: int = 0, **config) -> nn.Module:
    """A GPT-2 of the config's defaults (dropout 0.1) at the given depth and width, in training mode."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=2048, n_positions=256, **config
    )
    return transformers.GPT2LMHeadModel(cfg).train()


def step(model, inputs, plan=None, seed=1):
    """(loss, gradients, generator state after, measured peak) of one step from `seed`, under `plan`."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    gc.collect()
    torch.manual_seed(seed)
    ctx = memplan.applied(plan, model) if plan is not None else torch.enable_grad()
    with ctx, LiveStorageTracker() as tracker:
        tracker.track([*params, *inputs])
        loss = model(*inputs)
        loss.backward()
    grads = [p.grad.clone() for p in params]
    return loss.detach(), grads, torch.get_rng_state(), tracker.result.peak_bytes


def assert_bitwise(got, ref):
    """Same loss, gradients and generator state, bit for bit."""
    assert torch.equal(got[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))
    assert torch.equal(got[2], ref[2])
