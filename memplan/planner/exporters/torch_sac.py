"""The `remat_swap` decisions of a training plan as a PyTorch selective activation checkpointing (SAC) policy.

The exporter writes a self-contained Python module (it imports only torch) for
`torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False, context_fn=...)` with
`create_selective_checkpoint_contexts`. The module holds

    POLICY      {layer: {(aten op, occurrence within the layer's forward): "save" | "recompute"}}
    make_policy(layer) -> policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy, with fresh counters
                (through `policy_for`, whose source is copied from this module: memplan's own
                `applied(..., mechanism="torch")` runs the same function)
    wrap_block(block, layer) -> a forward that runs the block under `checkpoint` with that policy
    install(blocks)   `block.forward = wrap_block(block, i)` for the i-th repeated block

How the table is derived. The plan's IR names every op's target ("aten.addmm.default") and layer. The forward
ops of layer L are the ops with `layer == L` before the loss, in schedule order; the k-th op of a target among
them is occurrence k. SAC's dispatch mode sees the same post-autograd aten ops when the block runs eagerly,
and counts them the same way (per op overload, per checkpointed call), so the key identifies the same op call.
An op is "recompute" when the plan recomputes any saved activation it produces; "save" when the plan keeps
or swaps one (and recomputes none); "recompute" otherwise (its output is not saved for backward, so the plan
frees it: saving it in SAC's cache would hold memory the plan does not count). `aten.detach.default` is left
out: SAC never shows it to the policy.

What SAC cannot express, and what the module does instead:
- swap: SAC saves or recomputes; a swapped tensor is saved on the device (listed in the header);
- split (part of a tensor's rows swapped, the rest recomputed): SAC cannot split a tensor; it recomputes it
  whole (listed in the header), which holds the plan's memory at more compute;
- recompute granularity: SAC re-runs the block's forward up to its last needed tensor in backward, so ops
  whose outputs were not saved (cheap views, intermediates) are re-run too, beyond the plan's recompute ops;
- activations outside repeated blocks (embeddings, final norm, loss) are not covered: autograd saves them;
- a block whose plan recomputes nothing runs without checkpointing (autograd saves exactly what it needs).

Reference: PyTorch `torch/utils/checkpoint.py` (`CheckpointPolicy`, `create_selective_checkpoint_contexts`).
"""

from __future__ import annotations

import inspect
import pprint
from collections import Counter

from memplan.planner.exporters.common import remat_decision
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan
from memplan.runtime.sac_policy import checkpoint_layers, occurrence_keys, policy_for, sac_table


def torch_sac(plan: Plan) -> str:
    """The policy module's Python source (see module docstring)."""
    tensors = remat_decision(plan, "torch-sac").tensors
    table = sac_table(plan)
    header = _header(plan, tensors)
    policy = pprint.pformat(table, width=100, sort_dicts=True)
    layers = repr(checkpoint_layers(plan))
    return (
        _TEMPLATE.replace("@HEADER@", header)
        .replace("@POLICY@", policy)
        .replace("@LAYERS@", layers)
        .replace("@POLICY_FOR@", inspect.getsource(policy_for).rstrip())
    )


def _header(plan: Plan, tensors: tuple[TensorRemat, ...]) -> str:
    graph = plan.graph()
    producer: dict[int, int] = {}
    for t in tensors:
        p = graph.producer(t.value_id)
        if p is not None:
            producer[t.value_id] = p
    keys = occurrence_keys(graph)
    lines = [
        f"Selective activation checkpointing policy for {plan.model.name} ({plan.model.source}),",
        f"exported by memplan {plan.memplan_version or '?'} from a plan made {plan.created or '?'}",
        f"for batch {plan.workload.batch}, seq {plan.workload.seq},",
        f"device budget {plan.budget_bytes.get('device')} B.",
        "",
    ]
    count = Counter(t.decision for t in tensors)
    lines.append(
        f"Plan: {len(tensors)} saved activations: keep {count['keep']}, swap {count['swap']}, "
        f"recompute {count['recompute']}, split {count['split']}; checkpointed layers: "
        f"{checkpoint_layers(plan) or 'none'}."
    )
    split = [t for t in tensors if t.decision == "split"]
    if split:
        lines += ["", "Split by the plan (rows swapped, the rest recomputed), recomputed whole here:"]
        lines += [f"  {_describe(t, keys.get(producer.get(t.value_id, -1)))}" for t in split]
    swapped = [t for t in tensors if t.decision == "swap"]
    lines += ["", "Swapped by the plan, saved on the device here (SAC cannot swap):"]
    lines += [f"  {_describe(t, keys.get(producer.get(t.value_id, -1)))}" for t in swapped] or ["  (none)"]
    outside = [t for t in tensors if t.layer is None]
    lines += ["", "Outside repeated blocks, not covered (autograd saves them as usual):"]
    lines += [f"  {_describe(t, None)}" for t in outside] or ["  (none)"]
    return "\n".join(lines)


def _describe(t: TensorRemat, key: tuple[int, str, int] | None) -> str:
    where = f"layer {key[0]}, {key[1]} #{key[2]}" if key else f"layer {t.layer}"
    return f"{t.name} ({where}, {t.size_bytes} B, decision {t.decision})"


_TEMPLATE = '''"""@HEADER@

Usage (needs torch only, not memplan):

    import importlib.util
    spec = importlib.util.spec_from_file_location("sac_policy", "sac_policy.py")
    sac = importlib.util.module_from_spec(spec); spec.loader.exec_module(sac)
    sac.install(model.transformer.h)           # block i gets the policy of plan layer i
    loss = model(input_ids, labels=labels).loss
    loss.backward()

`install` replaces each block's `forward` with `wrap_block(block, i)`: module hooks stay outside the
checkpoint, positional and keyword arguments are passed through. `STATS` counts the policy's answers.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICY: dict[int, dict[tuple[str, int], str]] = @POLICY@
"""layer -> (aten op, occurrence of that op in the layer's forward) -> "save" | "recompute"."""

CHECKPOINT_LAYERS: list[int] = @LAYERS@
"""Layers where the plan recomputes a saved activation; other blocks run without checkpointing."""

STATS: collections.Counter = collections.Counter()
"""How often the policy answered "save", "recompute", or met an op the plan does not list ("unlisted")."""


@POLICY_FOR@


def make_policy(layer: int) -> Callable[..., CheckpointPolicy]:
    """A policy_fn for one forward of block `layer`, with its own occurrence counters."""
    return policy_for(POLICY.get(layer, {}), STATS)


def needs_checkpoint(layer: int) -> bool:
    """Whether the plan recomputes anything in block `layer` (if not, the block runs as usual)."""
    return layer in CHECKPOINT_LAYERS


def wrap_block(block: torch.nn.Module, layer: int) -> Callable[..., Any]:
    """A replacement for `block.forward` that runs the original forward under SAC with layer `layer`'s
    policy. Each call builds fresh SAC contexts, so occurrence counters restart at every forward."""
    forward = block.forward
    if not needs_checkpoint(layer):
        return forward

    def context_fn() -> Any:
        return create_selective_checkpoint_contexts(make_policy(layer))

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return run


def install(blocks: Iterable[torch.nn.Module]) -> None:
    """`block.forward = wrap_block(block, i)` for the i-th block (plan layer i)."""
    for layer, block in enumerate(blocks):
        block.forward = wrap_block(block, layer)
'''
