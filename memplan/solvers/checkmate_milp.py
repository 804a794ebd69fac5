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

with m_i = size_i / budget, minimising sum_t sum_i cost_i R[t,i] (costs divided by their sum for the solver's
numerics, multiplied back in the result). F is exactly the eager free of the stage model, so U is the
checker's resident bytes except for checkpoints a stage neither uses nor keeps, which U still counts (a
schedule never needs them, so the optimum is the same). U's upper bound is (budget + 1/2) / budget, so that
integer byte sums equal to the budget pass HiGHS's tolerances; the decoded schedule is checked in bytes.
"""

from __future__ import annotations

import time

import numpy as np

from memplan.solvers.milp import MilpProblem, MilpResult, solve_milp
from memplan.solvers.remat_dag import RematProblem, RematResult, Schedule, Status, check, events

MAX_COLUMNS = 150_000
"""Above this many columns HiGHS overruns its time limit (measured: 300k columns, a 50 s limit, 304 s), so the
MILP is not attempted; gpt2-tiny's training step (188 nodes) has 94k."""


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


def formulate(problem: RematProblem, budget: int) -> tuple[MilpProblem, _Index]:
    """The MILP in matrix form (see module docstring)."""
    ix = _Index(problem)
    m = [s / budget for s in problem.size]
    users = problem.users()
    for t in range(problem.n):
        _stage_rows(problem, ix, t, m, users)
    c = np.zeros(ix.cols)
    total = sum(problem.cost) or 1.0
    for t in range(ix.n):
        for i in range(t + 1):
            c[ix.r(t, i)] = problem.cost[i] / total
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
    mip_rel_gap: float = 1e-4,
    max_columns: int = MAX_COLUMNS,
    start: Schedule | None = None,
) -> RematResult:
    """Solve the MILP with HiGHS, warm-started from `start` (a schedule, e.g. the greedy one) when it is a
    point of the MILP; the schedule is decoded and checked in bytes against the budget (a schedule that fails
    the check, from numerical tolerance, is reported as no schedule). Above `max_columns` columns the MILP is
    not attempted (status timeout, the solver name says why)."""
    t0 = time.perf_counter()
    cols = milp_columns(problem)
    if cols > max_columns:
        return RematResult(
            "timeout",
            None,
            None,
            float(sum(problem.cost)),
            None,
            time.perf_counter() - t0,
            f"checkmate-milp (skipped: {cols} columns > {max_columns})",
        )
    milp, ix = formulate(problem, budget)
    x0 = start_vector(problem, budget, milp, ix, start) if start is not None else None
    left = max(time_limit_s - (time.perf_counter() - t0), 0.5)
    res = solve_milp(milp, left, mip_rel_gap=mip_rel_gap, start=x0)
    return _result(problem, budget, ix, res, time.perf_counter() - t0)


def _result(problem: RematProblem, budget: int, ix: _Index, res: MilpResult, elapsed: float) -> RematResult:
    total = sum(problem.cost) or 1.0
    bound = max(float(sum(problem.cost)), (res.bound or 0.0) * total)
    if res.status == "infeasible":
        return RematResult("infeasible", None, None, bound, None, elapsed, "checkmate-milp")
    if res.x is None:
        return RematResult("timeout", None, None, bound, None, elapsed, "checkmate-milp")
    sched = decode(problem, ix, res.x)
    report = check(problem, events(problem, sched), budget)
    if not report.ok:
        return RematResult("timeout", None, None, bound, None, elapsed, "checkmate-milp")
    obj = report.cost
    gap = max(obj - bound, 0.0) / obj if obj > 0 else 0.0
    status: Status = "optimal" if res.status == "optimal" else "feasible"
    return RematResult(status, sched, obj, bound, gap, elapsed, "checkmate-milp")
