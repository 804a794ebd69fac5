"""Lower an FX graph whose nodes carry fake (or real) tensors in `meta["val"]` into the memory IR.

Shared by every torch frontend (torch.export, the joint training step, plain torch.fx after fake shape
propagation). One `Value` per tensor a node produces, one `Op` per `call_function` node that produces a
tensor, in the graph's node order (the captured schedule). Aliasing comes from the operator schema: a
return annotated `Tensor(a)` or `Tensor(a!)` shares the storage of the argument with the same alias set
(views and in-place ops), so it gets `alias_of` and zero bytes of its own.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx

from memplan.ir.frontends.op_costs import op_cost
from memplan.ir.graph import Graph, Op, Role, Value

_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|decoder\.layers|stages)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Capture:
    """A captured program: the IR plus the FX module it came from and the map between the two."""

    graph: Graph
    gm: torch.fx.GraphModule
    node_values: Mapping[str, tuple[int, ...]]
    """FX node name -> ids of the values it produces (one per tensor output, in order)."""
    param_names: Mapping[int, str]
    """Value id -> qualified parameter/buffer name in the nn.Module (for placeholders that are state)."""


def tied_state(model: torch.nn.Module) -> dict[str, str]:
    """Parameter/buffer names that share a tensor with an earlier name (tied weights), -> that name."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        key = id(t)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
    return ties


def layer_of(path: str) -> int | None:
    """Index of the repeated block a module path belongs to ("model.h.3.attn" -> 3), if any."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return ""


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _alias_sources(node: torch.fx.Node) -> list[torch.fx.Node | None]:
    """For each return of a call_function node: the argument node whose storage it shares, or None."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    by_set: dict[str, torch.fx.Node] = {}
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None:
            continue
        val = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(val, torch.fx.Node):
            for s in arg.alias_info.before_set:
                by_set[s] = val
    out: list[torch.fx.Node | None] = []
    for ret in schema.returns:
        src = None
        if ret.alias_info is not None:
            src = next((by_set[s] for s in ret.alias_info.before_set if s in by_set), None)
            if src is None and len(set(by_set.values())) == 1:  # `Tensor(a)[]`: the set sits on the elements
                src = next(iter(by_set.values()))
        out.append(src)
    return out


class _Builder:
    """Accumulates values and ops while walking the FX graph once, in node order."""

    def __init__(
        self, roles: Mapping[str, Role], state_names: Mapping[str, str], ties: Mapping[str, str]
    ) -> None:
        self.roles, self.state_names, self.ties = roles, state_names, ties
        self.values: list[Value] = []
        self.ops: list[Op] = []
        self.node_values: dict[str, tuple[int, ...]] = {}
        self.param_names: dict[int, str] = {}
        self.unknown: Counter[str] = Counter()

    def new_value(self, node: torch.fx.Node, t: torch.Tensor, idx: int, alias_of: int | None) -> int:
        vid = len(self.values)
        path = _module_path(node) or self.state_names.get(node.name, "").rpartition(".")[0]
        role = self.roles.get(node.name, Role.INPUT if node.op == "placeholder" else Role.ACTIVATION)
        base = self.state_names.get(node.name, node.name)
        name = base if idx == 0 else f"{base}.{idx}"
        size = 0 if alias_of is not None else _storage_bytes(t)
        self.values.append(
            Value(
                vid,
                name,
                size,
                _dtype_name(t),
                tuple(int(d) for d in t.shape),
                role,
                alias_of,
                path,
                layer_of(path),
            )
        )
        return vid

    def visit(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        """Lower one node that is not the output."""
        if node.op == "placeholder":
            self.placeholder(node)
        elif node.op == "call_function" and node.target is operator.getitem:
            self.getitem(node)
        elif node.op == "call_function":
            self.call(node)
        elif node.op == "get_attr":
            val = getattr(gm, str(node.target), None)
            if isinstance(val, torch.Tensor):
                self.node_values[node.name] = (self.new_value(node, val, 0, None),)

    def placeholder(self, node: torch.fx.Node) -> None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            tied = self.ties.get(node.name)
            alias = self.node_values[tied][0] if tied in self.node_values else None
            vid = self.new_value(node, val, 0, alias)
            self.node_values[node.name] = (vid,)
            if node.name in self.state_names:
                self.param_names[vid] = self.state_names[node.name]

    def getitem(self, node: torch.fx.Node) -> None:
        src, i = node.args
        assert isinstance(src, torch.fx.Node)
        produced = self.node_values.get(src.name, ())
        tensor_positions = _tensor_positions(src.meta.get("val"))
        if isinstance(i, int) and i in tensor_positions:
            self.node_values[node.name] = (produced[tensor_positions.index(i)],)

    def call(self, node: torch.fx.Node) -> None:
        val = node.meta.get("val")
        outs = val if isinstance(val, (tuple, list)) else [val]
        positions = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor)]
        if not positions:
            return
        sources = _alias_sources(node)
        ids = []
        if len(sources) == 1 and isinstance(val, (tuple, list)):  # `Tensor(a)[]`: every element aliases
            sources = sources * len(outs)
        for i in positions:
            src = sources[i] if i < len(sources) else None
            alias = (
                self.node_values[src.name][0] if src is not None and src.name in self.node_values else None
            )
            ids.append(self.new_value(node, outs[i], i, alias))
        self.node_values[node.name] = tuple(ids)
        self.add_op(node, ids, val, aliasing=all(self.values[v].alias_of is not None for v in ids))

    def add_op(self, node: torch.fx.Node, out_ids: list[int], val: Any, aliasing: bool) -> None:
        ins: list[int] = []
        for a in node.all_input_nodes:
            for vid in self.node_values.get(a.name, ()):
                if vid not in ins:
                    ins.append(vid)
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        cost = op_cost(node.target, args, kwargs, val, aliasing)
        target = str(node.target)
        if not cost.known:
            self.unknown[target] += 1
        path = _module_path(node)
        self.ops.append(
            Op(
                len(self.ops),
                node.name,
                target,
                tuple(ins),
                tuple(out_ids),
                cost.flops,
                cost.bytes_read,
                cost.bytes_written,
                path,
                layer_of(path),
                cost.known,
            )
        )


