"""`format_graph`: the IR as text that reads like code, one op per line with sizes and roles."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memplan.ir.graph import Graph


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def format_graph(graph: Graph) -> str:
    """`%v3: f32[2, 64] activation 512B = aten.mm(%v1, %v2)`-style listing; views say whose storage they
    use."""
    lines = [f"graph {graph.name} ({len(graph.ops)} ops, {len(graph.values)} values):"]
    produced = {vid for op in graph.ops for vid in op.outputs}
    for v in graph.values:
        if v.id not in produced:
            lines.append(f"  %{v.id} {v.name}: {v.dtype}{list(v.shape)} {v.role.value} {_size(v.size_bytes)}")
    for i, op in enumerate(graph.ops):
        outs = []
        for vid in op.outputs:
            v = graph.value(vid)
            where = (
                f" view of %{graph.storage_of(vid)}" if v.alias_of is not None else f" {_size(v.size_bytes)}"
            )
            outs.append(f"%{vid}: {v.dtype}{list(v.shape)} {v.role.value}{where}")
        args = ", ".join(f"%{a}" for a in op.inputs)
        lines.append(f"  [{i}] {'; '.join(outs)} = {op.target}({args})")
    lines.append(f"  return ({', '.join(f'%{o}' for o in graph.outputs)})")
    return "\n".join(lines)
