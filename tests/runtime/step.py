"""One training step, plain or under a plan, measured by the live-storage tracker (shared by the runtime
tests)."""

import gc

import torch

import memplan
from memplan.runtime.tracker import LiveStorageTracker


def tracked_step(model, inputs, plan=None):
    """(loss, gradients, measured peak bytes) of one forward + backward, under `plan` if given."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    gc.collect()
    ctx = memplan.applied(plan, model) if plan is not None else torch.enable_grad()
    with ctx, LiveStorageTracker() as tracker:
        tracker.track([*params, *inputs])
        loss = model(*inputs)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in params], tracker.result.peak_bytes
