"""`memplan.applied(plan, model)`: train with a plan applied, from an ordinary training script.

    plan = memplan.plan(model, (x, y), mode="train", budget="6GiB", hardware="a100-40gb")
    with memplan.applied(plan, model):
        loss = model(x, y); loss.backward(); opt.step()

Inside the block, `model(...)` runs the captured training step through `PlannedStep` (forward now, backward
when autograd asks), wrapped in an `autograd.Function` whose inputs are the trainable parameters, so
`loss.backward()` fills `.grad` exactly as before and the optimizer is untouched. The step is captured on
the first call (with that call's inputs) and checked against the plan's fingerprint. Swapped tensors go
through the tier store of the plan's swap tier, opened for the block and closed (nothing left) after it.

A call with other input shapes (or another autocast state) than the planned one is refused with
`PlanMismatch`, or planned by the `replan` callback once per new shape (`memplan.runtime.calls`); a call
under `torch.no_grad()` or with the model in eval mode runs the plain model. Captured ops run with autocast
off (its casts are in the graph).

`mechanism="torch"` applies the plan through PyTorch's own mechanisms instead (selective activation
checkpointing of the repeated blocks, swaps by saved-tensor hooks): see `memplan.runtime.eager`. It yields an
`EagerInfo` of what it did; `mechanism="graph"` (the default, above) yields None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from memplan.errors import InvalidInput, PlanMismatch
from memplan.ir.frontends.train_step import capture_train_step
from memplan.plans.plan import Plan, fingerprint
from memplan.runtime.calls import CallSpec, Turns, autocast_off, autocast_state, refuse
from memplan.runtime.eager import applied_torch
from memplan.runtime.executor import PlannedStep
from memplan.runtime.tiers.api import TierStore


class _StepFunction(torch.autograd.Function):
    """Forward: the planned forward ops, returning the loss. Backward: the planned backward ops, seeded with
    the incoming gradient, returning the gradients of the trainable parameters."""

    @staticmethod
    def forward(ctx: Any, planned: _Planned, args: list[Any], *params: torch.Tensor) -> torch.Tensor:
        ctx.turn, replaced = planned.turns.begin()
        ctx.planned = planned
        with autocast_off():
            if replaced:  # the previous forward's backward never ran: forget it
                planned.step.reset()
            planned.step.bind(args)
            return planned.step.forward()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        planned: _Planned = ctx.planned
        planned.turns.end(ctx.turn)
        with autocast_off():
            return (None, None, *planned.step.backward(seed=grad_out))


@dataclass
class _Planned:
    """A captured step, the call it was captured for, and which of its forwards is current."""

    step: PlannedStep
    spec: CallSpec
    turns: Turns = field(default_factory=Turns)


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
    replan: Callable[[tuple[Any, ...]], Plan] | None = None,
) -> Iterator[Any]:
    """Run `model`'s training step under `plan` inside the block (see module docstring); a generation plan
    runs `model.generate` instead (`memplan.runtime.generation`, yielding its `GenerationRun`), and a
    plan whose bitwidth pass quantized weights runs the model with them (`memplan.runtime.quantized`,
    yielding its `QuantizedRun`; one forward or a generation, without streamed weights).
    `replan(inputs)`,
    if given, makes the plan for a call whose input shapes (or autocast) differ from the planned ones."""
    if mechanism not in MECHANISMS:
        raise InvalidInput(
            f"memplan.applied: unknown mechanism {mechanism!r}; choose one of "
            f"{', '.join(map(repr, MECHANISMS))}"
        )
    if plan.workload.mode == "infer":
        with _applied_inference(plan, model) as run:
            yield run
        return
    if mechanism == "torch":
        with applied_torch(plan, model, store, emulate) as info:
            yield info
        return
    with ExitStack() as stack:
        stores: dict[str, TierStore] = {}
        steps: dict[CallSpec, _Planned] = {}
        original = model.forward

        def new_step(spec: CallSpec, inputs: tuple[Any, ...]) -> _Planned:
            if steps and replan is None:
                raise refuse(next(iter(steps.values())).spec, spec)
            p = plan
            if steps and replan is not None:
                with _unpatched(model, original):
                    p = replan(inputs)
            tier_store = store or _open_store(p, stores, stack, emulate)
            return steps.setdefault(spec, _Planned(_capture(p, model, original, inputs, tier_store), spec))

        def planned_forward(*inputs: Any, **kwargs: Any) -> torch.Tensor:
            if not torch.is_grad_enabled() or not model.training:  # evaluation: no backward, no plan to run
                return original(*inputs, **kwargs)
            if kwargs:
                raise InvalidInput(
                    f"memplan.applied: the planned model takes its inputs positionally, as memplan.plan got "
                    f"them (example_inputs); this call passes {', '.join(kwargs)} by keyword"
                )
            spec = CallSpec.of(inputs)
            planned = steps.get(spec) or new_step(spec, inputs)
            params = [p for p in model.parameters() if p.requires_grad]
            return _StepFunction.apply(planned, _state_args(model, planned.step, inputs), *params)

        model.forward = planned_forward  # type: ignore[method-assign]
        try:
            yield None
        finally:
            del model.forward


def _open_store(
    plan: Plan, stores: dict[str, TierStore], stack: ExitStack, emulate: frozenset[str]
) -> TierStore | None:
    """The store of the plan's swap tier, opened for the block on first need (None if it swaps nothing)."""
    remat = plan.decisions.remat
    if remat is None or not remat.swaps:
        return None
    tier = remat.tier
    if tier not in stores:
        from memplan.runtime.tiers.factory import open_tier

        stores[tier] = stack.enter_context(open_tier(plan.hardware, tier, emulate=emulate))
    return stores[tier]


