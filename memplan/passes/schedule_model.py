"""The `schedule` pass's problem read off a graph, and its answer written back as a plan.

Tensors are the storages of non-zero size. An op uses the storages of everything it reads and writes, and
writes the storages it creates and those it updates in place (an `op_` target); a view writes nothing.
Ops are ordered after the producers of what they read; besides the data edges, every op using a storage
that some op updates in place keeps its captured place among that storage's users (reads before a write
stay before it), random ops keep their captured order among themselves (each draws from the generator in
turn), and so do ops without outputs. A training step's forward, backward and optimizer are segments no op
leaves; repeated layers (`Op.layer`) are the regions of the decomposition.

Under a capacity, the replacement becomes residency and events: each residence is a device interval; a
residence that is loaded starts with a `swap_in` event from the next tier at its first step; one that ends
before the tensor's last use, or is stored at the end (a kept tensor written in the step), ends with an
`evict` event at its last step (the runtime writes it out when it is dirty, else drops it); the next tier
holds the tensor's copy from the first write-out (from the start, for inputs and weights) to its last
reload (to the end, for kept tensors).
"""

from __future__ import annotations

from collections import defaultdict

from memplan.ir.analysis import Interval
from memplan.ir.graph import PERSISTENT_ROLES, Graph, Role
from memplan.ir.hardware import Tier
from memplan.ir.phases import phases
from memplan.plans.plan import Event
from memplan.solvers.schedule_problem import Replacement, ScheduleProblem

RANDOM_WORDS = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "exponential", "poisson")


def in_place(target: str) -> bool:
    """Whether an op target updates an argument in place (`aten.add_.Tensor`, `copy_`)."""
    name = target.split(".")[1] if target.count(".") >= 2 else target
    return name.endswith("_")


def is_random(target: str) -> bool:
    """Whether an op target draws from a random generator (by name: the IR holds no op tags)."""
    return any(w in target.lower() for w in RANDOM_WORDS)


def build_problem(graph: Graph, mode: str) -> tuple[ScheduleProblem, list[int]]:
    """The scheduling problem of `graph` (ops in its order) and the storage root of each tensor index."""
    roots = [v.id for v in graph.storages() if v.size_bytes > 0]
    index = {r: i for i, r in enumerate(roots)}
    uses: list[tuple[int, ...]] = []
    writes: list[tuple[int, ...]] = []
    for op in graph.ops:
        us = {graph.storage_of(v) for v in (*op.inputs, *op.outputs)}
        ws = {v for v in op.outputs if graph.value(v).alias_of is None}
        if in_place(op.target):
            ws |= {graph.storage_of(v) for v in op.outputs}
        uses.append(tuple(sorted(index[r] for r in us if r in index)))
        writes.append(tuple(sorted(index[r] for r in ws if r in index)))
    preds = _preds(graph, uses, writes)
    outs = {graph.storage_of(v) for v in graph.outputs}
    initial = tuple(graph.producer(r) is None for r in roots)
    state = PERSISTENT_ROLES | {Role.INPUT}
    keep = tuple(r in outs or graph.value(r).role in state for r in roots)
    segs: tuple[int, ...] = ()
    if mode == "train" and graph.outputs:
        ph = phases(graph)
        segs = tuple(0 if k < ph.fwd_end else 1 if k < ph.bwd_end else 2 for k in range(len(graph.ops)))
    problem = ScheduleProblem(
        sizes=tuple(graph.value(r).size_bytes for r in roots),
        uses=tuple(uses),
        writes=tuple(writes),
        preds=tuple(preds),
        initial=initial,
        keep=keep,
        segments=segs,
        groups=tuple(op.layer for op in graph.ops),
        keys=tuple(op.target for op in graph.ops),
        tensor_names=tuple(graph.value(r).name for r in roots),
        op_names=tuple(f"{op.name} ({op.target})" for op in graph.ops),
    )
    return problem, roots


def _preds(graph: Graph, uses: list[tuple[int, ...]], writes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    n = len(graph.ops)
    preds: list[set[int]] = [set() for _ in range(n)]
    for k, op in enumerate(graph.ops):
        for v in op.inputs:
            born = graph.producer(v)
            if born is not None and born < k:
                preds[k].add(born)
    writers: dict[int, list[int]] = defaultdict(list)
    users: dict[int, list[int]] = defaultdict(list)
    for k in range(n):
        for t in writes[k]:
            writers[t].append(k)
        for t in uses[k]:
            users[t].append(k)
    for t, ws in writers.items():
        if len(ws) > 1:  # written again after it was made: its users keep their captured order
            us = users[t]
            for a, b in zip(us, us[1:], strict=False):
                preds[b].add(a)
    ordered = [k for k, op in enumerate(graph.ops) if is_random(op.target) or not op.outputs]
    for a, b in zip(ordered, ordered[1:], strict=False):
        preds[b].add(a)
    return [tuple(sorted(s)) for s in preds]


def replacement_residency(
    p: ScheduleProblem, roots: list[int], rep: Replacement, n_steps: int, tier: str
) -> list[Interval]:
    """Device intervals of the residences and the next tier's copy of every tensor that has one."""
    out: list[Interval] = []
    by_tensor: dict[int, list[tuple[int, int, bool, bool]]] = defaultdict(list)
    for r in rep.residences:
        by_tensor[r.tensor].append((r.start, r.end, r.loaded, r.stored))
        out.append(Interval(roots[r.tensor], "device", r.start, r.end, p.sizes[r.tensor]))
    for t, root in enumerate(roots):
        spans = sorted(by_tensor.get(t, []))
        size = p.sizes[t]
        if p.initial[t]:
            start = 0
        else:
            stored = [e for _, e, _, st in spans if st]
            if not stored:
                continue
            start = stored[0]
        loads = [s + 1 for s, _, ld, _ in spans if ld and s >= start]
        end = n_steps if p.keep[t] else max(loads, default=start)
        if end > start:
            out.append(Interval(root, tier, start, min(end, n_steps), size))
    return out


def replacement_events(
    p: ScheduleProblem, roots: list[int], rep: Replacement, compute: list[Event], tier: Tier
) -> list[Event]:
    """`swap_in` before every loaded residence, `evict` after every residence but a tensor's last (and after
    its last when it is stored), timed at their steps' compute starts."""
    starts = {e.step: e.start_s for e in compute}
    last: dict[int, int] = {}
    for r in rep.residences:
        last[r.tensor] = max(last.get(r.tensor, -1), r.end)
    out: list[Event] = []
    for r in rep.residences:
        size, root = p.sizes[r.tensor], roots[r.tensor]
        if r.loaded:
            out.append(Event("swap_in", r.start, value_id=root, src_tier=tier.name, dst_tier="device",
                             start_s=starts.get(r.start, 0.0),
                             duration_s=size / tier.read_bw + tier.latency_s))  # fmt: skip
        if r.end < last[r.tensor] or r.stored:
            dur = size / tier.write_bw + tier.latency_s if r.stored else 0.0
            out.append(Event("evict", r.end - 1, value_id=root, src_tier="device", dst_tier=tier.name,
                             start_s=starts.get(r.end - 1, 0.0), duration_s=dur))  # fmt: skip
    return out
