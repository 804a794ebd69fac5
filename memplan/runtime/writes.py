"""In-place writes in a captured forward, and what they mean for a storage that leaves and comes back.

Dropout on a CPU tensor is `empty_like` then `bernoulli_` and `div_` on that storage: the storage's value
is final only after its last in-place write, so a swap copies it out after that op (not after the op that
allocated it), and when it comes back the in-place ops are not run again (they would write the value a
second time: `bernoulli_` would draw a new mask); their outputs are the argument they wrote, so they are
bound to it. Views of the storage (`view`, `expand`...) are pure and are redone on the returned buffer.
"""

from __future__ import annotations

from typing import Any

from memplan.ir.graph import Graph


def writes_in_place(target: Any) -> bool:
    """Whether ATen op `target` writes one of its arguments (`bernoulli_`, `div_`, `copy_`...)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _inplace_name(target: str) -> bool:
    """`aten.div_.Scalar` names an in-place op (the IR keeps targets as strings)."""
    parts = target.split(".")
    name = parts[1] if len(parts) >= 3 else parts[-1]
    return name.endswith("_")


def last_forward_writes(graph: Graph, fwd_end: int) -> dict[int, int]:
    """Storage root -> the last forward op that writes it in place (only for storages some op writes)."""
    out: dict[int, int] = {}
    for i, op in enumerate(graph.ops[:fwd_end]):
        if _inplace_name(op.target):
            for vid in op.outputs:
                out[graph.storage_of(vid)] = i
    return out
