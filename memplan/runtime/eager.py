"""`memplan.applied(plan, model, mechanism="torch")`: apply a training plan through PyTorch's own mechanisms.

The graph mechanism (`training.py`) captures the step and runs it op by op. This one leaves the model's
eager forward and autograd in charge and only changes how the repeated blocks (the modules the plan's layer
indices name: `...h.<i>`, `...layers.<i>`, see `layer_of`) keep their activations:

- recompute: a block where the plan recomputes (or splits) a saved activation runs under
  `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` with a selective activation checkpointing
  (SAC) policy built from the plan's `sac_table` (the exporter's `policy_for`: "save" or "recompute" per
  (aten op, occurrence in the block's forward));
- swap: in a block that is not checkpointed, the tensors the plan swaps are sent to the plan's tier by
  `torch.autograd.graph.saved_tensors_hooks`: a `TorchDispatchMode` (`SwapMarker`) counts the block's ops
  the way SAC does and notes the storages of the outputs the plan swaps (until they are freed); the pack
  hook, on every non-checkpointed block (a later block may be the one saving the tensor), `put`s a saved
  tensor living in a noted storage (asynchronously; the whole storage once, however many views of it are
  saved; views rebuilt on unpack), the unpack hook `get`s it back and frees it on the tier. When the
  backward first unpacks a tensor of block L, the swapped tensors of the nearest block before it are
  prefetched (backward runs the blocks in reverse).

`applied_torch` yields an `EagerInfo` whose counters grow while the block runs (SAC answers, tensors and
bytes sent to the tier, read back, prefetched, and the plan's swaps it could not honour).

What differs from the graph mechanism, and from the plan's prediction:
- SAC rebuilds all of a checkpointed block's recomputed tensors when the block's backward starts (the plan
  rebuilds each just before its use), re-running the block's forward up to the last of them, so ops whose
  outputs were never saved are re-run too: recompute time and the peak differ from what the plan priced;
- activations outside the repeated blocks (embeddings, final norm, loss) are saved by autograd as usual,
  whatever the plan decided for them;
- SAC cannot swap: a tensor the plan swaps inside a checkpointed block is recomputed instead (listed in
  `EagerInfo.swaps_recomputed`; saving it would keep on the device what the plan sends away); a split
  tensor is recomputed whole;
- a swapped tensor that autograd saves only outside the blocks, or in a checkpointed block, stays on the
  device; an op the plan lists that the eager forward does not run is counted in `EagerInfo.missed_swaps`;
- autograd, not the plan, orders frees; swaps are written out when autograd saves the tensor and read back
  when backward asks (plus one block of prefetch), not at the plan's steps; a read-back tensor stays on
  the device until every autograd node that saved it has run; a swapped storage that something else still
  holds on the device when backward needs it is used there (`EagerInfo.held_on_device`), not read back;
- saved-tensor hooks turn off autograd's check that a saved tensor was not modified in place; the unpack
  hook repeats it (for a swapped tensor, only while the tensor object is alive).
So the step can peak above the plan's prediction. What is guaranteed instead: at entry `applied_torch`
predicts the peak of one step, `model(*inputs); loss.backward()` with the plan's input shapes, by running
it with the mechanism installed on fake tensors under the live storage tracker (`eager_peak`), and refuses
a plan whose device budget that peak exceeds (`TorchOverBudget`: the peak, the budget, the excess);
`EagerInfo.predicted_peak_bytes` carries the prediction. `memplan.planner.torch_mechanism.plan_for_torch`
makes plans the mechanism holds (planned lower by the excess until the predicted peak fits). A step of
other shapes, with gradients accumulated, or whose swap copies lag behind (their source storage is held
until copied) can peak elsewhere. Gradients are the plain step's bit for bit where its kernels are
deterministic (the same ops run on the same inputs).
The backward must run inside the block: tensors still on the tier at exit are freed (and the store closed
if this opened it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint

from memplan.plans.plan import Plan
from memplan.runtime.eager_setup import (  # re-exported: the mechanism's setup lives there
    EagerInfo,
    Mechanism,
    SwapSpec,
    check_state,
    find_blocks,
    plan_layers,
    prepare,
    recompute_swaps,
    swap_specs,
)
from memplan.runtime.eager_swap import SwapMarker, Swapper, swapping_forward
from memplan.runtime.sac_policy import policy_for
from memplan.runtime.tiers.api import TierStore

__all__ = [
    "EagerInfo",
    "Mechanism",
    "SwapMarker",
    "Swapper",
    "SwapSpec",
    "applied_torch",
    "check_state",
    "find_blocks",
    "installed",
    "plan_layers",
    "prepare",
    "recompute_swaps",
    "swap_specs",
]


def _checkpointed_forward(
    forward: Callable[..., Any], table: dict[tuple[str, int], str], stats: Counter[str]
) -> Callable[..., Any]:
    """`forward` under non-reentrant checkpoint with the SAC policy of `table` (plain without grad)."""

    def context_fn() -> Any:
        return torch_checkpoint.create_selective_checkpoint_contexts(policy_for(table, stats))

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch_checkpoint.checkpoint(
            forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs
        )

    return run


@contextmanager
def installed(mech: Mechanism, swapper: Swapper | None, info: EagerInfo) -> Iterator[None]:
    """The blocks' forwards replaced by their checkpointed or swapping versions inside the block."""
    patched: list[tuple[torch.nn.Module, bool, Any]] = []
    try:
        for layer, (_, block) in enumerate(mech.blocks):
            own = "forward" in vars(block)
            forward = block.forward
            if layer in mech.checkpointed:
                new = _checkpointed_forward(forward, mech.table.get(layer, {}), info.sac)
            elif swapper is not None:  # every plain block: a later one may save a swapped tensor
                new = swapping_forward(forward, layer, mech.specs.get(layer, {}), swapper)
            else:
                continue
            patched.append((block, own, vars(block).get("forward")))
            block.forward = new  # type: ignore[method-assign]
        yield
    finally:
        for block, own, previous in reversed(patched):
            if own:
                block.forward = previous  # type: ignore[method-assign]
            else:
                del block.forward


@contextmanager
def applied_torch(
    plan: Plan,
    model: torch.nn.Module,
    store: TierStore | None = None,
    emulate: frozenset[str] = frozenset(),
    refuse_over_budget: bool = True,
) -> Iterator[EagerInfo]:
    """Run `model` with the plan applied by SAC and saved-tensor hooks inside the block (module docstring).
    First the step's peak is predicted (`eager_peak`) and a plan whose device budget it would exceed is
    refused with `TorchOverBudget`; with `refuse_over_budget` off nothing is predicted or checked."""
    from memplan.runtime.eager_peak import check_peak

    mech, info = prepare(plan, model)
    peak = check_peak(plan, model, mech, refuse_over_budget)
    info.predicted_peak_bytes = peak.peak_bytes if peak is not None else None
    with ExitStack() as stack:
        swapper: Swapper | None = None
        if mech.specs:
            if store is None:
                from memplan.runtime.tiers.factory import open_tier

                store = stack.enter_context(open_tier(plan.hardware, mech.tier, emulate=emulate))
            swapper = Swapper(store, info)
            stack.push(swapper.exit)
        with installed(mech, swapper, info):
            yield info
