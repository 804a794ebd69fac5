"""The packing portfolio: decomposition, best-fit greedy under several orderings, exact search.

`solve` always returns the lowest packing found, with its height, a lower bound (the max load, tightened
by alignment) and a status:

1. a bound above the capacity proves infeasibility at once;
2. when minimising, or when the problem is too large for the exact search, buffers live over the whole
   horizon are stacked at the bottom, and the rest splits into partitions that share no time
   (`decompose`); each partition only has to reach the capacity left, or, when minimising, the largest
   partition bound (a lower partition cannot lower the arena). When a capacity must be met and the exact
   search may run, the problem stays whole: the search decomposes it by itself, and a hard partition
   then gets the time an easy one did not need (and its order is not perturbed by the bottom stack);
3. per partition: the first greedy ordering; if it misses, an exact search (`search.search`) at the
   target on 90% of the time when a capacity must be met (an "infeasible" there ends the partition), or
   on half of it when minimising (on real traces it dives straight to the bound); then the other orderings;
   then the exact search on what is left, at the capacity, or when minimising bisecting between the
   bound and the best height, so every "infeasible" raises the bound and every packing lowers the height;
   a partition too large to search (`exact_max_buffers`) instead iterates the best greedy ordering
   (`greedy.squeaky`: the buffers that ended above the bound go first next time) on the time left.

Invariant: `lower_bound_bytes <= height_bytes` of every returned packing, and status OPTIMAL only when
they are equal.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from memplan.errors import InvalidInput
from memplan.solvers.packing.greedy import (
    ORDERINGS,
    GreedyResult,
    Placer,
    ordering,
    place_with,
    placer,
    squeaky,
)
from memplan.solvers.packing.problem import Problem, Solution, Status, height_of
from memplan.solvers.packing.search import Outcome, SearchParams, search
from memplan.solvers.packing.sweep import lower_bound, partitions, sweep

DIVE_SHARE = 0.5
"""Share of the time the first exact search at the lower bound gets when minimising (it either dives
straight to the bound or is better spent on greedy and bisection)."""


@dataclass(frozen=True, slots=True)
class PortfolioOptions:
    """Which members run. `exact_max_buffers`: larger problems get greedy only (the search's nodes cost
    O(buffers + sections) each). `search`: the exact search's switches; by default two differently ordered
    searches race on two processes (`SearchParams.parallel`)."""

    greedy_orderings: tuple[str, ...] = ORDERINGS
    exact: bool = True
    exact_max_buffers: int = 5000
    search: SearchParams = SearchParams(parallel=True)


@dataclass(frozen=True, slots=True, eq=False)
class _Greedy:
    """The lowest greedy packing so far, the buffer order that made it, and the problem's `Placer`."""

    result: GreedyResult
    order: np.ndarray
    placer: Placer


def _greedy(
    problem: Problem, opts: PortfolioOptions, lb: int, deadline: float, pl: Placer | None = None
) -> _Greedy:
    """Greedy under the orderings in turn, until one reaches the bound `lb` or the next one is expected
    to end after the deadline."""
    pl = pl if pl is not None else placer(problem)
    best: _Greedy | None = None
    for name in opts.greedy_orderings:
        t = time.perf_counter()
        order = ordering(problem, name, pl.sw)
        res = place_with(pl, order, name)
        if best is None or res.height_bytes < best.result.height_bytes:
            best = _Greedy(res, order, pl)
        if best.result.height_bytes <= lb or time.perf_counter() + (time.perf_counter() - t) > deadline:
            break
    if best is None:
        raise InvalidInput("PortfolioOptions.greedy_orderings is empty; name at least one ordering")
    return best


