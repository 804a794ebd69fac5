"""Phases of a training step's schedule and what its ops do to storages, for passes and the runtime alike.

A joint graph (`memplan.ir.frontends.train_step`) runs the forward up to the loss, then the backward, then,
optionally, the optimizer; `phases` finds the boundaries. `uses_by_root` and `written_in_place` say which
steps read a storage and which storages some op updates in place; `last_reads` says after which op of a
re-run sub-schedule a set of storages is no longer needed. Positions are steps of the graph's op order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from memplan.ir.graph import Graph


@dataclass(frozen=True, slots=True)
class Phases:
    """Schedule positions: forward is [0, fwd_end), backward [fwd_end, bwd_end), optimizer after."""

    fwd_end: int
    bwd_end: int


def phases(graph: Graph) -> Phases:
    """Forward ends after the op that computes the loss (output 0); backward after the last gradient."""
    if not graph.outputs:
        return Phases(len(graph.ops), len(graph.ops))
    loss = graph.producer(graph.storage_of(graph.outputs[0]))
    fwd_end = (loss if loss is not None else len(graph.ops) - 1) + 1
    grads = [graph.producer(o) for o in graph.outputs[1:]]  # a gradient's own op: a view comes after its base
    bwd_end = max([g for g in grads if g is not None], default=len(graph.ops) - 1) + 1
    return Phases(fwd_end, max(bwd_end, fwd_end))


def uses_by_root(graph: Graph) -> dict[int, list[int]]:
    uses: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for vid in op.inputs:
            uses.setdefault(graph.storage_of(vid), []).append(i)
    return uses


def written_in_place(graph: Graph) -> set[int]:
    """Storages some op updates in place (an `op_` target writing an alias): not recomputable."""
    return set(in_place_writes(graph))


def in_place_writes(graph: Graph) -> dict[int, list[int]]:
    """Storage -> the steps of the ops that update it in place."""
    out: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        name = op.target.split(".")[1] if op.target.count(".") >= 2 else op.target
        if name.endswith("_"):
            for root in {graph.storage_of(v) for v in op.outputs}:
                out.setdefault(root, []).append(i)
    return out


def last_reads(graph: Graph, ops: tuple[int, ...], roots: tuple[int, ...]) -> dict[int, list[int]]:
    """Step -> the storages of `roots` that the sub-schedule `ops` no longer needs after it (last read or
    written there)."""
    wanted = set(roots)
    last: dict[int, int] = {}
    for i in ops:
        for vid in (*graph.ops[i].outputs, *graph.ops[i].inputs):
            root = graph.storage_of(vid)
            if root in wanted:
                last[root] = i
    out: dict[int, list[int]] = defaultdict(list)
    for root, i in last.items():
        out[i].append(root)
    return dict(out)
