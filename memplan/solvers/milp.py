"""A small facade over HiGHS (through highspy) for mixed-integer linear programs in matrix form.

    minimise    c·x
    subject to  row_lower <= A x <= row_upper
                lower <= x <= upper,  x_j integer where integrality[j]

Every call has a time limit and returns the best solution found with its status, objective, dual bound,
relative gap and time; HiGHS's own status is read directly (PuLP would report "Optimal" at a time limit).
Knows nothing of models or torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import highspy
import numpy as np

INF = highspy.kHighsInf


@dataclass(frozen=True)
class MilpProblem:
    """A MILP in matrix form. `a` is a CSC matrix given as (data, indices, indptr) over columns."""

    c: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    integrality: np.ndarray
    """1 for integer columns, 0 for continuous."""
    a_data: np.ndarray
    a_indices: np.ndarray
    a_indptr: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray


@dataclass(frozen=True, slots=True)
class MilpResult:
    """status: optimal, feasible (stopped at the time limit with an incumbent), infeasible, or timeout (no
    incumbent). `x` is None without an incumbent. `gap` is HiGHS's relative MIP gap."""

    status: str
    x: np.ndarray | None
    objective: float | None
    bound: float | None
    gap: float | None
    time_s: float
    time_limit_s: float


@dataclass
class DenseRows:
    """Constraint rows built one at a time as {column: coefficient} over `width` columns."""

    width: int
    rows: list[np.ndarray] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)

    def add(self, coefs: dict[int, float], lower: float, upper: float) -> None:
        """`lower <= sum(coefs[j] * x_j) <= upper` (repeated columns add up)."""
        a = np.zeros(self.width)
        for j, v in coefs.items():
            a[j] += v
        self.rows.append(a)
        self.lower.append(lower)
        self.upper.append(upper)

    def matrix(self) -> np.ndarray:
        return np.vstack(self.rows) if self.rows else np.zeros((0, self.width))


def dense_problem(
    c: np.ndarray, a: np.ndarray, row_lower: np.ndarray, row_upper: np.ndarray, lower: np.ndarray,
    upper: np.ndarray, integrality: np.ndarray,
) -> MilpProblem:  # fmt: skip
    """A `MilpProblem` from a dense constraint matrix (fine for a few thousand entries)."""
    cols, rows = np.nonzero(a.T)  # sorted by column, then row: CSC order
    return MilpProblem(
        c=c, lower=lower, upper=upper, integrality=integrality, a_data=a[rows, cols], a_indices=rows,
        a_indptr=np.searchsorted(cols, np.arange(len(c) + 1)), row_lower=row_lower, row_upper=row_upper,
    )  # fmt: skip


def solve_milp(
    problem: MilpProblem,
    time_limit_s: float,
    mip_rel_gap: float = 1e-4,
    threads: int = 1,
    start: np.ndarray | None = None,
    mip_abs_gap: float | None = None,
    options: Mapping[str, float] | None = None,
) -> MilpResult:
    """Solve with HiGHS within `time_limit_s` seconds; never hangs, always reports what it found. `start`, a
    feasible point (every column), is handed to HiGHS as its first incumbent (a warm start). `mip_abs_gap`
    replaces HiGHS's absolute gap (1e-6 by default, which swallows objectives that small). `options`: further
    HiGHS options by name (e.g. `primal_feasibility_tolerance`), set last."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    h.setOptionValue("threads", int(threads))
    if mip_abs_gap is not None:
        h.setOptionValue("mip_abs_gap", float(mip_abs_gap))
    for key, value in (options or {}).items():
        h.setOptionValue(key, value)
    lp = highspy.HighsLp()
    n, m = len(problem.c), len(problem.row_lower)
    lp.num_col_, lp.num_row_ = n, m
    lp.col_cost_ = problem.c.astype(np.float64)
    lp.col_lower_ = problem.lower.astype(np.float64)
    lp.col_upper_ = problem.upper.astype(np.float64)
    lp.row_lower_ = problem.row_lower.astype(np.float64)
    lp.row_upper_ = problem.row_upper.astype(np.float64)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = problem.a_indptr.astype(np.int32)
    lp.a_matrix_.index_ = problem.a_indices.astype(np.int32)
    lp.a_matrix_.value_ = problem.a_data.astype(np.float64)
    lp.integrality_ = [
        highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in problem.integrality
    ]
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = np.asarray(start, dtype=np.float64).tolist()
        sol.value_valid = True
        h.setSolution(sol)
    t0 = time.perf_counter()
    h.run()
    elapsed = time.perf_counter() - t0
    return _result(h, elapsed, time_limit_s)


def _result(h: highspy.Highs, elapsed: float, limit: float) -> MilpResult:
    status = h.getModelStatus()
    info = h.getInfo()
    has_x = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = np.array(h.getSolution().col_value) if has_x else None
    obj = float(info.objective_function_value) if has_x else None
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    gap = float(info.mip_gap) if has_x and np.isfinite(info.mip_gap) else None
    if status == highspy.HighsModelStatus.kOptimal:
        name = "optimal"
    elif status == highspy.HighsModelStatus.kInfeasible:
        name = "infeasible"
    else:
        name = "feasible" if has_x else "timeout"
    return MilpResult(name, x, obj, bound, gap, elapsed, limit)
