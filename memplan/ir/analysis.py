"""Analyses over a schedule: storage lifetimes, the live-bytes timeline per tier, peak, and lower bounds.

One memory model serves every pass: a storage is live from the first op that writes it (or from before op 0
when nothing in the graph produces it) to just after the last op that reads any of its aliases; graph
outputs and persistent state (parameters, buffers, optimizer state) stay live to the end. Intervals are
half-open over schedule positions: `[start, end)`, with `0 <= start < end <= len(graph.ops)`. The step's
inputs (and a training step's autograd seed) stay live to the end too: the caller still holds them.

A plan can move a storage off the device for part of its life; it says so with `Interval`s on other tiers,
and `timeline` adds every interval to its tier.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from memplan.ir.graph import PERSISTENT_ROLES, Graph, Role


@dataclass(frozen=True, slots=True)
class Interval:
    """A storage resident on `tier` over schedule steps `[start, end)`."""

    value_id: int
    tier: str
    start: int
    end: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Peak:
    """The highest live bytes on one tier and the schedule step (op index) where it first happens."""

    tier: str
    bytes: int
    step: int


def lifetimes(graph: Graph) -> dict[int, tuple[int, int]]:
    """`[start, end)` of every storage root in the graph's schedule, keyed by root value id."""
    n = max(len(graph.ops), 1)
    span: dict[int, list[int]] = {}
    for v in graph.values:
        root = graph.storage_of(v.id)
        prod = graph.producer(v.id)
        start = 0 if prod is None else prod
        uses = graph.consumers(v.id)
        end = max(uses[-1] + 1 if uses else start + 1, start + 1)
        cur = span.setdefault(root, [start, end])
        cur[0] = min(cur[0], start)
        cur[1] = max(cur[1], end)
    for vid in graph.outputs:
        span[graph.storage_of(vid)][1] = n
    for root, (s, e) in span.items():
        if graph.value(root).role in PERSISTENT_ROLES:
            span[root] = [0, n]
        elif graph.value(root).role == Role.INPUT:  # the caller holds it until the step returns
            span[root] = [s, n]
        else:
            span[root] = [s, min(e, n)]
    return {k: (s, e) for k, (s, e) in span.items()}


def device_intervals(graph: Graph, tier: str = "device") -> list[Interval]:
    """The baseline residency: every storage on one tier for its whole lifetime (zero-byte storages
    skipped)."""
    out = []
    for root, (s, e) in sorted(lifetimes(graph).items()):
        size = graph.value(root).size_bytes
        if size > 0:
            out.append(Interval(root, tier, s, e, size))
    return out


def timeline(intervals: Iterable[Interval], n_steps: int) -> dict[str, np.ndarray]:
    """Live bytes per tier at every schedule step (int64 arrays of length `n_steps`, at least 1)."""
    intervals = list(intervals)
    n_steps = max(n_steps, 1, *(iv.end for iv in intervals))
    diff: dict[str, np.ndarray] = {}
    for iv in intervals:
        d = diff.setdefault(iv.tier, np.zeros(n_steps + 1, dtype=np.int64))
        d[iv.start] += iv.size_bytes
        d[iv.end] -= iv.size_bytes
    return {tier: np.cumsum(d[:-1]) for tier, d in diff.items()}


def peaks(intervals: Iterable[Interval], n_steps: int) -> dict[str, Peak]:
    """Peak live bytes per tier, with the first step where it is reached."""
    out = {}
    for tier, live in timeline(intervals, n_steps).items():
        step = int(np.argmax(live)) if len(live) else 0
        out[tier] = Peak(tier, int(live[step]) if len(live) else 0, step)
    return out


def live_at(intervals: Iterable[Interval], step: int, tier: str = "device") -> list[Interval]:
    """The intervals live on `tier` at `step`, largest first: the tensors that make a peak."""
    live = [iv for iv in intervals if iv.tier == tier and iv.start <= step < iv.end]
    return sorted(live, key=lambda iv: -iv.size_bytes)


def op_working_set(graph: Graph, index: int) -> int:
    """Bytes of the distinct storages an op reads and writes: all must be on the device while it runs."""
    op = graph.ops[index]
    roots = {graph.storage_of(v) for v in (*op.inputs, *op.outputs)}
    return sum(graph.value(r).size_bytes for r in roots)


def working_set_bound(graph: Graph) -> tuple[int, int]:
    """A lower bound on the device peak of *any* plan (any swap, recompute or offload): the largest op
    working set, with the index of that op. No plan can run an op without its operands on the device."""
    if not graph.ops:
        return 0, 0
    sizes = [op_working_set(graph, i) for i in range(len(graph.ops))]
    i = int(np.argmax(sizes))
    return sizes[i], i


def persistent_bytes(graph: Graph) -> int:
    """Bytes of parameters, buffers and optimizer state: the model state that lives through the whole step."""
    return sum(v.size_bytes for v in graph.storages() if v.role in PERSISTENT_ROLES)