def solve(
    problem: Problem,
    timeout_s: float,
    capacity: int | None = None,
    options: PortfolioOptions = PortfolioOptions(),
) -> Solution:
    """Pack `problem` (its capacity, or `capacity` when given) within about `timeout_s` seconds.

    Without a capacity the height is minimised. The returned packing is the lowest found even when it
    does not fit the capacity; the status says whether it does (FEASIBLE / OPTIMAL) or not (TIMEOUT,
    INFEASIBLE). When minimising (or beyond `exact_max_buffers`), buffers live over the whole horizon go
    to the bottom first and the rest splits into partitions (no shared time) solved one by one (see
    `decompose`); with a capacity the exact search gets the whole problem.
    """
    t0 = time.perf_counter()
    cap = capacity if capacity is not None else problem.capacity_bytes
    sw = sweep(problem)
    lb = lower_bound(problem, sw)
    if not problem.buffers:
        return Solution((), 0, Status.OPTIMAL, 0, time.perf_counter() - t0, "empty")
    if cap is not None and lb > cap:
        return Solution(None, None, Status.INFEASIBLE, lb, time.perf_counter() - t0, "max-load")
    base, bottom, parts = decompose(problem)
    whole = cap is not None and options.exact and len(problem.buffers) <= options.exact_max_buffers
    if whole or not bottom and len(parts) == 1:  # the exact search decomposes by itself, with shared time
        return _solve_part(problem, lb, cap, options, t0, t0 + timeout_s)
    offsets = [0] * len(problem.buffers)
    for i, off in bottom.items():
        offsets[i] = off
    subs = [Problem(tuple(problem.buffers[i] for i in idx), None, problem.alignment_bytes) for idx in parts]
    bounds = [lower_bound(sub) for sub in subs]
    target = cap - base if cap is not None else max(bounds, default=0)
    sols = []
    for k, (idx, sub) in enumerate(zip(parts, subs, strict=True)):
        left = t0 + timeout_s - time.perf_counter()
        share = max(left, 0.0) * len(idx) / max(sum(len(p) for p in parts[k:]), 1)
        sol = _solve_part(sub, bounds[k], target, options, time.perf_counter(), time.perf_counter() + share)
        sols.append(sol)
        for i, off in zip(idx, sol.offsets_bytes or (0,) * len(idx), strict=True):
            offsets[i] = base + off if problem.buffers[i].size_bytes else 0  # empty: holds no bytes
    return _combine(problem, tuple(offsets), lb, base, sols, cap, t0)


