"""What `remat_swap` decides about: the activations a training step saves for its backward, and what
keeping, swapping or recomputing each one costs in time and frees in memory.

A joint graph (see `memplan.ir.frontends.train_step`) runs the forward up to the loss, then the backward,
then, optionally, the optimizer. A *candidate* is an activation storage produced in the forward and read
again in the backward. For candidate c with producer step p, last forward use f, first backward use b and
last use l (all schedule positions):

    keep       device [p, l+1)
    swap       device [p, max(f+1, w)) + tier [p, b+1) + device [s, l+1)   (write done at w, prefetch from s)
    recompute  device [p, f+1) + device [b, l+1), its recompute closure transient at [b, b+1)

The recompute closure of c is the list of forward ops to re-run, from values that are still on the device at
b (parameters, inputs, other candidates kept or swapped back), to rebuild c; intermediate values that are
not candidates are rebuilt on the way and dropped at once.

A fourth way, *split* (MEMO's token-wise swap), swaps the first k rows of c (a row: all but the last dim,
row-major, so the tokens of a [batch, seq, hidden] activation) and recomputes the other rows: possible when
every op of the closure maps row i of its inputs to row i of its output (`ROW_OPS`, checked on shapes), so
that the closure run on the rows [k:] of its inputs gives the rows [k:] of c. `Candidate.rows` is c's row
count when it can be split, 0 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memplan.ir.analysis import lifetimes
from memplan.ir.cost import op_time_s
from memplan.ir.graph import PERSISTENT_ROLES, Graph, Op, Role
from memplan.ir.hardware import Hardware, Tier
from memplan.ir.phases import Phases, in_place_writes, phases, uses_by_root, written_in_place
from memplan.ir.row_ops import ROW_OPERAND, ROW_OPS, ROW_POINTWISE, ROW_VIEWS

MAX_CLOSURE_OPS = 12


@dataclass(frozen=True)
class Candidate:
    """One saved activation storage and the cost of each way of treating it."""

    value_id: int
    size_bytes: int
    produced: int
    last_fwd_use: int
    first_bwd_use: int
    last_use: int
    recompute_ops: tuple[int, ...]
    """Schedule indices of the forward ops to re-run, in order (empty: recompute not possible)."""
    recompute_transient: tuple[int, ...]
    """Storage ids rebuilt on the way (not candidates), live only at step `first_bwd_use`."""
    transient_bytes: int
    """Bytes of `recompute_transient`."""
    frontier: tuple[int, ...]
    """Candidate storages the recompute reads: they must be on the device at `first_bwd_use`."""
    view_ops: tuple[int, ...]
    """Forward ops that make views of this storage (re-run when it comes back from a tier)."""
    recompute_s: float
    swap_write_done: int
    """Step by which the copy out has finished (device copy freed then at the earliest)."""
    prefetch_step: int
    """Step at which the copy back starts so that it is done by `first_bwd_use` (hidden under compute)."""
    swap_s: float
    """Transfer seconds (out + back) on the link; hidden under compute when the link is free."""
    layer: int | None
    signature: tuple[object, ...]
    """What identifies 'the same tensor' in another repeated layer (for the per-layer formulation)."""
    rows: int = 0
    """Row count when c can be split (part swapped, part recomputed by rows); 0 when it cannot."""

    @property
    def can_recompute(self) -> bool:
        return bool(self.recompute_ops)

    @property
    def can_swap(self) -> bool:
        return self.prefetch_step > max(self.last_fwd_use + 1, self.swap_write_done)

    @property
    def can_split(self) -> bool:
        return self.rows > 1 and self.can_swap and self.can_recompute


@dataclass(frozen=True)
class _Context:
    """Everything derived once from the graph that the per-candidate analysis reads."""

    graph: Graph
    hw: Hardware
    tier: Tier | None
    phases: Phases
    uses: dict[int, list[int]]
    life: dict[int, tuple[int, int]]
    clock: np.ndarray
    """clock[i]: start time of step i under the roofline model."""
    cand_ids: frozenset[int]
    inplace: set[int]
    writes: dict[int, list[int]]
    """Storage -> steps of its in-place updates (`in_place_writes`)."""
    views: dict[int, list[int]]
    """Storage root -> ids of the values that are views of it."""


def find_candidates(graph: Graph, hw: Hardware, tier: Tier | None) -> tuple[Phases, list[Candidate]]:
    """Every saved activation with its keep / swap / recompute profile (see module docstring)."""
    ph = phases(graph)
    uses = uses_by_root(graph)
    times = np.array([op_time_s(op, hw) for op in graph.ops] + [0.0])
    views: dict[int, list[int]] = {}
    for v in graph.values:
        if v.alias_of is not None:
            views.setdefault(graph.storage_of(v.id), []).append(v.id)
    cand_ids = frozenset(
        r for r in {graph.storage_of(v.id) for v in graph.values} if _is_candidate(graph, r, ph, uses)
    )
    ctx = _Context(
        graph,
        hw,
        tier,
        ph,
        uses,
        lifetimes(graph),
        np.concatenate([[0.0], np.cumsum(times)]),
        cand_ids,
        written_in_place(graph),
        in_place_writes(graph),
        views,
    )
    return ph, [_candidate(ctx, r) for r in sorted(cand_ids)]


def _is_candidate(graph: Graph, r: int, ph: Phases, uses: dict[int, list[int]]) -> bool:
    v, p = graph.value(r), graph.producer(r)
    return (
        v.role == Role.ACTIVATION
        and v.size_bytes > 0
        and p is not None
        and p < ph.fwd_end
        and any(ph.fwd_end <= x < ph.bwd_end for x in uses.get(r, []))
    )


def _candidate(ctx: _Context, r: int) -> Candidate:
    graph, u = ctx.graph, ctx.uses[r]
    v = graph.value(r)
    p = graph.producer(r)
    assert p is not None
    f = max([x for x in u if x < ctx.phases.fwd_end], default=p)
    b = min(x for x in u if x >= ctx.phases.fwd_end)
    last = ctx.life[r][1] - 1
    ops, trans, frontier = ((), (), ()) if r in ctx.inplace else _closure(ctx, r, b)
    rec_s = float(sum(op_time_s(graph.ops[i], ctx.hw) for i in ops))
    final = max([p, *(x for x in ctx.writes.get(r, ()) if x < ctx.phases.fwd_end)])
    w, s, sw = _swap_timing(v.size_bytes, final, b, ctx.clock, ctx.tier)  # copied out once final (`+=`)
    op = graph.ops[p]
    path = op.module_path
    if op.layer is not None and f".{op.layer}." in path + ".":
        path = (path + ".").replace(f".{op.layer}.", ".#.", 1).rstrip(".")
    sig = (path, op.target, v.shape, v.dtype, tuple(graph.ops[i].target for i in ops))
    trans_bytes = sum(graph.value(t).size_bytes for t in trans)
    views = tuple(_producers_of_aliases(ctx, r, p)[1:])
    return Candidate(
        r,
        v.size_bytes,
        p,
        f,
        b,
        last,
        ops,
        trans,
        trans_bytes,
        frontier,
        views,
        rec_s,
        w,
        s,
        sw,
        op.layer,
        sig,
        _split_rows(graph, r, ops) if ops else 0,
    )


def _closure(ctx: _Context, r: int, b: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Ops to re-run at step b to rebuild storage r, the non-candidate storages rebuilt on the way, and the
    candidates read. Empty when the rebuild would need a value that is gone at b, a storage updated in place
    after the op re-run read it (the re-run would read the later contents: an in-place activation such as
    `hardswish_` on a saved batch-norm output), or too many ops."""
    graph = ctx.graph
    ops: set[int] = set()
    trans: set[int] = set()
    frontier: set[int] = set()
    todo = [r]
    while todo:
        cur = todo.pop()
        p = graph.producer(cur)
        if p is None or len(ops) >= MAX_CLOSURE_OPS:
            return (), (), ()
        ops.update(_producers_of_aliases(ctx, cur, p))
        for vid in graph.ops[p].inputs:
            root = graph.storage_of(vid)
            rv = graph.value(root)
            if root == cur or root in trans:
                continue
            if rv.role in PERSISTENT_ROLES:
                continue
            if _unreadable(ctx, root, p, b):
                return (), (), ()
            if root in ctx.cand_ids:
                frontier.add(root)
            elif ctx.life[root][0] <= b < ctx.life[root][1]:
                continue  # still live at b anyway
            elif graph.producer(root) is None:
                return (), (), ()  # a graph input that is gone by then
            else:
                trans.add(root)
                todo.append(root)
    return tuple(sorted(ops)), tuple(sorted(trans)), tuple(sorted(frontier))


