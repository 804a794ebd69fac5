"""The recomputation solvers of `remat_dag`'s stage model run in sequence, each from the best schedule so far:

    greedy        always (milliseconds); no bound of its own
    regions       graphs of more than `REGION_MIN_NODES` nodes, `REGION_SHARE` of the time limit (twice that
                  where the greedy pass found nothing): the order cut at narrow cuts, each region solved by
                  CP-SAT with its boundary pinned, stitched
    MILP/CP-SAT   the rest of the time, warm-started (MILP) or hinted (CP-SAT) with the best schedule; auto
                  takes the MILP up to `AUTO_MILP_COLUMNS` columns, CP-SAT above

The result is the cheapest schedule any of them found, with the best bound any of them proved (each is a
lower bound on the same optimum), judged by `remat_dag.judge`: optimal only where the objective is within
half a cost unit of the bound. Status infeasible where an exact model proved that no schedule exists;
skipped where the MILP was asked for and the graph is too large for it (with the best start's schedule, if
any); timeout where everything ran and nothing was found.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from memplan.errors import InternalError
from memplan.solvers.remat_dag import (
    RematProblem,
    RematResult,
    Status,
    best_greedy,
    check_budget,
    cost_scale,
    judge,
)

Method = Literal["auto", "milp", "cpsat", "greedy", "regions"]
METHODS: tuple[Method, ...] = ("auto", "milp", "cpsat", "greedy", "regions")

AUTO_MILP_COLUMNS = 20_000
"""`auto` runs the MILP up to this many columns (chain-32's 65 nodes have 11.7k: proven optimal in seconds)
and CP-SAT above (gpt2-tiny's 188 nodes have 94k: HiGHS finds nothing better than its start in 50 s)."""
REGION_MIN_NODES = 48
"""Graphs longer than this get the region decomposition before the MILP or CP-SAT (shorter ones are one
region: the MILP or CP-SAT alone does at least as well)."""
REGION_SHARE = 0.4
"""Fraction of the time limit the decomposition may take when a solver runs after it."""


def solve(
    problem: RematProblem,
    budget: int,
    time_limit_s: float = 60.0,
    method: Method = "auto",
    mip_rel_gap: float = 0.0,
) -> RematResult:
    """Best schedule within `budget` bytes in about `time_limit_s` seconds (module docstring): `greedy` or
    `regions` alone, or up to them and then `milp`, `cpsat` or the one `auto` picks."""
    from memplan.solvers.checkmate_cpsat import solve_cpsat
    from memplan.solvers.checkmate_milp import milp_columns, solve_checkmate
    from memplan.solvers.remat_regions import solve_regions

    if method not in METHODS:
        raise InternalError(f"solve: unknown method {method!r}")
    check_budget(problem, budget)
    t0 = time.perf_counter()
    runs = [_greedy(problem, budget, t0)]
    if method == "regions" or (method != "greedy" and problem.n > REGION_MIN_NODES):
        share = REGION_SHARE * (1 if runs[0].schedule is not None else 2) * time_limit_s
        share = time_limit_s if method == "regions" else share
        runs.append(solve_regions(problem, budget, share))
    if method in ("greedy", "regions"):
        return _merge(problem, runs, time.perf_counter() - t0)
    if method == "auto":
        method = "milp" if milp_columns(problem) <= AUTO_MILP_COLUMNS else "cpsat"
    start = _best(runs).schedule
    left = max(time_limit_s - (time.perf_counter() - t0), 1.0)
    if method == "milp":
        runs.append(solve_checkmate(problem, budget, left, mip_rel_gap, start=start))
    else:
        runs.append(solve_cpsat(problem, budget, left, hint=start))
    return _merge(problem, runs, time.perf_counter() - t0)


def _greedy(problem: RematProblem, budget: int, t0: float) -> RematResult:
    scale = cost_scale(problem)
    trivial = math.fsum(problem.cost)
    sched = best_greedy(problem, budget)
    elapsed = time.perf_counter() - t0
    if sched is None:
        return RematResult("timeout", None, None, trivial, None, elapsed, "greedy", scale.tolerance)
    obj = sched.cost(problem)
    status, gap = judge(obj, trivial, scale)
    return RematResult(status, sched, obj, trivial, gap, elapsed, "greedy", scale.tolerance)


def _best(runs: list[RematResult]) -> RematResult:
    """The run with the cheapest schedule (the first, on ties), or the last run if none has one."""
    found = [r for r in runs if r.objective is not None]
    return min(found, key=lambda r: r.objective or 0.0) if found else runs[-1]


def _merge(problem: RematProblem, runs: list[RematResult], elapsed: float) -> RematResult:
    """The cheapest schedule of the runs, the best bound of the runs, judged again (module docstring)."""
    scale = cost_scale(problem)
    bound = max(r.bound for r in runs)
    last = runs[-1]
    names = " + ".join(r.solver for r in runs)
    pick = _best(runs)
    if last.status == "infeasible" and pick.objective is None:  # a checked schedule outweighs the claim
        return RematResult("infeasible", None, None, bound, None, elapsed, names, scale.tolerance)
    label = names if len(runs) == 1 else f"{pick.solver} (of {names})"
    if pick.objective is None:
        status: Status = "skipped" if last.status == "skipped" else "timeout"
        return RematResult(status, None, None, bound, None, elapsed, label, scale.tolerance)
    bound = min(bound, pick.objective)  # a checked schedule's cost bounds the optimum from above
    status, gap = judge(pick.objective, bound, scale)
    if last.status == "skipped":
        status = "skipped"
    return RematResult(status, pick.schedule, pick.objective, bound, gap, elapsed, label, scale.tolerance)
