"""Rebuilding the rows of a split value (MEMO's token-wise split): the tier's first k rows arrive in the
prefetch buffer, and the value's recompute closure, run on the rows [k:] of its inputs, writes the other rows
into the same buffer through the producing op's `out=` overload.

A row is all but the last dim; inputs that carry rows (activations) enter as their rows [k:] in [rows, last]
form, parameters whole (`memplan.ir.row_ops` says which ops may run so).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from memplan.errors import PlanMismatch
from memplan.ir.graph import PERSISTENT_ROLES
from memplan.ir.row_ops import ROW_VIEWS
from memplan.runtime.out_variants import DIRECT_WRITERS, bind_arguments, out_call_kwargs, out_variant

if TYPE_CHECKING:
    from memplan.runtime.executor import PlannedStep


def rebuild_rows(step: PlannedStep, vid: int, ops: tuple[int, ...], k: int) -> None:
    """Run the closure of `vid` on the rows [k:] of its inputs; the producing op writes straight into the
    rows [k:] of the buffer the tier's rows arrived in (views of `vid` were redone on arrival)."""
    producer = step.graph.producer(vid)
    scratch: dict[int, torch.Tensor] = {}
    for i in ops:
        if i == producer:
            _execute_rows(step, i, k, scratch, into=(vid, rows(step.env[vid])[k:]))
        elif i not in step.sched.views.get(vid, ()):
            _execute_rows(step, i, k, scratch)
    step.scratch.append(scratch)


def _execute_rows(
    step: PlannedStep,
    index: int,
    k: int,
    scratch: dict[int, torch.Tensor],
    into: tuple[int, torch.Tensor] | None = None,
) -> None:
    """Op `index` on row blocks: inputs that carry rows (activations) enter as their rows [k:] in
    [rows, last] form, parameters whole; views that keep the last dim are the identity there, `mean.dim`
    reduces the last dim. With `into` = (value, slot), the op writes that output into the slot."""
    op = step.graph.ops[index]
    node = step.nodes[op.name]

    def rows_of(n: torch.fx.Node) -> Any:
        vids = step.cap.node_values.get(n.name)
        if vids is None:
            raise PlanMismatch(f"value of node {n.name} is not available for a split rebuild")
        if n.target is operator.getitem:
            vids = vids[:1]
        got = [_row_block(step, v, k, scratch) for v in vids]
        return got[0] if len(got) == 1 else tuple(got)

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), rows_of)
    if op.target in ROW_VIEWS:  # a view, or a copying reshape that made the value (`_unsafe_view`)
        if into is not None:
            into[1].copy_(args[0])
        else:
            scratch[op.outputs[0]] = args[0]
        return
    if op.target == "aten.mean.dim":
        args = (args[0], [-1], *args[2:])
    if into is None:
        out = node.target(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for out_vid, t in zip(op.outputs, outs, strict=True):
            scratch[out_vid] = t
        return
    write_into(node.target, args, kwargs, op.outputs.index(into[0]), len(op.outputs), into[1])


def _row_block(step: PlannedStep, vid: int, k: int, scratch: dict[int, torch.Tensor]) -> torch.Tensor:
    if vid in scratch:
        return scratch[vid]
    t = step.env[vid]
    if step.graph.value(step.graph.storage_of(vid)).role in PERSISTENT_ROLES or t.dim() == 0:
        return t
    return rows(t)[k:]


def rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as [rows, last dim] (a view of a contiguous tensor)."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


def write_into(
    target: Any, args: Any, kwargs: dict[str, Any], which: int, n_out: int, slot: torch.Tensor
) -> None:
    """Run ATen op `target` with output `which` written into `slot`, through its `out=` overload (the other
    outputs resized from empty), a direct writer, or, for an op with neither, a copy."""
    bound = bind_arguments(target._schema, args, kwargs)
    if target in DIRECT_WRITERS and DIRECT_WRITERS[target](slot, bound):
        return
    variant = out_variant(target)
    if variant is None:
        out = target(*args, **kwargs)
        slot.copy_(out if n_out == 1 else out[which])
        return
    slots = [slot if i == which else torch.empty(0, dtype=slot.dtype) for i in range(n_out)]
    variant(**out_call_kwargs(variant._schema, bound, slots))
