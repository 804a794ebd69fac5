"""Moccasin's CP-SAT formulation (Bartan et al., ICML 2023) of pure recomputation, laid on the stage model of
`remat_dag` so that its solutions decode exactly into stage-model schedules.

Time is the sequence of compute positions pos(t, v) = t*n + v: stage t computes its nodes in index order, so
a copy's position names both its stage (pos // n) and its node (pos % n). Node v has up to C_v copies:

    copy 0       mandatory, start v*n + v (the first computation, in v's own stage)
    copy c >= 1  optional (present literal a[v,c]), start s[v,c] in {t*n + v : v + c <= t < n}
    each copy    end e[v,c] >= start: its output stays resident over [start, e] (an optional interval)

Constraints:

    a[v,c] => a[v,c-1]  and  e[v,c-1] + v < s[v,c]     copies are ordered, and a copy ends before the stage
                                                        of the next one begins (a stage computes v once)
    for every edge u -> v and present copy (v,i):     some copy (u,j) serves it: z => a[u,j],
        sum_j z[u,j,v,i] >= a[v,i]                    s[u,j] < s[v,i] <= e[u,j]
    Cumulative(intervals [s, e + 1), demand size_v, capacity budget)

minimising the costs of the optional copies (plus the constant sum of all costs). Decoding: stage t computes
the nodes with a copy at stage t, and keeps into stage t+1 the nodes with a copy started by stage t that ends
at stage t+1 or later. The stage model frees eagerly, so every output the checker holds at a compute is
inside an interval that contains that position: the decoded schedule's bytes never exceed the model's. Every
decoded schedule is replayed by `remat_dag.check` in bytes and reported only if it passes.

Exactness and the bound. With C_v = n - v (a copy per stage where v may run) every stage-model schedule that
does not recompute a resident node (recomputing a resident node only adds cost) is a solution of the model,
so CP-SAT's optimum and its best bound are the stage model's. With fewer copies (Moccasin's usual C = 2) the
model is a restriction: its optimum may be above the true one and its bound is NOT a lower bound for the
unrestricted problem, and an infeasible model means only "none with C copies" (status timeout). The bound
reported is the larger of the LP relaxation of the Checkmate MILP (`checkmate_milp.lp_bound`, solved first
with HiGHS in at most `LP_SHARE` of the time, where the formulation is small enough for that), the
sum of all costs, and, from the exact model only, CP-SAT's own bound; an infeasible LP relaxation proves
that no schedule exists (status infeasible, CP-SAT not run). The objective weights are the costs in
units of `remat_dag.cost_scale`, rounded down (exact where the costs are multiples of the unit), so CP-SAT's
bound on the weights is a bound on the costs. `copies=None` builds the exact model while it stays small
(`EXACT_SERVE_LIMIT`) and C = 2 otherwise, raised per node to what the hint needs, so that the hint (a
schedule: the best one found before, converted to intervals) is a complete feasible solution: CP-SAT starts
from it, and it is kept if CP-SAT returns nothing better in time. The status is `remat_dag.judge`'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model
from ortools.util.python.sorted_interval_list import Domain

from memplan.errors import InternalError
from memplan.solvers.checkmate_milp import lp_bound
from memplan.solvers.remat_dag import (
    RematProblem,
    RematResult,
    Schedule,
    Status,
    check,
    cost_scale,
    events,
    judge,
)

DEFAULT_COPIES = 2
"""Copies per node when the exact model is too large (Moccasin's usual setting: one recomputation)."""
EXACT_SERVE_LIMIT = 10_000
"""Most serve literals z for which `copies=None` builds the exact model (a copy per stage): unet-5 (23 nodes)
has 8.4k (proven optimal in about 8 s), chain-16 (33 nodes) 17.6k (CP-SAT's presolve alone takes 7 s)."""
MAX_WORKERS = 2
LP_SHARE = 0.3
"""Most of the time limit the LP relaxation's bound may take (a 250-node layered graph: about 12 s)."""

Interval = tuple[int, int]
"""A copy as (start position, end position), both inclusive."""
Serving = dict[tuple[int, int, int], int]
"""(reader, reader's copy, input) -> the input's copy that serves it."""


@dataclass(frozen=True, slots=True)
class _Copy:
    node: int
    index: int
    present: cp_model.IntVar | int
    start: cp_model.IntVar | int
    end: cp_model.IntVar
    size: cp_model.IntVar | None
    """None for copy 0, whose size is an affine expression of its end."""


@dataclass(frozen=True)
class _Model:
    """The CP-SAT model with its variables: copies[v][c], serve[(v, i, u)] = [(j, z)]."""

    model: cp_model.CpModel
    copies: list[list[_Copy]]
    serve: dict[tuple[int, int, int], list[tuple[int, cp_model.IntVar]]]
    exact_weights: bool
    """The objective weights are the costs in cost units exactly (else rounded down)."""
    exact_copies: bool
    """Every node has a copy per stage it may run in: the model is the stage model (module docstring)."""


def hint_intervals(problem: RematProblem, schedule: Schedule) -> tuple[list[list[Interval]], Serving] | None:
    """A stage-model schedule as copies per node (start; end = its last served use) and their serving map;
    None if the schedule recomputes a resident node or reads one that is not resident."""
    n = problem.n
    copies: list[list[list[int]]] = [[] for _ in range(n)]
    serving: Serving = {}
    live: dict[int, int] = {}
    for t, stage in enumerate(schedule.compute):
        keep = schedule.keep[t]
        if any(v not in live for v in keep) or keep & set(stage):
            return None
        live = {v: live[v] for v in keep}
        for k in stage:
            for u in set(problem.preds[k]):
                if u not in live:
                    return None
                copies[u][live[u]][1] = t * n + k
                serving[(k, len(copies[k]), u)] = live[u]
            copies[k].append([t * n + k, t * n + k])
            live[k] = len(copies[k]) - 1
    return [[(s, e) for s, e in cs] for cs in copies], serving


def exact_counts(problem: RematProblem) -> list[int]:
    """Copies per node of the exact model: one per stage v may run in, one for nodes nothing reads."""
    users = problem.users()
    return [problem.n - v if users[v] else 1 for v in range(problem.n)]


def serve_literals(problem: RematProblem, ncopies: list[int]) -> int:
    """How many serve literals z the model with `ncopies` copies per node has (its size, before building)."""
    total = 0
    for v, ps in enumerate(problem.preds):
        for u in set(ps):
            for i in range(ncopies[v]):
                top = v if i == 0 else problem.n - 1
                total += max(0, min(ncopies[u], top - u + 1))
    return total


def copy_counts(problem: RematProblem, copies: int | None, hint: list[list[Interval]] | None) -> list[int]:
    """Copies per node: the exact model's for `copies=None` while it is small (`EXACT_SERVE_LIMIT`), else
    `copies` (default 2) raised to what the hint uses, never above the exact model's."""
    exact = exact_counts(problem)
    if copies is None and serve_literals(problem, exact) <= EXACT_SERVE_LIMIT:
        return exact
    want = DEFAULT_COPIES if copies is None else copies
    if want < 1:
        raise InternalError(f"checkmate_cpsat: copies must be at least 1, not {want}")
    used = [len(h) for h in hint] if hint is not None else [1] * problem.n
    return [min(e, max(want, u)) for e, u in zip(exact, used, strict=True)]


def _weights(problem: RematProblem) -> tuple[list[int], bool]:
    """Integer objective weights: the costs in cost units, rounded down; exact where the unit divides them."""
    scale = cost_scale(problem)
    return [math.floor(c / scale.unit) for c in problem.cost], scale.exact


def build(problem: RematProblem, budget: int, ncopies: list[int], stop: int | None = None) -> _Model:
    """The CP-SAT model of the module docstring for `ncopies[v]` copies of each node v; optional copies run
    only in stages before `stop` (default: every stage; `ncopies[v] <= stop - v` where v has copies)."""
    n = problem.n
    users = problem.users()
    m = cp_model.CpModel()
    last = [(n - 1) * n + users[v][-1] if users[v] else v * n + v for v in range(n)]
    copies = [_copies(m, n, v, ncopies[v], last[v], n if stop is None else stop) for v in range(n)]
    serve: dict[tuple[int, int, int], list[tuple[int, cp_model.IntVar]]] = {}
    for v, ps in enumerate(problem.preds):
        for u in sorted(set(ps)):
            for i, cv in enumerate(copies[v]):
                serve[(v, i, u)] = _serve(m, cv, copies[u], v if i == 0 else n - 1)
    intervals, demands = [], []
    for row in copies:
        for cp in row:
            name = f"i{cp.node}_{cp.index}"
            if cp.size is None:
                assert isinstance(cp.start, int)
                iv = m.new_interval_var(cp.start, cp.end + (1 - cp.start), cp.end + 1, name)
            else:
                iv = m.new_optional_interval_var(cp.start, cp.size, cp.end + 1, cp.present, name)
            intervals.append(iv)
            demands.append(problem.size[cp.node])
    m.add_cumulative(intervals, demands, budget)
    weights, exact_w = _weights(problem)
    m.minimize(sum(weights[cp.node] * cp.present for row in copies for cp in row[1:]))
    return _Model(m, copies, serve, exact_w, ncopies == exact_counts(problem))


def _copies(m: cp_model.CpModel, n: int, v: int, count: int, last: int, stop: int) -> list[_Copy]:
    """Node v's copies: copy 0 at v's own stage, then optional ones in stages before `stop`, ordered, each
    ending before the next one's stage; an absent copy sits at its lowest position (no symmetric twins)."""
    first = v * n + v
    row = [_Copy(v, 0, 1, first, m.new_int_var(first, max(first, last), f"e{v}_0"), None)]
    for c in range(1, count):
        stages = range(v + c, stop)
        if not stages:
            raise InternalError(f"checkmate_cpsat: node {v} has {count} copies, only stages before {stop}")
        lo = stages[0] * n + v
        a = m.new_bool_var(f"a{v}_{c}")
        s = m.new_int_var_from_domain(Domain.from_values([t * n + v for t in stages]), f"s{v}_{c}")
        e = m.new_int_var(lo, max(lo, last), f"e{v}_{c}")
        size = m.new_int_var(1, max(1, last - lo + 1), f"d{v}_{c}")
        prev = row[-1]
        if c > 1:
            m.add_implication(a, prev.present)
        m.add(prev.end + v < s).only_enforce_if(a)
        m.add(s == lo).only_enforce_if(~a)
        m.add(e == lo).only_enforce_if(~a)
        row.append(_Copy(v, c, a, s, e, size))
    return row


def _serve(
    m: cp_model.CpModel, reader: _Copy, inputs: list[_Copy], top_stage: int
) -> list[tuple[int, cp_model.IntVar]]:
    """Literals z_j: copy j of the input serves `reader` (present, started before it, ends at or after it);
    copy j runs at stage u + j or later, so only those up to the reader's latest stage can."""
    u = inputs[0].node
    out: list[tuple[int, cp_model.IntVar]] = []
    for j, cu in enumerate(inputs[: max(0, top_stage - u + 1)]):
        z = m.new_bool_var(f"z{u}_{j}_{reader.node}_{reader.index}")
        if j > 0:  # copy 0 runs at stage u, before any copy of a reader
            m.add_implication(z, cu.present)
            m.add(cu.start < reader.start).only_enforce_if(z)
        m.add(cu.end >= reader.start).only_enforce_if(z)
        out.append((j, z))
    m.add(sum(z for _, z in out) >= reader.present)
    return out


def add_hint(mm: _Model, intervals: list[list[Interval]], serving: Serving) -> None:
    """Every variable hinted from a converted schedule (absent copies at their lowest position)."""
    m = mm.model
    for v, row in enumerate(mm.copies):
        for cp in row:
            present = cp.index < len(intervals[v])
            s, e = intervals[v][cp.index] if present else (cp.end.proto.domain[0],) * 2
            m.add_hint(cp.end, e)
            if cp.size is not None:
                assert not isinstance(cp.present, int) and not isinstance(cp.start, int)
                m.add_hint(cp.present, int(present))
                m.add_hint(cp.start, s)
                m.add_hint(cp.size, e - s + 1)
    for (v, i, u), zs in mm.serve.items():
        want = serving.get((v, i, u), -1)
        for j, z in zs:
            m.add_hint(z, int(j == want))


def decode(problem: RematProblem, mm: _Model, solver: cp_model.CpSolver) -> Schedule:
    """The stage-model schedule of a solution: stage t computes the copies at stage t, in index order, and
    keeps into t+1 what a copy started by stage t still holds at stage t+1."""
    n = problem.n
    compute: list[list[int]] = [[] for _ in range(n)]
    keep: list[set[int]] = [set() for _ in range(n)]
    for row in mm.copies:
        for cp in row:
            if solver.value(cp.present):
                start, end = int(solver.value(cp.start)), int(solver.value(cp.end))
                compute[start // n].append(cp.node)
                for t in range(start // n + 1, end // n + 1):
                    keep[t].add(cp.node)
    return Schedule(tuple(tuple(sorted(c)) for c in compute), tuple(frozenset(k) for k in keep))


def schedule_with(
    problem: RematProblem, budget: int, ncopies: list[int], stop: int, time_limit_s: float
) -> Schedule | None:
    """CP-SAT's best schedule in `time_limit_s` seconds on the model with `ncopies[v]` copies of each node v,
    optional copies only in stages before `stop` (a restriction, for `remat_regions`); None if it finds none
    or the decoded schedule fails the checker in bytes."""
    mm = build(problem, budget, ncopies, stop)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit_s, 0.05)
    solver.parameters.num_workers = MAX_WORKERS
    if solver.solve(mm.model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    sched = decode(problem, mm, solver)
    return sched if check(problem, events(problem, sched), budget).ok else None


def solve_cpsat(
    problem: RematProblem,
    budget: int,
    time_limit_s: float,
    copies: int | None = None,
    hint: Schedule | None = None,
    workers: int = MAX_WORKERS,
) -> RematResult:
    """Solve the CP-SAT model within `time_limit_s` seconds (building and the LP bound included),
    warm-started from `hint`; the decoded schedule is checked in bytes and reported only if valid. Bound and
    status: see the module docstring."""
    t0 = time.perf_counter()
    lp = lp_bound(problem, budget, LP_SHARE * time_limit_s)
    if lp == math.inf:  # the LP relaxation is infeasible, so is every schedule
        name = "moccasin-cpsat (LP relaxation infeasible)"
        scale = cost_scale(problem)
        elapsed = time.perf_counter() - t0
        return RematResult(
            "infeasible", None, None, math.fsum(problem.cost), None, elapsed, name, scale.tolerance
        )
    converted = hint_intervals(problem, hint) if hint is not None else None
    ncopies = copy_counts(problem, copies, converted[0] if converted else None)
    mm = build(problem, budget, ncopies)
    if converted is not None and all(len(c) <= k for c, k in zip(converted[0], ncopies, strict=True)):
        add_hint(mm, *converted)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit_s - (time.perf_counter() - t0), 0.1)
    solver.parameters.num_workers = max(1, min(workers, MAX_WORKERS))
    code = solver.solve(mm.model)
    if code == cp_model.MODEL_INVALID:
        raise InternalError(f"checkmate_cpsat: invalid model: {mm.model.validate()}")
    res = _result(problem, budget, mm, solver, code, lp, time.perf_counter() - t0)
    worse = res.objective is None or (hint is not None and hint.cost(problem) < res.objective)
    if hint is not None and res.status != "infeasible" and worse:
        return _fallback(problem, budget, hint, res)
    return res


def _fallback(problem: RematProblem, budget: int, hint: Schedule, res: RematResult) -> RematResult:
    """The hint as the result when CP-SAT returned nothing better in time (presolve can take the whole limit
    on the exact model): it is CP-SAT's first incumbent, so the solver never reports worse than its hint."""
    report = check(problem, events(problem, hint), budget)
    if not report.ok:
        return res
    obj = hint.cost(problem)
    bound = min(res.bound, obj)
    status, gap = judge(obj, bound, cost_scale(problem))
    name = f"{res.solver}, hint kept"
    return RematResult(status, hint, obj, bound, gap, res.time_s, name, res.tolerance)


def _result(
    problem: RematProblem,
    budget: int,
    mm: _Model,
    solver: cp_model.CpSolver,
    code: cp_model.CpSolverStatus,
    lp: float | None,
    elapsed: float,
) -> RematResult:
    """The solve as a `RematResult`: the bound of the module docstring, the checked schedule's own cost, the
    status `remat_dag.judge`'s."""
    scale = cost_scale(problem)
    trivial = math.fsum(problem.cost)
    name = "moccasin-cpsat " + (
        "(all copies)" if mm.exact_copies else f"(<= {max(len(r) for r in mm.copies)} copies)"
    )
    bound = max(trivial, lp or 0.0)
    if lp is not None:
        name += ", LP bound"
    if mm.exact_copies and code in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.INFEASIBLE):
        own = trivial + max(0.0, float(solver.best_objective_bound)) * scale.unit
        bound = max(bound, scale.round_bound(own) if mm.exact_weights else own)
    tol = scale.tolerance
    if code == cp_model.INFEASIBLE:
        status: Status = "infeasible" if mm.exact_copies else "timeout"  # restricted: none with these copies
        return RematResult(status, None, None, bound, None, elapsed, name, tol)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return RematResult("timeout", None, None, bound, None, elapsed, name, tol)
    sched = decode(problem, mm, solver)
    if not check(problem, events(problem, sched), budget).ok:  # cannot happen by construction (docstring)
        return RematResult(
            "timeout", None, None, bound, None, elapsed, f"{name}, decoded schedule failed", tol
        )
    obj = sched.cost(problem)
    bound = min(bound, obj)  # a schedule's cost is an upper bound: a dual bound above it is float rounding
    status, gap = judge(obj, bound, scale)
    return RematResult(status, sched, obj, bound, gap, elapsed, name, tol)