@contextmanager
def _applied_inference(plan: Plan, model: torch.nn.Module) -> Iterator[Any]:
    """A generation plan: its weights (quantized or not) placed and streamed (`memplan.runtime.generation`);
    a single-forward plan with quantized weights: `memplan.runtime.quantized`."""
    if plan.workload.gen < 1 and plan.decisions.bits is not None and plan.decisions.bits.tensors:
        from memplan.runtime.quantized import applied_bits

        with applied_bits(plan, model) as quantized:
            yield quantized
        return
    if plan.workload.gen < 1:
        raise InvalidInput(
            "memplan.applied takes a training plan (mode='train'), a generation plan (mode='infer', gen=N) "
            "or a plan with quantized weights (passes=['bitwidth', ...]); this plan is for one inference "
            "forward: run it with memplan.run_plan"
        )
    from memplan.runtime.generation import applied_generation

    with applied_generation(plan, model) as run:
        yield run


@contextmanager
def _unpatched(model: torch.nn.Module, original: Any) -> Iterator[None]:
    """The model's own forward back, outside the caller's dispatch modes: to capture or re-plan it."""
    patched = model.forward
    model.forward = original  # type: ignore[method-assign]
    try:
        with _disable_current_modes():
            yield
    finally:
        model.forward = patched  # type: ignore[method-assign]


def _capture(
    plan: Plan, model: torch.nn.Module, original: Any, inputs: tuple[Any, ...], store: TierStore | None
) -> PlannedStep:
    with _unpatched(model, original):  # capture on fake tensors, outside any measuring dispatch mode
        cap = capture_train_step(model, inputs, optimizer=plan.workload.optimizer)  # type: ignore[arg-type]
    if fingerprint(cap.graph) != plan.model.fingerprint:
        raise PlanMismatch(
            f"memplan.applied: the model's training step (fingerprint {fingerprint(cap.graph)}) is not the "
            "one "
            f"the plan was made for ({plan.model.fingerprint}); re-plan with these inputs and this model"
            + (" (under the same torch.autocast as this call)" if autocast_state() else "")
        )
    return PlannedStep(plan, cap, store)