def _tensor_positions(val: Any) -> list[int]:
    outs = val if isinstance(val, (tuple, list)) else [val]
    return [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor)]


def _apply_output_roles(values: list[Value], out_ids: list[int], roles: Sequence[Role | None]) -> None:
    for vid, role in zip(out_ids, roles, strict=False):
        if role is None:
            continue
        cur: int | None = vid
        while cur is not None:
            v = values[cur]
            if v.role in (Role.ACTIVATION, Role.OUTPUT):
                values[cur] = replace(v, role=role)
            cur = v.alias_of


def lower_fx(
    gm: torch.fx.GraphModule,
    name: str,
    roles: Mapping[str, Role] | None = None,
    state_names: Mapping[str, str] | None = None,
    output_roles: Sequence[Role | None] | None = None,
    ties: Mapping[str, str] | None = None,
) -> Capture:
    """Build the IR from `gm`, whose nodes carry tensors in `meta["val"]`.

    `roles` maps node names to roles (placeholders that are parameters, outputs that are gradients...);
    unnamed placeholders are inputs and everything else an activation. `state_names` maps placeholder
    node names to the parameter or buffer name they stand for. `output_roles` gives a role to each
    flattened graph output (None: keep); it applies to the output and to the activation whose storage
    it lives in, so that a gradient computed as a view of a matmul result counts as a gradient.
    `ties` maps a placeholder to an earlier one holding the same tensor (tied weights): it becomes an alias.
    """
    b = _Builder(roles or {}, state_names or {}, ties or {})
    out_ids: list[int] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            for a in torch.utils._pytree.tree_leaves(node.args):
                if isinstance(a, torch.fx.Node):
                    out_ids.extend(b.node_values.get(a.name, ()))
        else:
            b.visit(gm, node)
    _apply_output_roles(b.values, out_ids, output_roles or ())
    warnings = []
    if b.unknown:
        listed = ", ".join(f"{k} ({n})" for k, n in b.unknown.most_common())
        warnings.append(f"no cost formula, conservative estimate used for: {listed}")
    graph = Graph(name, tuple(b.values), tuple(b.ops), tuple(dict.fromkeys(out_ids)), tuple(warnings))
    return Capture(graph, gm, b.node_values, b.param_names)