def _unreadable(ctx: _Context, root: int, p: int, b: int) -> bool:
    """Whether op p, re-run at step b, cannot read `root` as it did: changed in place since p read it, or a
    saved activation (a candidate, not rebuilt here) freed before b."""
    if any(w > p for w in ctx.writes.get(root, ())):
        return True
    return root in ctx.cand_ids and ctx.life[root][1] <= b


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows of a tensor: the product of all dims but the last (0 for a scalar)."""
    return int(np.prod(shape[:-1], dtype=np.int64)) if shape else 0


def _split_rows(graph: Graph, root: int, ops: tuple[int, ...]) -> int:
    """Rows of `root` if every op of its closure is row-wise over the same rows (see module docstring)."""
    rows = rows_of(graph.value(root).shape)
    ok = rows > 1 and all(_row_wise(graph, graph.ops[i], rows) for i in ops)
    return rows if ok else 0


def _row_wise(graph: Graph, op: Op, rows: int) -> bool:
    """Whether `op` maps row i of its activation inputs (each with `rows` rows) to row i of its outputs."""
    if op.target not in ROW_OPS:
        return False
    carried = [graph.value(graph.storage_of(v)).role not in PERSISTENT_ROLES for v in op.inputs]
    ins = [graph.value(v) for v in op.inputs]
    outs = [graph.value(v) for v in op.outputs]
    if any(rows_of(v.shape) != rows for v in outs + [v for v, c in zip(ins, carried, strict=True) if c]):
        return False
    if op.target in ROW_OPERAND:
        return [k for k, c in enumerate(carried) if c] == [ROW_OPERAND[op.target]]
    if op.target in ROW_POINTWISE:  # parameters broadcast over rows only as vectors or scalars
        return all(len(v.shape) <= 1 for v, c in zip(ins, carried, strict=True) if not c)
    if op.target in ROW_VIEWS:
        return ins[0].shape[-1:] == outs[0].shape[-1:]
    return ins[0].shape[:-1] + (1,) == outs[-1].shape  # layer norm's rstd, mean's result: last dim only


def _producers_of_aliases(ctx: _Context, root: int, p: int) -> list[int]:
    """The producing op of `root` and of every view of it made in the forward (so backward readers of a view
    get it back); views cost nothing to redo."""
    out = {p}
    for vid in ctx.views.get(root, ()):
        q = ctx.graph.producer(vid)
        if q is not None and p < q < ctx.phases.fwd_end:
            out.add(q)
    return sorted(out)


def _swap_timing(size: int, p: int, b: int, clock: np.ndarray, tier: Tier | None) -> tuple[int, int, float]:
    """(write-done step, prefetch step, transfer seconds). The write starts after step p; the read is started
    as late as possible such that the compute between it and b covers the read time."""
    if tier is None:
        return b, 0, 0.0
    write_s = size / tier.write_bw + tier.latency_s
    read_s = size / tier.read_bw + tier.latency_s
    w = int(np.searchsorted(clock, clock[p + 1] + write_s, side="left"))
    s = int(np.searchsorted(clock, clock[b] - read_s, side="right")) - 1
    return min(w, b), max(s, 0), write_s + read_s
