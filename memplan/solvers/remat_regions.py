"""Region decomposition of pure recomputation (the stage model of `remat_dag`) for DAGs too long for one
exact model: split the topological order at narrow cuts, solve each region under the budget with its boundary
tensors pinned, and stitch the region schedules into one.

Cuts. A cut at position c (between nodes c-1 and c) is crossed by X(c), the nodes before c that a node at or
after c reads:

    nodes      0 1 2 3 | 4 5 6 7 8 | 9 ...
    regions    [  A    ) [   B     ) [  C
    X(4)       what A hands to B and later regions (resident when B starts, pinned: B never recomputes it)

`cuts` places them by dynamic programming over the positions: regions of `MIN_NODES`..`MAX_NODES` nodes, a cut
priced by its crossing bytes against the room left at it, so cuts far below the budget win.

Region [a, b) becomes a `RematProblem` of its own: the externals E (the nodes before a that the region reads)
as its first nodes, with no inputs and no cost; then the region's nodes; then, if X(b) is not empty, a sink
(cost 0, size 0) reading the handover X(b) minus the pass-through P (the nodes of X(a) the region does not
read, resident throughout, their bytes taken off the budget). It is solved by CP-SAT on Moccasin's model
(`checkmate_cpsat.schedule_with`, `COPIES` copies per region node: a restriction that finds schedules in a
fraction of a second where HiGHS takes seconds for its first one) with the boundary pinned: an external has
one copy (never recomputed) and no copy starts in the sink's stage, so the handover is resident when the
region ends. A region with no schedule bans its two cuts and the rest is planned again (`solve_regions`).

Why the stitched schedule is valid. Region k starts with exactly X(a) = E | P resident, the handover of
region k-1, which fit the budget in that region's sink stage; within the region, the subproblem's memory is
the full schedule's memory minus the constant P. Each region schedule keeps what the next one starts with, so
the keep sets chain. Every stitched schedule is still replayed by `remat_dag.check` before it is returned.
The decomposition only restricts the problem (nothing is recomputed across a cut), so its objective is an
upper bound and it proves no lower one: its bound is the sum of costs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from memplan.solvers.checkmate_cpsat import schedule_with
from memplan.solvers.remat_dag import (
    RematProblem,
    RematResult,
    Schedule,
    check,
    cost_scale,
    events,
    judge,
)

MIN_NODES = 4
MAX_NODES = 24
"""Region lengths planned first: CP-SAT solves such a region in a fraction of a second."""
COPIES = 3
"""Copies per region node in the CP-SAT model (up to two recomputations): a restriction that finds schedules
fast."""
MAX_MERGED = 48
"""Longest region planned where regions of `MAX_NODES` leave no way round the regions that failed."""


Stage = tuple[tuple[int, ...], frozenset[int]]
"""One stage of a schedule: (compute, keep)."""


@dataclass(frozen=True, slots=True)
class Region:
    """Nodes [start, end) of the order with their boundary: `externals` (read inside, from before start),
    `passing` (resident throughout, read only after end) and `handover` (X(end) minus `passing`)."""

    start: int
    end: int
    externals: tuple[int, ...]
    passing: frozenset[int]
    handover: tuple[int, ...]


def crossing(problem: RematProblem) -> list[frozenset[int]]:
    """X(c) for c in 0..n: the nodes before c read by a node at or after c."""
    users = problem.users()
    out: list[frozenset[int]] = []
    live: set[int] = set()
    for c in range(problem.n + 1):
        live -= {i for i in live if users[i][-1] < c}
        out.append(frozenset(live))
        if c < problem.n and users[c]:
            live.add(c)
    return out


def cuts(
    problem: RematProblem,
    budget: int,
    start: int = 0,
    banned: frozenset[int] = frozenset(),
    min_nodes: int = MIN_NODES,
    max_nodes: int = MAX_NODES,
) -> list[int] | None:
    """Region boundaries start = c_0 < ... < c_m = n, each region min_nodes..max_nodes long (the last may be
    shorter), no cut at a `banned` position, by dynamic programming over the cut positions: a cut
    at c crossed by w bytes costs w / (budget - w - size_c) (stage c holds at least X(c) and c's output), so
    cuts far below the budget are preferred and none that cannot fit is made. None if no such boundaries."""
    n = problem.n
    weight = [sum(problem.size[i] for i in xc) for xc in crossing(problem)]
    room = [budget - w - (problem.size[c] if c < n else 0) for c, w in enumerate(weight)]
    price = [w / r if r > 0 else math.inf for w, r in zip(weight, room, strict=True)]
    price[n] = 0.0
    best = [math.inf] * (n + 1)
    best[start] = 0.0
    prev = [start] * (n + 1)
    for c in range(start + 1, n + 1):
        if c in banned:
            continue
        shortest = 1 if c == n else min_nodes
        for a in range(max(start, c - max_nodes), c - shortest + 1):
            w = best[a] + price[c]
            if w < best[c]:
                best[c], prev[c] = w, a
    if not math.isfinite(best[n]):
        return None
    out = [n]
    while out[-1] > start:
        out.append(prev[out[-1]])
    return out[::-1]


def region(problem: RematProblem, x: list[frozenset[int]], a: int, b: int) -> Region:
    """Nodes [a, b) with their externals, pass-through and handover (`x`: the crossing sets)."""
    ext = sorted({p for j in range(a, b) for p in problem.preds[j] if p < a})
    passing = x[a] - set(ext)
    return Region(a, b, tuple(ext), passing, tuple(sorted(x[b] - passing)))


def subproblem(problem: RematProblem, reg: Region) -> tuple[RematProblem, list[int]]:
    """The region as a problem of its own (module docstring) and the original node of each of its nodes
    (-1 for the sink)."""
    orig = [*reg.externals, *range(reg.start, reg.end)]
    index = {v: i for i, v in enumerate(orig)}
    ext = len(reg.externals)
    preds = [()] * ext + [tuple(index[p] for p in problem.preds[j]) for j in range(reg.start, reg.end)]
    cost = [0.0] * ext + [problem.cost[j] for j in range(reg.start, reg.end)]
    size = [problem.size[v] for v in orig]
    if reg.handover:
        orig.append(-1)
        preds.append(tuple(index[v] for v in reg.handover))
        cost.append(0.0)
        size.append(0)
    names = tuple(problem.names[v] if v >= 0 else "(handover)" for v in orig)
    return RematProblem(names, tuple(cost), tuple(size), tuple(preds)), orig


def solve_region(problem: RematProblem, budget: int, reg: Region, time_limit_s: float) -> list[Stage] | None:
    """The region's stages (compute, keep) in original node ids, from CP-SAT with the boundary pinned; None
    if it finds no schedule in time (or none exists)."""
    sub, orig = subproblem(problem, reg)
    room = budget - sum(problem.size[i] for i in reg.passing)
    if room <= 0:
        return None
    ext, stop = len(reg.externals), reg.end - reg.start + len(reg.externals)
    users = sub.users()
    counts = [1] * sub.n
    for v in range(ext, stop):
        counts[v] = max(1, min(COPIES, stop - v)) if users[v] else 1
    sched = schedule_with(sub, room, counts, stop, time_limit_s)
    if sched is None:
        return None
    return [
        (tuple(orig[i] for i in sched.compute[t]), frozenset(orig[i] for i in sched.keep[t]) | reg.passing)
        for t in range(ext, stop)
    ]


def solve_regions(
    problem: RematProblem, budget: int, time_limit_s: float, max_nodes: int = MAX_NODES
) -> RematResult:
    """The stitched schedule of every region's CP-SAT run (module docstring), each region given the time left
    in proportion to its nodes. A region with no schedule (none exists with its boundary pinned, or none found
    in time) bans both its cuts (its entry or its exit may be what fails), and the cuts are planned again from
    the start of the region before it, with regions of up to `MAX_MERGED` nodes where `max_nodes` leaves no
    way; status timeout if no cuts are left or the time runs out."""
    t0 = time.perf_counter()
    x = crossing(problem)
    banned: set[int] = set()
    solved: dict[tuple[int, int], list[Stage]] = {}
    bounds = _plan(problem, budget, 0, banned, max_nodes)
    k = 0
    while bounds is not None and k + 1 < len(bounds):
        a, b = bounds[k], bounds[k + 1]
        left = time_limit_s - (time.perf_counter() - t0)
        if (a, b) not in solved and left > 0:
            part = solve_region(
                problem, budget, region(problem, x, a, b), max(left * (b - a) / (problem.n - a), 0.05)
            )
            if part is not None:
                solved[(a, b)] = part
        if (a, b) in solved:
            k += 1
            continue
        banned |= {a, b} - {0, problem.n}
        k = max(k - 1, 0)
        rest = _plan(problem, budget, bounds[k], banned, max_nodes) if left > 0 else None
        bounds = None if rest is None else bounds[:k] + rest
    if bounds is None:
        scale = cost_scale(problem)
        elapsed = time.perf_counter() - t0
        trivial = math.fsum(problem.cost)
        return RematResult("timeout", None, None, trivial, None, elapsed, "regions", scale.tolerance)
    done = [st for a, b in zip(bounds, bounds[1:], strict=False) for st in solved[(a, b)]]
    return _stitched(problem, budget, Schedule(tuple(c for c, _ in done), tuple(s for _, s in done)), t0)


def _plan(
    problem: RematProblem, budget: int, start: int, banned: set[int], max_nodes: int
) -> list[int] | None:
    """`cuts` from `start`; regions up to `MAX_MERGED` long only where those of `max_nodes` leave no way."""
    frozen = frozenset(banned)
    plan = cuts(problem, budget, start, frozen, max_nodes=max_nodes)
    return plan if plan is not None else cuts(problem, budget, start, frozen, max_nodes=MAX_MERGED)


def _stitched(problem: RematProblem, budget: int, sched: Schedule, t0: float) -> RematResult:
    scale = cost_scale(problem)
    trivial = math.fsum(problem.cost)
    report = check(problem, events(problem, sched), budget)
    elapsed = time.perf_counter() - t0
    if not report.ok:  # cannot happen by construction (module docstring); never report such a schedule
        name = "regions, stitched schedule failed the check"
        return RematResult("timeout", None, None, trivial, None, elapsed, name, scale.tolerance)
    status, gap = judge(report.cost, trivial, scale)
    return RematResult(status, sched, sched.cost(problem), trivial, gap, elapsed, "regions", scale.tolerance)