def decompose(problem: Problem) -> tuple[int, dict[int, int], list[list[int]]]:
    """Stack the buffers live over the whole horizon at the bottom; split the rest by shared time.

    Returns the stack's height, the stacked buffers' offsets and the other buffers' partitions. Sound and,
    with alignment 1, loses nothing: a buffer live in every section can be moved to the bottom of any
    packing by lifting what was below it by its size (with alignment, by its size rounded up).
    """
    lo = min(b.lower for b in problem.buffers)
    hi = max(b.upper for b in problem.buffers)
    bottom: dict[int, int] = {}
    base = 0
    for i, b in enumerate(problem.buffers):
        if b.lifespans == ((lo, hi),) and b.size_bytes > 0:
            align = problem.alignment_of(i)
            base = -(-base // align) * align
            bottom[i] = base
            base += b.size_bytes
    rest = [i for i in range(len(problem.buffers)) if i not in bottom]
    step = math.lcm(*(problem.alignment_of(i) for i in rest)) if rest else 1
    base = -(-base // step) * step  # every partition is shifted by `base`: keep their alignment
    if not rest:
        return base, bottom, []
    sub = Problem(tuple(problem.buffers[i] for i in rest), None, problem.alignment_bytes)
    return base, bottom, [[rest[j] for j in part] for part in partitions(sweep(sub))]


def _combine(
    problem: Problem,
    offsets: tuple[int, ...],
    lb: int,
    base: int,
    sols: list[Solution],
    cap: int | None,
    t0: float,
) -> Solution:
    """One solution from the bottom stack and the partitions' solutions."""
    height = height_of(problem, offsets)
    statuses = {s.status for s in sols}
    nodes = sum(s.nodes for s in sols)
    who = "+".join(sorted({s.solver for s in sols})) or "stack"
    if cap is not None and Status.INFEASIBLE in statuses:
        return Solution(
            offsets, height, Status.INFEASIBLE, max(lb, (cap or 0) + 1), time.perf_counter() - t0, who, nodes
        )
    if cap is not None and (Status.TIMEOUT in statuses or height > cap):
        return Solution(offsets, height, Status.TIMEOUT, lb, time.perf_counter() - t0, who, nodes)
    status = Status.OPTIMAL if height == lb else Status.FEASIBLE
    return Solution(offsets, height, status, lb, time.perf_counter() - t0, who, nodes)


def _solve_part(
    problem: Problem, lb: int, cap: int | None, options: PortfolioOptions, t0: float, deadline: float
) -> Solution:
    """Greedy, then exact search, on a problem that does not decompose further: fit `cap` if given
    (a partition's share of the capacity, or the height another partition already forces), else minimise.

    Fitting a capacity: all greedy orderings, then one exact search with all the time left (a search cut
    short and restarted would redo its work). Minimising: the first greedy ordering; if it misses the
    bound, a first exact search at the bound with `DIVE_SHARE` of the time; then the other orderings; then
    the bisection on heights."""
    target = lb if cap is None else cap
    # fitting: every greedy ordering first (milliseconds), then one search, all the time left
    if cap is not None:
        g = _greedy(problem, options, target, deadline).result
        can_search = options.exact and len(problem.buffers) <= options.exact_max_buffers
        return _fit(
            problem,
            cap,
            lb,
            (g.offsets_bytes, g.height_bytes, f"greedy-{g.ordering}"),
            can_search,
            options,
            t0,
            deadline,
        )
    first = replace(options, greedy_orderings=options.greedy_orderings[:1])
    gr = _greedy(problem, first, target, deadline)
    g = gr.result
    can_search = options.exact and len(problem.buffers) <= options.exact_max_buffers
    if g.height_bytes > target and can_search:
        r = search(problem, target, (deadline - time.perf_counter()) * DIVE_SHARE, options.search)
        if r.outcome is Outcome.FOUND and r.offsets_bytes is not None:
            h = height_of(problem, r.offsets_bytes)
            return Solution(
                r.offsets_bytes,
                h,
                Status.OPTIMAL if h == lb else Status.FEASIBLE,
                lb,
                time.perf_counter() - t0,
                "exact",
                r.nodes,
            )
    if g.height_bytes > target:
        rest = replace(options, greedy_orderings=options.greedy_orderings[1:])
        if rest.greedy_orderings:
            g2 = _greedy(problem, rest, target, deadline, gr.placer)
            gr = g2 if g2.result.height_bytes < g.height_bytes else gr
            g = gr.result
    if g.height_bytes > target and not can_search:  # too large to search: iterate the greedy
        g = squeaky(gr.placer, g, gr.order, target, deadline)
    best = (g.offsets_bytes, g.height_bytes, f"greedy-{g.ordering}")
    return _minimise(problem, lb, best, can_search, options, t0, deadline)


def _fit(
    problem: Problem,
    cap: int,
    lb: int,
    best: tuple[tuple[int, ...], int, str],
    can_search: bool,
    opts: PortfolioOptions,
    t0: float,
    deadline: float,
) -> Solution:
    offsets, height, who = best
    if height <= cap:
        status = Status.OPTIMAL if height == lb else Status.FEASIBLE
        return Solution(offsets, height, status, lb, time.perf_counter() - t0, who)
    if not can_search:
        return Solution(offsets, height, Status.TIMEOUT, lb, time.perf_counter() - t0, who)
    r = search(problem, cap, max(deadline - time.perf_counter(), 0.0), opts.search)
    if r.outcome is Outcome.FOUND and r.offsets_bytes is not None:
        h = max(o + b.size_bytes for o, b in zip(r.offsets_bytes, problem.buffers, strict=True))
        status = Status.OPTIMAL if h == lb else Status.FEASIBLE
        return Solution(r.offsets_bytes, h, status, lb, time.perf_counter() - t0, "exact", r.nodes)
    status = Status.INFEASIBLE if r.outcome is Outcome.INFEASIBLE else Status.TIMEOUT
    bound = cap + 1 if status is Status.INFEASIBLE else lb
    return Solution(offsets, height, status, bound, time.perf_counter() - t0, who, r.nodes)


def _minimise(
    problem: Problem,
    lb: int,
    best: tuple[tuple[int, ...], int, str],
    can_search: bool,
    opts: PortfolioOptions,
    t0: float,
    deadline: float,
) -> Solution:
    """Bisect the height between the proven bound `lo` and the best packing's height."""
    offsets, height, who = best
    lo, nodes = lb, 0
    probe = lb
    while can_search and lo < height and time.perf_counter() < deadline:
        r = search(problem, probe, deadline - time.perf_counter(), opts.search)
        nodes += r.nodes
        if r.outcome is Outcome.TIMEOUT or r.offsets_bytes is None and r.outcome is Outcome.FOUND:
            break
        if r.outcome is Outcome.INFEASIBLE:
            lo = probe + 1
        elif r.offsets_bytes is not None:
            offsets, who = r.offsets_bytes, "exact"
            height = max(o + b.size_bytes for o, b in zip(offsets, problem.buffers, strict=True))
        probe = (lo + height) // 2
    status = Status.OPTIMAL if height == lo else Status.FEASIBLE
    return Solution(offsets, height, status, lo, time.perf_counter() - t0, who, nodes)
