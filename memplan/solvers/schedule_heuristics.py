"""Orders for the scheduling problem without a solver: a memory-aware list scheduler, and the regions the
exact and heuristic orders are built from.

The list scheduler runs the ready op that grows the live bytes least (bytes it brings to life minus bytes
whose last use it is), in one of a few tie-breaking rules; each rule gives one order and the caller keeps
the best. Regions are runs of consecutive ops (captured order) of one segment and one repeated block,
split into chunks of at most `max_ops`: reordering within regions only keeps every op in its segment, and
the live bytes inside a region depend on that region's order alone (what crosses it is a constant), so the
peak of the whole order is the largest of the regions' peaks. Two regions with the same signature (ops,
their edges and the sizes and roles of what they use, relative to the region) take the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memplan.solvers.schedule_problem import ScheduleProblem

RULES = ("captured", "newest", "free-first")
"""Tie-breaking rules of the list scheduler: captured position first; the op reading the most recently
made tensor first (depth first); the op freeing the most bytes first."""


@dataclass(frozen=True)
class Region:
    """Ops `ops` (captured order, consecutive) reordered together; `crossing`: tensors used in the region
    and live before it or after it (their lifetimes reach outside)."""

    ops: tuple[int, ...]
    live_before: frozenset[int]
    live_after: frozenset[int]


def regions(p: ScheduleProblem, max_ops: int) -> list[Region]:
    """The regions of `p` (see the module docstring), in captured order."""
    runs: list[list[int]] = []
    for v in range(p.n_ops):
        key = (p.segment(v), p.groups[v] if p.groups else None)
        prev = runs[-1][-1] if runs else None
        same = prev is not None and (p.segment(prev), p.groups[prev] if p.groups else None) == key
        if same and len(runs[-1]) < max_ops:
            runs[-1].append(v)
        else:
            runs.append([v])
    return [region_of(p, tuple(r), model="peak") for r in _merge_small(runs, max_ops, p)]


def _merge_small(runs: list[list[int]], max_ops: int, p: ScheduleProblem) -> list[list[int]]:
    """Join neighbouring runs of one segment while they stay within `max_ops` (tiny runs between layers)."""
    out: list[list[int]] = []
    for r in runs:
        if out and len(out[-1]) + len(r) <= max_ops and p.segment(out[-1][0]) == p.segment(r[0]) and (
            len(r) < 4 or len(out[-1]) < 4
        ):
            out[-1].extend(r)
        else:
            out.append(list(r))
    return out


def region_of(p: ScheduleProblem, ops: tuple[int, ...], model: str) -> Region:
    """The region of `ops` with what it hands in and out: a tensor is live before it if an op before
    (captured order) uses it, or (peak model) it is initial; after it if an op after uses it, or (peak
    model) it is initial or kept."""
    inside = set(ops)
    lo, hi = min(ops), max(ops)
    before: set[int] = set()
    after: set[int] = set()
    used = {t for v in ops for t in p.uses[v]}
    users = _users_cache(p)
    for t in used:
        us = users[t]
        if any(u < lo and u not in inside for u in us) or (model == "peak" and p.initial[t]):
            before.add(t)
        if any(u > hi and u not in inside for u in us) or (model == "peak" and (p.initial[t] or p.keep[t])):
            after.add(t)
    return Region(ops, frozenset(before), frozenset(after))


_USERS: dict[int, list[list[int]]] = {}


def _users_cache(p: ScheduleProblem) -> list[list[int]]:
    key = id(p)
    if key not in _USERS:
        _USERS.clear()
        _USERS[key] = p.users()
    return _USERS[key]


def region_peak(p: ScheduleProblem, reg: Region, order: Sequence[int]) -> int:
    """The largest bytes live at one step of the region's `order`, counting only tensors it uses (what
    crosses it untouched is the same for every order)."""
    pos = {v: k for k, v in enumerate(order)}
    n = len(order)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for v in order:
        for t in p.uses[v]:
            k = pos[v]
            first[t] = min(first.get(t, k), k)
            last[t] = max(last.get(t, k), k)
    diff = [0] * (n + 1)
    for t in first:
        s = 0 if t in reg.live_before else first[t]
        e = n if t in reg.live_after else last[t] + 1
        diff[s] += p.sizes[t]
        diff[e] -= p.sizes[t]
    top = cur = 0
    for k in range(n):
        cur += diff[k]
        top = max(top, cur)
    return top


def list_schedule(p: ScheduleProblem, reg: Region, rule: str) -> list[int]:
    """One memory-aware list schedule of the region's ops (see the module docstring)."""
    inside = set(reg.ops)
    preds = {v: [u for u in p.preds[v] if u in inside] for v in reg.ops}
    succs: dict[int, list[int]] = {v: [] for v in reg.ops}
    for v in reg.ops:
        for u in preds[v]:
            succs[u].append(v)
    waiting = {v: len(set(preds[v])) for v in reg.ops}
    remaining: dict[int, int] = {}
    for v in reg.ops:
        for t in set(p.uses[v]):
            remaining[t] = remaining.get(t, 0) + 1
    live = set(reg.live_before)
    made_at: dict[int, int] = {}
    ready = [v for v in reg.ops if waiting[v] == 0]
    order: list[int] = []
    while ready:
        best_key, best = None, -1
        for v in ready:
            key = _score(p, v, live, remaining, reg, rule, made_at)
            if best_key is None or key < best_key:
                best_key, best = key, v
        ready.remove(best)
        order.append(best)
        for t in set(p.uses[best]):
            live.add(t)
            made_at.setdefault(t, len(order))
            remaining[t] -= 1
            if remaining[t] == 0 and t not in reg.live_after:
                live.discard(t)
        for w in succs[best]:
            waiting[w] -= 1
            if waiting[w] == 0:
                ready.append(w)
    return order


