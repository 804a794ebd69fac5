"""Writing an op's result straight into a preallocated slot: the `out=` overload of an ATen op, found by
schema, and direct writers for ops whose out overload is a generated compute-then-copy wrapper.

An out overload matches a functional overload when it takes the same arguments (the tensor options that
the out tensor fixes, `dtype`/`device`/`layout`/`pin_memory`, aside) plus one mutable out argument per
return (`native_layer_norm.out(..., out0, out1, out2)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
from torch._ops import OpOverload

_TENSOR_OPTIONS = frozenset({"dtype", "layout", "device", "pin_memory"})
"""Arguments of a functional factory that its out overload lacks: the out tensor fixes them."""


def _is_out_arg(arg: torch._C.Argument) -> bool:
    return arg.kwarg_only and arg.alias_info is not None and arg.alias_info.is_write


def _out_matches(functional: torch._C.FunctionSchema, candidate: torch._C.FunctionSchema) -> bool:
    """Same non-out arguments (name, type), the functional's tensor options aside; one out per return."""
    ins = [a for a in candidate.arguments if not _is_out_arg(a)]
    outs = [a for a in candidate.arguments if _is_out_arg(a)]
    names = {a.name for a in ins}
    kept = [a for a in functional.arguments if a.name in names or a.name not in _TENSOR_OPTIONS]
    same = [(a.name, str(a.type)) for a in kept] == [(a.name, str(a.type)) for a in ins]
    return same and len(outs) == len(functional.returns) > 0


@cache
def out_variant(op: OpOverload) -> OpOverload | None:
    """The `out=` overload of a functional ATen overload (`add.Tensor` -> `add.out`,
    `arange.start_step` -> `arange.start_out`), or None when it has none."""
    schema = op._schema
    packet = getattr(torch.ops.aten, schema.name.split("::")[-1], None)
    if packet is None or any(a.is_write for a in schema.arguments):
        return None
    for name in packet.overloads():
        candidate = getattr(packet, name)
        if torch.Tag.out in candidate.tags and _out_matches(schema, candidate._schema):
            return candidate  # type: ignore[no-any-return]
    return None


def bind_arguments(
    schema: torch._C.FunctionSchema, args: Sequence[Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Argument name -> value, as the node passed them (defaults left out)."""
    return {**{a.name: v for a, v in zip(schema.arguments, args, strict=False)}, **kwargs}


def options_fit(bound: dict[str, Any], out: torch.Tensor) -> bool:
    """Tensor options an out overload drops are safe to drop only when the out tensor agrees with them."""
    dtype, device = bound.get("dtype"), bound.get("device")
    return (
        (dtype is None or dtype == out.dtype)
        and bound.get("layout") in (None, torch.strided)
        and (device is None or torch.device(device) == out.device)
        and not bound.get("pin_memory")
    )


def out_call_kwargs(
    schema: torch._C.FunctionSchema, bound: dict[str, Any], slots: list[torch.Tensor]
) -> dict[str, Any]:
    """Keyword arguments of an out overload: the node's arguments it takes, then the slots as its outs."""
    call = {a.name: bound[a.name] for a in schema.arguments if not _is_out_arg(a) and a.name in bound}
    outs = [a.name for a in schema.arguments if _is_out_arg(a)]
    return {**call, **dict(zip(outs, slots, strict=True))}


def _write_copy(slot: torch.Tensor, bound: dict[str, Any]) -> bool:
    """`clone` and `_to_copy`: the slot already has the result's layout and dtype; `copy_` is the op."""
    slot.copy_(bound["self"])
    return True


def _write_embedding(slot: torch.Tensor, bound: dict[str, Any]) -> bool:
    """`embedding`'s forward is `index_select` over rows, which has a native out= kernel."""
    weight, indices = bound["weight"], bound["indices"]
    if weight.dim() != 2 or not slot.is_contiguous():
        return False
    torch.index_select(weight, 0, indices.reshape(-1), out=slot.view(-1, weight.shape[1]))
    return True


DIRECT_WRITERS: dict[OpOverload, Callable[[torch.Tensor, dict[str, Any]], bool]] = {
    torch.ops.aten.clone.default: _write_copy,
    torch.ops.aten._to_copy.default: _write_copy,
    torch.ops.aten.embedding.default: _write_embedding,
}
"""Single-output ops whose out overload is a generated wrapper, written in place without it."""
