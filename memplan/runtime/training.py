"""`memplan.applied(plan, model)`: train with a plan applied, from an ordinary training script.

    plan = memplan.plan(model, (x, y), mode="train", budget="6GiB", hardware="a100-40gb")
    with memplan.applied(plan, model):
        loss = model(x, y); loss.backward(); opt.step()

Inside the block, `model(...)` runs the captured training step through `PlannedStep` (forward now, backward
when autograd asks), wrapped in an `autograd.Function` whose inputs are the trainable parameters, so
`loss.backward()` fills `.grad` exactly as before and the optimizer is untouched. The step is captured on
the first call (with that call's inputs) and checked against the plan's fingerprint. Swapped tensors go
through the tier store of the plan's swap tier, opened for the block and closed (nothing left) after it.

`mechanism="torch"` applies the plan through PyTorch's own mechanisms instead (selective activation
checkpointing of the repeated blocks, swaps by saved-tensor hooks): see `memplan.runtime.eager`. It yields an
`EagerInfo` of what it did; `mechanism="graph"` (the default, above) yields None.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from memplan.errors import InvalidInput, PlanMismatch
from memplan.ir.frontends.train_step import capture_train_step
from memplan.plans.plan import Plan, fingerprint
from memplan.runtime.eager import EagerInfo, applied_torch
from memplan.runtime.executor import PlannedStep
from memplan.runtime.tiers.api import TierStore


class _StepFunction(torch.autograd.Function):
    """Forward: the planned forward ops, returning the loss. Backward: the planned backward ops, seeded with
    the incoming gradient, returning the gradients of the trainable parameters."""

    @staticmethod
    def forward(ctx: Any, step: PlannedStep, args: list[Any], *params: torch.Tensor) -> torch.Tensor:
        step.bind(args)
        ctx.step = step
        return step.forward()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        step: PlannedStep = ctx.step
        return (None, None, *step.backward(seed=grad_out))


def _state_args(model: torch.nn.Module, step: PlannedStep, inputs: tuple[Any, ...]) -> list[Any]:
    """Placeholder values in capture order: parameters, buffers and frozen parameters, optimizer state,
    inputs."""
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    buffers = [*model.buffers(), *frozen]
    n_state = (
        sum(1 for n in step.cap.gm.graph.nodes if n.op == "placeholder")
        - len(params)
        - len(buffers)
        - len(inputs)
    )
    state = [
        torch.empty(0)
    ] * n_state  # the optimizer's update ops are not run here; the user's optimizer runs
    return [*params, *buffers, *state, *inputs]


MECHANISMS: tuple[str, ...] = ("graph", "torch")
"""How `applied` applies a plan: the captured step op by op, or PyTorch's SAC and saved-tensor hooks."""


@contextmanager
def applied(
    plan: Plan,
    model: torch.nn.Module,
    store: TierStore | None = None,
    emulate: frozenset[str] = frozenset(),
    mechanism: str = "graph",
) -> Iterator[EagerInfo | None]:
    """Run `model`'s training step under `plan` inside the block (see module docstring)."""
    if mechanism not in MECHANISMS:
        raise InvalidInput(
            f"memplan.applied: unknown mechanism {mechanism!r}; choose one of "
            f"{', '.join(map(repr, MECHANISMS))}"
        )
    if plan.workload.mode != "train":
        raise InvalidInput("memplan.applied takes a training plan (mode='train'); this plan is for inference")
    if mechanism == "torch":
        with applied_torch(plan, model, store, emulate) as info:
            yield info
        return
    remat = plan.decisions.remat
    tier = remat.tier if remat else None
    swaps = remat is not None and remat.swaps
    with ExitStack() as stack:
        if swaps and store is None:
            from memplan.runtime.tiers.factory import open_tier

            store = stack.enter_context(open_tier(plan.hardware, tier, emulate=emulate))
        steps: list[PlannedStep] = []
        original = model.forward

        def planned_forward(*inputs: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():  # evaluation inside the block: no backward, so no plan to run
                return original(*inputs)
            if not steps:
                steps.append(_capture(plan, model, original, inputs, store))
            params = [p for p in model.parameters() if p.requires_grad]
            return _StepFunction.apply(steps[0], _state_args(model, steps[0], inputs), *params)

        model.forward = planned_forward  # type: ignore[method-assign]
        try:
            yield None
        finally:
            del model.forward


def _capture(
    plan: Plan, model: torch.nn.Module, original: Any, inputs: tuple[Any, ...], store: TierStore | None
) -> PlannedStep:
    patched = model.forward
    model.forward = original  # type: ignore[method-assign]
    try:  # capture on fake tensors, outside any measuring dispatch mode the caller runs
        with _disable_current_modes():
            cap = capture_train_step(model, inputs, optimizer=plan.workload.optimizer)  # type: ignore[arg-type]
    finally:
        model.forward = patched  # type: ignore[method-assign]
    if fingerprint(cap.graph) != plan.model.fingerprint:
        raise PlanMismatch(
            f"memplan.applied: the model's training step (fingerprint {fingerprint(cap.graph)}) is not the "
            "one "
            f"the plan was made for ({plan.model.fingerprint}); re-plan with these inputs and this model"
        )
    return PlannedStep(plan, cap, store)
