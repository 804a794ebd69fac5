"""What the placement pass reads off a generation graph: the units, the classes of identical layers, each
unit's compute time per forward, the state it streams and the KV cache it grows.

A generation graph (`memplan.ir.frontends.causal_lm.generation_graph`) has one op per unit call, named
`prefill:PATH` or `decodeN:PATH`. Layers whose state has the same names (below the layer's own path),
shapes and dtypes form a class: the formulation decides for a class how many of its layers keep each
tensor on each tier, and `spread` turns those counts into a tier per layer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from memplan.errors import InvalidInput
from memplan.ir.analysis import lifetimes
from memplan.ir.cost import op_time_s
from memplan.ir.graph import Graph, Role
from memplan.ir.hardware import Hardware


@dataclass(frozen=True, slots=True)
class LayerClass:
    """Identical layers: their layer indices, the state of one of them by suffix (name below the layer's
    path) and size, and per-layer costs."""

    layers: tuple[int, ...]
    path: str
    """Module path of the first of them."""
    suffixes: tuple[str, ...]
    sizes: tuple[int, ...]
    prefill_s: float
    decode_s: float
    """Mean compute time of one decode call of one layer."""
    kv_bytes: int
    """One layer's KV cache at its final size."""
    kv_prompt_bytes: int
    kv_token_bytes: int

    @property
    def count(self) -> int:
        return len(self.layers)


@dataclass(frozen=True, slots=True)
class OtherUnit:
    """A unit outside the repeated layers (embeddings, final norm, LM head): its state and costs."""

    path: str
    values: tuple[int, ...]
    sizes: tuple[int, ...]
    prefill_s: float
    decode_s: float


@dataclass(frozen=True, slots=True)
class GenerationModel:
    """Everything the formulation prices, read off the graph."""

    classes: tuple[LayerClass, ...]
    others: tuple[OtherUnit, ...]
    layer_values: dict[tuple[int, str], int]
    """(layer, suffix) -> value id of that layer's tensor."""
    kv_values: dict[int, int]
    """layer -> value id of its KV cache."""
    fixed_bytes: int
    """Device bytes no placement moves: buffers, activations, workspaces, logits, inputs (their peak)."""
    forwards: int
    mean_ctx_tokens: float
    sequence: tuple[tuple[str, int], ...] = ()
    """One forward's unit calls in order: ("class", class index) or ("other", index into `others`)."""


def is_generation(graph: Graph) -> bool:
    """True for a graph made by `generation_graph` (ops named prefill:PATH / decodeN:PATH)."""
    return bool(graph.ops) and all(op.target.startswith("unit:") for op in graph.ops)


