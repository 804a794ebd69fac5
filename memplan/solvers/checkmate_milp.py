"""The Checkmate MILP (Jain et al., MLSys 2020, section 4) for the stage model of `remat_dag`, over HiGHS.

Variables, for stages t and nodes i <= t (lower-triangular, n(n+1)/2 of each):

    R[t,i]  binary   node i is computed in stage t; R[t,t] = 1 (each stage advances the frontier)
    S[t,i]  binary   node i is resident when stage t starts (i < t)
    U[t,k]  in [0,1] resident bytes / budget right after stage t computes (or skips) node k
    F[t,i,k] binary  node i is freed right after node k in stage t, for i in preds(k) | {k}

Constraints:

    R[t,j] <= R[t,i] + S[t,i]              for every edge i -> j, j <= t     (inputs resident)
    S[t+1,i] <= R[t,i] + S[t,i]                                             (keep only what exists)
    U[t,0] = sum_i m_i S[t,i] + m_0 R[t,0]
    U[t,k] = U[t,k-1] - sum_{i in preds(k-1)|{k-1}} m_i F[t,i,k-1] + m_k R[t,k]
    F[t,i,k] = R[t,k] * (1 - S[t+1,i]) * prod_{j reads i, k < j <= t} (1 - R[t,j]),  linearised with the
               hazard count h = (1 - R[t,k]) + S[t+1,i] + sum_j R[t,j] as  1 - F <= h  and  kappa (1 - F) >= h

with m_i = size_i / budget, minimising sum_t sum_i (cost_i / unit) R[t,i], with `unit` the cost resolution of
`remat_dag.cost_scale` (the costs' gcd, or their sum / 1e8): HiGHS runs with a relative gap of 0, an absolute
gap of half a unit and feasibility tolerances of 1e-9, so neither its gap nor its tolerances can hide a
difference of one unit (dividing by the sum of costs, as before, let a 1e-6 absolute gap swallow 1e7 of a 1e13
objective). The reported objective is the decoded schedule's cost summed from the original costs; the
status is judged by `remat_dag.judge`, never taken from HiGHS.

F is exactly the eager free of the stage model, so U is the checker's resident bytes except for checkpoints a
stage neither uses nor keeps, which U still counts (a schedule never needs them, so the optimum is the same).
U's upper bound is (budget + 1/2) / budget, so that integer byte sums equal to the budget pass HiGHS's
tolerances; the decoded schedule is checked in bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from memplan.solvers.milp import MilpProblem, MilpResult, solve_milp
from memplan.solvers.remat_dag import (
    CostScale,
    RematProblem,
    RematResult,
    Schedule,
    check,
    cost_scale,
    events,
    judge,
)

MAX_COLUMNS = 150_000
"""Above this many columns HiGHS overruns its time limit (measured: 300k columns, a 50 s limit, 304 s), so the
MILP is not attempted; gpt2-tiny's training step (188 nodes) has 94k."""
LP_COLUMNS_PER_S = 15_000
"""`lp_bound` is tried only where its time limit allows building and solving this many columns a second (a
250-node layered graph's 187k columns: about 12 s)."""
HIGHS_OPTIONS = {"primal_feasibility_tolerance": 1e-9, "mip_feasibility_tolerance": 1e-9}
"""Tight enough that a fractional R or a violated row shifts the objective by far less than a cost unit."""
ABS_GAP_UNITS = 0.5
"""HiGHS's absolute gap, in cost units: below one unit, so HiGHS stops only where no better total exists."""