def _score(
    p: ScheduleProblem,
    v: int,
    live: set[int],
    remaining: dict[int, int],
    reg: Region,
    rule: str,
    made_at: dict[int, int],
) -> tuple[int, ...]:
    uses = set(p.uses[v])
    grown = sum(p.sizes[t] for t in uses if t not in live)
    freed = sum(p.sizes[t] for t in uses if remaining[t] == 1 and t not in reg.live_after)
    if rule == "newest":
        recent = max((made_at.get(t, -1) for t in uses), default=-1)
        return (grown - freed, -recent, v)
    if rule == "free-first":
        return (-freed, grown, v)
    return (grown - freed, v)


def signature(p: ScheduleProblem, reg: Region) -> tuple[object, ...]:
    """What makes two regions interchangeable: per op its key, its in-region predecessors (relative), and
    per use the tensor's size, whether it crosses the region's ends, and the first op of the region that
    uses it (relative), so that equal signatures have equal problems up to renaming."""
    index = {v: i for i, v in enumerate(reg.ops)}
    first_use: dict[int, int] = {}
    for i, v in enumerate(reg.ops):
        for t in p.uses[v]:
            first_use.setdefault(t, i)
    ops = []
    for v in reg.ops:
        key = p.keys[v] if p.keys else ""
        pr = tuple(sorted(index[u] for u in p.preds[v] if u in index))
        us = tuple(
            sorted(
                (first_use[t], p.sizes[t], t in reg.live_before, t in reg.live_after, t in p.writes[v])
                for t in set(p.uses[v])
            )
        )
        ops.append((key, pr, us))
    return tuple(ops)


def best_list_order(p: ScheduleProblem, reg: Region) -> tuple[list[int], int]:
    """The list schedule (over every rule, and the captured order) with the lowest region peak."""
    best = list(reg.ops)
    best_peak = region_peak(p, reg, best)
    for rule in RULES:
        order = list_schedule(p, reg, rule)
        pk = region_peak(p, reg, order)
        if pk < best_peak:
            best, best_peak = order, pk
    return best, best_peak
