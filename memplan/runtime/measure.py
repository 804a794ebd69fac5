"""Run a model's step for real on the CPU and measure it with the live-storage tracker.

`run_inference` executes the captured inference graph in its schedule; `run_step` runs an eager training
step (forward + backward + optimizer update) on real tensors. (`memplan.planner.run.run_plan` checks the
model against a plan, runs it with these and compares the measurement with the prediction.)
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch

from memplan.ir.frontends.fx_lower import Capture
from memplan.runtime.tracker import LiveStorageTracker, Measurement


def _optimizer(
    params: list[torch.nn.Parameter], name: str
) -> tuple[torch.optim.Optimizer | None, list[torch.Tensor]]:
    """The optimizer of the step, with its state created up front (as the captured step assumes)."""
    if name == "none":
        return None, []
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=False), []
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    state = []
    for p in params:
        st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        opt.state[p] = st
        state += [st["exp_avg"], st["exp_avg_sq"], st["step"]]
    return opt, state


def bind_placeholders(cap: Capture, module: torch.nn.Module, inputs: Sequence[Any]) -> list[Any]:
    """Arguments for the captured graph module: real parameters and buffers by name, then the inputs."""
    state = {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }
    user = iter(inputs)
    args = []
    for node in cap.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        vid = cap.node_values.get(node.name, (None,))[0]
        name = cap.param_names.get(vid) if vid is not None else None
        args.append(state[name] if name is not None else next(user))
    return args


def run_inference(cap: Capture, module: torch.nn.Module, inputs: Sequence[Any]) -> Measurement:
    """Execute the captured inference graph in its planned schedule on real tensors, under the tracker.

    The exported graph module runs its ops in the captured order and drops each value after its last use,
    which is exactly the schedule a plan describes (eager Python may hold references longer)."""
    args = bind_placeholders(cap, module, inputs)
    gc.collect()
    with torch.no_grad(), LiveStorageTracker() as tracker:
        tracker.track(args)
        out = cap.gm(*args)
        del out
    return tracker.result


def run_step(
    module: torch.nn.Module, inputs: Sequence[Any], mode: str, optimizer: str = "none"
) -> Measurement:
    """Run one eager step under the tracker; parameters, inputs and optimizer state count as live."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt, state = _optimizer(params, optimizer) if mode == "train" else (None, [])
    for p in params:
        p.grad = None
    module.train(mode == "train")
    gc.collect()
    tracked = [*module.parameters(), *module.buffers(), *inputs, *state]
    with torch.set_grad_enabled(mode == "train"), LiveStorageTracker() as tracker:
        tracker.track(tracked)
        out = module(*inputs)
        if mode == "train":
            out.backward()
            if opt is not None:
                opt.step()
        del out
    return tracker.result
