"""The memory IR: a `Graph` of `Op`s in schedule order over `Value`s (tensor buffers).

A `Value` is one tensor as the program sees it. Views and in-place results share the storage of another
value; `alias_of` names that value's id, and `Graph.storage_of` resolves chains to the root storage, which
is what occupies memory. Every index derived from the records (producer, consumers, storage roots) is
built once in `Graph.__post_init__`; the records themselves are frozen.

Positions in the schedule are op indices. Lifetimes are half-open `[start, end)` intervals over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from memplan.errors import InternalError


class Role(StrEnum):
    """What a tensor is for; passes price and place each role differently."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    GRADIENT = "gradient"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATION = "activation"
    INPUT = "input"
    OUTPUT = "output"
    KV_CACHE = "kv_cache"
    WORKSPACE = "workspace"


#: Roles whose storage exists before the first op and after the last (the model's state).
PERSISTENT_ROLES = frozenset({Role.PARAMETER, Role.BUFFER, Role.OPTIMIZER_STATE})


@dataclass(frozen=True, slots=True)
class Value:
    """One tensor buffer. `size_bytes` is the storage it occupies (0 for a view: its root holds the bytes)."""

    id: int
    name: str
    size_bytes: int
    dtype: str
    shape: tuple[int, ...]
    role: Role
    alias_of: int | None = None
    """Id of the value whose storage this one shares (view or in-place result); None for a fresh storage."""
    module_path: str = ""
    """Dotted path of the nn.Module that produced or owns it ("" when unknown)."""
    layer: int | None = None
    """Index of the repeated block (transformer layer, ResNet stage block) it belongs to, if any."""


@dataclass(frozen=True, slots=True)
class Op:
    """One operator call. `inputs`/`outputs` are value ids; costs let passes price time."""

    id: int
    name: str
    target: str
    """The operator, e.g. "aten.mm.default" or an ONNX op type "MatMul"."""
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    flops: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    module_path: str = ""
    layer: int | None = None
    cost_known: bool = True
    """False when the op had no cost formula and got a conservative estimate."""


@dataclass(frozen=True)
class Graph:
    """A program: values, ops in schedule order, and which values are the program's outputs.

    Values with no producing op (parameters, buffers, inputs, optimizer state) exist before op 0.
    Graph outputs and persistent roles stay live until after the last op.
    """

    name: str
    values: tuple[Value, ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()
    """Things capture could not model exactly (e.g. ops without a cost formula)."""
    _by_id: dict[int, Value] = field(init=False, repr=False, compare=False)
    _producer: dict[int, int] = field(init=False, repr=False, compare=False)
    _consumers: dict[int, tuple[int, ...]] = field(init=False, repr=False, compare=False)
    _root: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id = {v.id: v for v in self.values}
        if len(by_id) != len(self.values):
            raise InternalError(f"graph {self.name!r}: duplicate value ids")
        producer: dict[int, int] = {}
        consumers: dict[int, list[int]] = {v.id: [] for v in self.values}
        for idx, op in enumerate(self.ops):
            for vid in op.inputs:
                if vid not in by_id:
                    raise InternalError(f"op {op.name!r} reads unknown value id {vid}")
                consumers[vid].append(idx)
            for vid in op.outputs:
                if vid not in by_id:
                    raise InternalError(f"op {op.name!r} writes unknown value id {vid}")
                producer.setdefault(vid, idx)
        root: dict[int, int] = {}
        for v in self.values:
            root[v.id] = _resolve_root(v.id, by_id)
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_producer", producer)
        object.__setattr__(self, "_consumers", {k: tuple(c) for k, c in consumers.items()})
        object.__setattr__(self, "_root", root)

    def value(self, vid: int) -> Value:
        return self._by_id[vid]

    def producer(self, vid: int) -> int | None:
        """Schedule index of the op that first writes `vid`, or None if it exists before op 0."""
        return self._producer.get(vid)

    def consumers(self, vid: int) -> tuple[int, ...]:
        """Schedule indices of the ops that read `vid`, in order."""
        return self._consumers[vid]

    def storage_of(self, vid: int) -> int:
        """Id of the root value whose storage `vid` lives in."""
        return self._root[vid]

    def storages(self) -> list[Value]:
        """The values that own a storage (not views), in id order."""
        return [v for v in self.values if v.alias_of is None]

    def __str__(self) -> str:
        from memplan.ir.printer import format_graph

        return format_graph(self)


def _resolve_root(vid: int, by_id: dict[int, Value]) -> int:
    seen: set[int] = set()
    cur = vid
    while by_id[cur].alias_of is not None:
        if cur in seen:
            raise InternalError(f"alias cycle through value {cur}")
        seen.add(cur)
        nxt = by_id[cur].alias_of
        assert nxt is not None
        if nxt not in by_id:
            raise InternalError(f"value {cur} aliases unknown value {nxt}")
        cur = nxt
    return cur