class _Index:
    """Column numbers of R, S, U and F, and the rows as (row, column, value) triplets with their bounds."""

    def __init__(self, problem: RematProblem) -> None:
        n = problem.n
        self.n = n
        tri = n * (n + 1) // 2
        self.s0, self.u0 = tri, tri + n * (n - 1) // 2
        self.f0 = self.u0 + tri
        self.free: dict[tuple[int, int, int], int] = {}
        for t in range(n):
            for k in range(t + 1):
                for i in sorted({*problem.preds[k], k}):
                    self.free[(t, i, k)] = self.f0 + len(self.free)
        self.cols = self.f0 + len(self.free)
        self.rows: list[int] = []
        self.colidx: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def r(self, t: int, i: int) -> int:
        return t * (t + 1) // 2 + i

    def s(self, t: int, i: int) -> int:
        return self.s0 + t * (t - 1) // 2 + i

    def u(self, t: int, k: int) -> int:
        return self.u0 + t * (t + 1) // 2 + k

    def row(self, terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(self.lo)
        for col, val in terms:
            self.rows.append(r)
            self.colidx.append(col)
            self.vals.append(val)
        self.lo.append(lo)
        self.hi.append(hi)


def formulate(
    problem: RematProblem, budget: int, scale: CostScale | None = None
) -> tuple[MilpProblem, _Index]:
    """The MILP in matrix form (module docstring), its costs in units of `scale` (default: the problem's)."""
    ix = _Index(problem)
    m = [s / budget for s in problem.size]
    users = problem.users()
    for t in range(problem.n):
        _stage_rows(problem, ix, t, m, users)
    c = np.zeros(ix.cols)
    unit = (scale or cost_scale(problem)).unit
    for t in range(ix.n):
        for i in range(t + 1):
            c[ix.r(t, i)] = problem.cost[i] / unit
    lower, upper = np.zeros(ix.cols), np.ones(ix.cols)
    for t in range(ix.n):
        lower[ix.r(t, t)] = 1.0
        upper[ix.u(t, 0) : ix.u(t, t) + 1] = (budget + 0.5) / budget
    integrality = np.ones(ix.cols, dtype=np.int8)
    integrality[ix.u0 : ix.f0] = 0
    rows, cols, vals = (np.array(a) for a in (ix.rows, ix.colidx, ix.vals))
    order = np.lexsort((rows, cols))
    indptr = np.searchsorted(cols[order], np.arange(ix.cols + 1))
    return MilpProblem(
        c,
        lower,
        upper,
        integrality,
        vals[order].astype(np.float64),
        rows[order],
        indptr,
        np.array(ix.lo),
        np.array(ix.hi),
    ), ix


def _stage_rows(problem: RematProblem, ix: _Index, t: int, m: list[float], users: list[list[int]]) -> None:
    inf = np.inf
    for j in range(t + 1):
        for i in set(problem.preds[j]):
            ix.row([(ix.r(t, j), 1.0), (ix.r(t, i), -1.0), (ix.s(t, i), -1.0)], -inf, 0.0)
    if t + 1 < ix.n:
        for i in range(t + 1):
            terms = [(ix.s(t + 1, i), 1.0), (ix.r(t, i), -1.0)] + ([(ix.s(t, i), -1.0)] if i < t else [])
            ix.row(terms, -inf, 0.0)
    ix.row([(ix.u(t, 0), 1.0), (ix.r(t, 0), -m[0])] + [(ix.s(t, i), -m[i]) for i in range(t)], 0.0, 0.0)
    for k in range(1, t + 1):
        freed = [(ix.free[(t, i, k - 1)], m[i]) for i in sorted({*problem.preds[k - 1], k - 1})]
        ix.row([(ix.u(t, k), 1.0), (ix.u(t, k - 1), -1.0), (ix.r(t, k), -m[k]), *freed], 0.0, 0.0)
    for k in range(t + 1):
        for i in sorted({*problem.preds[k], k}):
            _free_rows(ix, t, i, k, [j for j in users[i] if k < j <= t])


def _free_rows(ix: _Index, t: int, i: int, k: int, later: list[int]) -> None:
    """1 - F <= h and kappa (1 - F) >= h, with h the hazard count of freeing i after k in stage t."""
    f = ix.free[(t, i, k)]
    hazards = [(ix.r(t, j), 1.0) for j in later] + ([(ix.s(t + 1, i), 1.0)] if t + 1 < ix.n else [])
    kappa = 1.0 + len(hazards)
    ix.row([(f, -1.0), (ix.r(t, k), 1.0)] + [(col, -v) for col, v in hazards], -np.inf, 0.0)
    ix.row([(f, kappa), (ix.r(t, k), -1.0), *hazards], -np.inf, kappa - 1.0)


def milp_columns(problem: RematProblem) -> int:
    """Columns of the formulation (R, S, U, F), without building it."""
    n = problem.n
    free = sum((n - k) * len({*ps, k}) for k, ps in enumerate(problem.preds))
    return n * (n + 1) + n * (n - 1) // 2 + free


def decode(problem: RematProblem, ix: _Index, x: np.ndarray) -> Schedule:
    """R and S of a MILP solution as a schedule."""
    compute = tuple(tuple(i for i in range(t + 1) if x[ix.r(t, i)] > 0.5) for t in range(problem.n))
    keep = tuple(frozenset(i for i in range(t) if x[ix.s(t, i)] > 0.5) for t in range(problem.n))
    return Schedule(compute, keep)


def start_vector(
    problem: RematProblem, budget: int, milp: MilpProblem, ix: _Index, schedule: Schedule
) -> np.ndarray | None:
    """A schedule as a point of the MILP (R and S from it, F and U derived), for a warm start; None unless
    the point satisfies every bound and row. Checkpoints a stage neither uses nor keeps are dropped first:
    the checker frees them at once, but U counts them."""
    n = problem.n
    used = [{i for k in stage for i in problem.preds[k]} for stage in schedule.compute]
    keep: list[frozenset[int]] = [frozenset()] * n
    for t in reversed(range(n)):
        nxt = keep[t + 1] if t + 1 < n else frozenset()
        keep[t] = frozenset(i for i in schedule.keep[t] if i in used[t] or i in nxt)
    x = np.zeros(ix.cols)
    m = [sz / budget for sz in problem.size]
    for t, stage in enumerate(schedule.compute):
        nxt = keep[t + 1] if t + 1 < n else frozenset()
        for i in stage:
            x[ix.r(t, i)] = 1.0
        for i in keep[t]:
            x[ix.s(t, i)] = 1.0
        live = sum(m[i] for i in keep[t])
        last_use = {i: k for k in stage for i in problem.preds[k]}
        for k in range(t + 1):
            if k in stage:
                live += m[k]
            x[ix.u(t, k)] = live
            for i in sorted({*problem.preds[k], k}):
                if k in stage and last_use.get(i, k) <= k and i not in nxt:
                    x[ix.free[(t, i, k)]] = 1.0
                    live -= m[i]
    ax, tol = np.zeros(len(milp.row_lower)), 1e-9
    np.add.at(ax, milp.a_indices, milp.a_data * np.repeat(x, np.diff(milp.a_indptr)))
    ok = (
        np.all(x >= milp.lower - tol)
        and np.all(x <= milp.upper + tol)
        and np.all(ax >= milp.row_lower - tol)
        and np.all(ax <= milp.row_upper + tol)
    )
    return x if ok else None


def solve_checkmate(
    problem: RematProblem,
    budget: int,
    time_limit_s: float,
    mip_rel_gap: float = 0.0,
    max_columns: int | None = None,
    start: Schedule | None = None,
) -> RematResult:
    """Solve the MILP with HiGHS, warm-started from `start` (a schedule, e.g. the greedy one) when it is a
    point of the MILP; the schedule is decoded and checked in bytes against the budget (a schedule that fails
    the check, from numerical tolerance, is reported as no schedule). Above `max_columns` columns the MILP is
    not attempted (default `MAX_COLUMNS`): status skipped, the solver name says why."""
    t0 = time.perf_counter()
    scale = cost_scale(problem)
    cols = milp_columns(problem)
    max_columns = MAX_COLUMNS if max_columns is None else max_columns
    if cols > max_columns:
        name = f"checkmate-milp (skipped: {cols} columns > {max_columns})"
        return RematResult("skipped", None, None, _trivial(problem), None, 0.0, name, scale.tolerance)
    milp, ix = formulate(problem, budget, scale)
    x0 = start_vector(problem, budget, milp, ix, start) if start is not None else None
    left = max(time_limit_s - (time.perf_counter() - t0), 0.5)
    res = run_highs(milp, left, mip_rel_gap, x0)
    sched = decoded(problem, budget, ix, res)
    return result_of(problem, scale, res, sched, time.perf_counter() - t0, "checkmate-milp")


def run_highs(
    milp: MilpProblem, time_limit_s: float, mip_rel_gap: float, x0: np.ndarray | None
) -> MilpResult:
    """HiGHS on the formulation, with the gap and tolerances of the module docstring."""
    return solve_milp(
        milp,
        time_limit_s,
        mip_rel_gap=mip_rel_gap,
        start=x0,
        mip_abs_gap=ABS_GAP_UNITS,
        options=HIGHS_OPTIONS,
    )


def decoded(problem: RematProblem, budget: int, ix: _Index, res: MilpResult) -> Schedule | None:
    """HiGHS's incumbent as a schedule, if it has one and it passes the checker in bytes."""
    if res.x is None:
        return None
    sched = decode(problem, ix, res.x)
    return sched if check(problem, events(problem, sched), budget).ok else None


def result_of(
    problem: RematProblem,
    scale: CostScale,
    res: MilpResult,
    sched: Schedule | None,
    elapsed: float,
    name: str,
) -> RematResult:
    """A HiGHS run as a `RematResult`: its dual bound (in units, rounded up to the grid where exact) and the
    checked schedule's own cost, judged by `remat_dag.judge`."""
    bound = max(_trivial(problem), scale.round_bound((res.bound or 0.0) * scale.unit))
    if res.status == "infeasible":
        return RematResult("infeasible", None, None, bound, None, elapsed, name, scale.tolerance)
    if sched is None:
        return RematResult("timeout", None, None, bound, None, elapsed, name, scale.tolerance)
    obj = sched.cost(problem)
    bound = min(bound, obj)  # a schedule's cost is an upper bound: a dual bound above it is float rounding
    status, gap = judge(obj, bound, scale)
    return RematResult(status, sched, obj, bound, gap, elapsed, name, scale.tolerance)


def lp_bound(problem: RematProblem, budget: int, time_limit_s: float) -> float | None:
    """The optimum of the MILP's LP relaxation: a lower bound on every schedule's total compute, in the
    problem's cost units; infinity where the relaxation is infeasible (then no schedule exists). None where
    the formulation is too large for `time_limit_s` (`LP_COLUMNS_PER_S`) or HiGHS does not finish in time."""
    t0 = time.perf_counter()
    if milp_columns(problem) > LP_COLUMNS_PER_S * time_limit_s:
        return None
    scale = cost_scale(problem)
    milp, _ = formulate(problem, budget, scale)
    relaxed = dataclasses.replace(milp, integrality=np.zeros_like(milp.integrality))
    left = time_limit_s - (time.perf_counter() - t0)
    if left <= 0.05:
        return None
    res = solve_milp(relaxed, left, mip_rel_gap=0.0, options=HIGHS_OPTIONS)
    if res.status == "infeasible":
        return math.inf
    if res.status != "optimal" or res.objective is None:
        return None
    return max(_trivial(problem), (res.objective - 1e-6) * scale.unit)


def _trivial(problem: RematProblem) -> float:
    return math.fsum(problem.cost)
