"""A plan's `remat_swap` decisions as a selective activation checkpointing (SAC) policy table, and the
policy function that answers SAC from it.

    sac_table(plan)   {layer: {(aten op, occurrence within the layer's forward): "save" | "recompute"}}
    policy_for(table, stats) -> policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy

The forward ops of layer L are the ops with `layer == L` before the loss, in schedule order; the k-th op of a
target among them is occurrence k. SAC's dispatch mode sees the same post-autograd aten ops when the block
runs eagerly and counts them the same way, so the key identifies the same op call. An op is "recompute" when
the plan recomputes (or splits) a saved activation it produces, "save" when the plan keeps or swaps one, and
"recompute" otherwise (its output is not saved for backward). `aten.detach.default` is left out: SAC never
shows it to the policy. Used by `applied(..., mechanism="torch")` and by the `torch-sac` exporter, which
copies `policy_for`'s source into the module it writes.
"""

from __future__ import annotations

import collections
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, Literal

from memplan.ir.graph import Graph
from memplan.ir.phases import phases
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan

SacDecision = Literal["save", "recompute"]
SacTable = dict[int, dict[tuple[str, int], SacDecision]]

IGNORED_TARGETS = frozenset({"aten.detach.default"})
"""Ops SAC's dispatch mode never passes to the policy (see `SAC_IGNORED_OPS` in torch)."""


def policy_for(table: dict[tuple[str, int], str], stats: collections.Counter[str]) -> Callable[..., Any]:
    """A SAC policy_fn for one forward of a block whose (aten op, occurrence) decisions are `table`, with
    fresh counters (one per phase: torch versions that also consult the policy while recomputing pass
    ctx.is_recompute=True); counts its forward answers ("save", "recompute", "unlisted") in `stats`.
    Its source is copied into the generated module, so it uses only `collections` and `CheckpointPolicy`
    (imported here, so that exporting a policy needs no torch)."""
    from torch.utils.checkpoint import CheckpointPolicy

    answers = {
        "save": CheckpointPolicy.MUST_SAVE,
        "recompute": CheckpointPolicy.MUST_RECOMPUTE,
        "unlisted": CheckpointPolicy.PREFER_RECOMPUTE,
    }
    counters: dict[bool, collections.Counter[str]] = {
        False: collections.Counter(),
        True: collections.Counter(),
    }

    def policy_fn(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        phase = bool(getattr(ctx, "is_recompute", False))
        name = str(op)
        index = counters[phase][name]
        counters[phase][name] += 1
        decision = table.get((name, index), "unlisted")
        if not phase:
            stats[decision] += 1
        return answers[decision]

    return policy_fn


def sac_table(plan: Plan) -> SacTable:
    """{layer: {(target, occurrence): decision}} for every forward op of every repeated layer."""
    graph = plan.graph()
    by_op = op_decisions(plan, graph)
    table: SacTable = {}
    for layer, ops in forward_layer_ops(graph).items():
        seen: Counter[str] = Counter()
        entries: dict[tuple[str, int], SacDecision] = {}
        for i in ops:
            target = graph.ops[i].target
            if target in IGNORED_TARGETS:
                continue
            entries[(target, seen[target])] = by_op.get(i, "recompute")
            seen[target] += 1
        table[layer] = entries
    return table


def forward_layer_ops(graph: Graph) -> dict[int, list[int]]:
    """Layer -> schedule indices of its forward ops (before the loss is computed), in order."""
    fwd_end = phases(graph).fwd_end
    out: dict[int, list[int]] = defaultdict(list)
    for i, op in enumerate(graph.ops[:fwd_end]):
        if op.layer is not None:
            out[op.layer].append(i)
    return dict(sorted(out.items()))


def op_decisions(plan: Plan, graph: Graph) -> dict[int, SacDecision]:
    """Producer op index -> decision, for the ops that produce saved activations (see module docstring)."""
    out: dict[int, SacDecision] = {}
    for t in _tensors(plan):
        p = graph.producer(t.value_id)
        if p is None:
            continue
        if t.decision in ("recompute", "split"):
            out[p] = "recompute"
        else:
            out.setdefault(p, "save")
    return out


def occurrence_keys(graph: Graph) -> dict[int, tuple[int, str, int]]:
    """Schedule index of each forward op of a repeated layer -> (layer, target, occurrence of the target in
    that layer's forward), the key `sac_table` uses."""
    out: dict[int, tuple[int, str, int]] = {}
    for layer, ops in forward_layer_ops(graph).items():
        seen: Counter[str] = Counter()
        for i in ops:
            target = graph.ops[i].target
            out[i] = (layer, target, seen[target])
            seen[target] += 1
    return out


def checkpoint_layers(plan: Plan) -> list[int]:
    """Layers where the plan recomputes or splits a saved activation (the blocks to checkpoint)."""
    rebuilt = ("recompute", "split")
    return sorted({t.layer for t in _tensors(plan) if t.decision in rebuilt and t.layer is not None})


def _tensors(plan: Plan) -> tuple[TensorRemat, ...]:
    return plan.decisions.remat.tensors if plan.decisions.remat else ()
