"""Frontend for Checkmate-style recomputation problems (Jain et al., MLSys 2020): a DAG of nodes with a
compute cost and an output size, as networkx node-link JSON, in and out.

In: `load_node_link(path)` / `from_node_link(data)` read a node-link document
(`networkx.node_link_data` format: `{"nodes": [{"id": ..., ...}], "links": [{"source": a, "target": b}]}`,
`"edges"` accepted for `"links"`). Edges are data dependencies, read source -> target even if the document
says `"directed": false`. Each node needs a compute cost (`cost`, `cpu` or `runtime`, >= 0) and an output
size in bytes (`size`, `mem` or `ram`, >= 0; fractions are rounded up). The nodes are put in a topological
order that keeps the document's order wherever the edges allow it (the order the document lists, if it is
already topological). A cycle, a missing or negative attribute, or malformed JSON raises `InvalidInput`.

Out: `graph_to_node_link(graph)` turns a memplan IR graph (for instance a training step captured by
`train_step.capture_train_step`) into such a document: one node per op that creates a fresh storage, with
cost = the op's FLOPs and size = the bytes of the storages it creates; an edge p -> j when op j reads a
value whose storage p created. Ops that only make aliases (views, in-place updates) are contracted into the
producer of the storage they alias. When the graph has outputs, a sink node `outputs` (cost 0, size 0) reads
them, so that the loss and the gradients stay resident (or are rebuilt) until the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from memplan.errors import InvalidInput
from memplan.ir.graph import Graph

COST_KEYS = ("cost", "cpu", "runtime")
SIZE_KEYS = ("size", "mem", "ram")
SINK = "outputs"


@dataclass(frozen=True)
class DagGraph:
    """A recomputation problem's DAG in topological order: node i reads the outputs of `preds[i]` (< i)."""

    name: str
    names: tuple[str, ...]
    cost: tuple[float, ...]
    size: tuple[int, ...]
    """Output bytes per node."""
    preds: tuple[tuple[int, ...], ...]


def load_node_link(path: str | Path) -> DagGraph:
    """Read a node-link JSON file (see module docstring)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise InvalidInput(f"no graph file at {p}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{p} is not valid JSON: {e}") from e
    return from_node_link(data, p.stem)


def from_node_link(data: Any, name: str = "graph") -> DagGraph:
    """A node-link document (already parsed) as a `DagGraph`."""
    g = _digraph(data)
    pos = {node: i for i, node in enumerate(g.nodes)}
    try:
        order = list(nx.lexicographical_topological_sort(g, key=pos.__getitem__))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(str(u) for u, _ in nx.find_cycle(g))
        raise InvalidInput(
            f"graph {name!r} has a cycle ({cycle}); a recomputation problem needs a DAG"
        ) from None
    index = {node: i for i, node in enumerate(order)}
    cost = tuple(_number(g.nodes[v], COST_KEYS, v, "compute cost") for v in order)
    size = tuple(math.ceil(_number(g.nodes[v], SIZE_KEYS, v, "output size")) for v in order)
    preds = tuple(tuple(sorted(index[u] for u in g.predecessors(v))) for v in order)
    title = str(data.get("graph", {}).get("name") or name)
    return DagGraph(title, tuple(str(v) for v in order), cost, size, preds)


def _digraph(data: Any) -> nx.DiGraph:
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise InvalidInput(
            'a node-link graph is a JSON object with a "nodes" list and a "links" (or '
            '"edges") list, as written by networkx.node_link_data'
        )
    edges = "edges" if "edges" in data else "links"
    doc = {**data, "directed": True, "multigraph": False, edges: data.get(edges, [])}
    try:
        g = nx.node_link_graph(doc, edges=edges)
    except (KeyError, TypeError, nx.NetworkXError) as e:
        raise InvalidInput(
            f'malformed node-link graph: {type(e).__name__}: {e} (every node needs an "id", '
            'every link a "source" and a "target")'
        ) from e
    known = {n["id"] for n in data["nodes"] if isinstance(n, dict) and "id" in n}
    stray = [e for e in doc[edges] if e.get("source") not in known or e.get("target") not in known]
    if stray:
        raise InvalidInput(f'link {stray[0]} names a node that is not in "nodes"')
    return g


def _number(attrs: dict[str, Any], keys: tuple[str, ...], node: Any, what: str) -> float:
    key = next((k for k in keys if k in attrs), None)
    if key is None:
        raise InvalidInput(f"node {node!r} has no {what}: give one of the attributes {', '.join(keys)}")
    value = attrs[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidInput(f"node {node!r}: {what} {key}={value!r} must be a finite number >= 0")
    return float(value)


def graph_to_node_link(graph: Graph) -> dict[str, Any]:
    """A memplan IR graph as a node-link document of its storage-creating ops (see module docstring)."""
    owner: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []
    for i, op in enumerate(graph.ops):
        fresh = [v for v in op.outputs if graph.value(v).alias_of is None and graph.producer(v) == i]
        if not fresh:
            continue
        owner.update({v: i for v in fresh})
        size = sum(graph.value(v).size_bytes for v in fresh)
        nodes.append(
            {"id": op.name, "cost": float(op.flops), "size": size, "target": op.target, "layer": op.layer}
        )
    links: set[tuple[str, str]] = set()
    for i, op in enumerate(graph.ops):
        if i not in owner.values():
            continue
        for vid in op.inputs:
            p = owner.get(graph.storage_of(vid))
            if p is not None and p != i:
                links.add((graph.ops[p].name, op.name))
    outs = {owner[r] for r in (graph.storage_of(o) for o in graph.outputs) if r in owner}
    if outs:
        nodes.append({"id": SINK, "cost": 0.0, "size": 0, "target": "output", "layer": None})
        links |= {(graph.ops[p].name, SINK) for p in outs}
    return {
        "directed": True,
        "multigraph": False,
        "graph": {"name": graph.name},
        "nodes": nodes,
        "links": [{"source": s, "target": t} for s, t in sorted(links)],
    }