def read_model(graph: Graph, hw: Hardware, gen: int, prompt: int) -> GenerationModel:
    """The units, classes and costs of a generation graph (see the module docstring)."""
    if not is_generation(graph):
        raise InvalidInput("the placement pass plans a generation: plan with mode infer and --gen N")
    state = [v for v in graph.values if v.role == Role.PARAMETER and v.alias_of is None]
    readers: dict[int, set[str]] = defaultdict(set)
    times: dict[tuple[str, bool], list[float]] = defaultdict(list)
    kv_values: dict[int, int] = {}
    for op in graph.ops:
        decode = not op.name.startswith("prefill:")
        times[(op.module_path, decode)].append(op_time_s(op, hw))
        for vid in op.inputs:
            readers[vid].add(op.module_path)
        for vid in op.outputs:
            if graph.value(vid).role == Role.KV_CACHE and op.layer is not None:
                kv_values[op.layer] = vid
    layer_path: dict[int, str] = {}
    for op in graph.ops:
        if op.layer is not None:
            layer_path.setdefault(op.layer, op.module_path)
    by_layer: dict[int, list[tuple[str, int]]] = defaultdict(list)
    layer_values: dict[tuple[int, str], int] = {}
    other_state: dict[str, list[int]] = defaultdict(list)
    for v in state:
        paths = readers.get(v.id, set())
        if v.layer is not None and len(paths) == 1 and v.layer in layer_path:
            suffix = v.name.removeprefix(layer_path[v.layer] + ".")
            by_layer[v.layer].append((suffix, v.id))
            layer_values[(v.layer, suffix)] = v.id
        elif paths:
            other_state[min(paths, key=_first_call(graph))].append(v.id)
    signatures: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for layer in sorted(by_layer):
        sig = tuple(sorted((s, graph.value(i).shape, graph.value(i).dtype) for s, i in by_layer[layer]))
        kv = graph.value(kv_values[layer]).size_bytes if layer in kv_values else 0
        signatures[(sig, kv)].append(layer)
    classes = []
    for (sig, kv), layers in signatures.items():
        first = layers[0]
        suffixes = tuple(s for s, _, _ in sig)  # type: ignore[misc]
        sizes = tuple(graph.value(layer_values[(first, s)]).size_bytes for s in suffixes)
        path = layer_path[first]
        kv_prompt, kv_token = _kv_growth(kv, gen, prompt)
        classes.append(
            LayerClass(tuple(layers), path, suffixes, sizes, _mean(times[(path, False)]),
                       _mean(times[(path, True)]),
                       kv, kv_prompt, kv_token)
        )  # fmt: skip
    others = tuple(
        OtherUnit(p, tuple(ids), tuple(graph.value(i).size_bytes for i in ids), _mean(times[(p, False)]),
                  _mean(times[(p, True)]))
        for p, ids in sorted(other_state.items(), key=lambda kv: _first_call(graph)(kv[0]))
    )  # fmt: skip
    class_of = {layer: c for c, cls in enumerate(classes) for layer in cls.layers}
    other_of = {o.path: u for u, o in enumerate(others)}
    sequence = []
    for op in graph.ops:
        if not op.name.startswith("prefill:"):
            break
        if op.layer is not None and op.layer in class_of:
            sequence.append(("class", class_of[op.layer]))
        elif op.module_path in other_of:
            sequence.append(("other", other_of[op.module_path]))
    return GenerationModel(
        tuple(classes), others, layer_values, kv_values, fixed_bytes(graph), max(gen, 1),
        prompt + max(gen - 2, 0) / 2, tuple(sequence),
    )  # fmt: skip


def _kv_growth(kv_final: int, gen: int, prompt: int) -> tuple[int, int]:
    """A layer's KV bytes after the prompt and per new token, from its final size (prompt + gen - 1
    tokens: the last new token is never fed back)."""
    tokens = prompt + max(gen - 1, 0)
    per = kv_final // tokens if tokens else 0
    return per * prompt, per


def _first_call(graph: Graph) -> object:
    order = {}
    for i, op in enumerate(graph.ops):
        order.setdefault(op.module_path, i)
    return lambda path: order.get(path, len(order))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def fixed_bytes(graph: Graph) -> int:
    """Peak over the schedule of the device bytes placement leaves where they are (all but parameters and
    KV caches)."""
    return max(fixed_live(graph), default=0)


def fixed_live(graph: Graph) -> list[int]:
    """Per step, the device bytes placement leaves where they are (all but parameters and KV caches)."""
    moved = {Role.PARAMETER, Role.KV_CACHE}
    delta = [0] * (len(graph.ops) + 1)
    for root, (s, e) in lifetimes(graph).items():
        v = graph.value(root)
        if v.role not in moved:
            delta[s] += v.size_bytes
            delta[e] -= v.size_bytes
    live, out = 0, []
    for d in delta[:-1]:
        live += d
        out.append(live)
    return out


def spread(counts: dict[str, int]) -> list[str]:
    """A tier per layer with each tier's count, each tier's layers spread evenly over the class (so that
    every layer streams about the same bytes)."""
    keys = sorted(((j + 0.5) / n, tier) for tier, n in counts.items() if n > 0 for j in range(n))
    return [tier for _, tier in keys]
