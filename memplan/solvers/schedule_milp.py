"""Exact formulations of the scheduling problem on HiGHS (`memplan.solvers.milp`), after studying COSMA's
(Li, Gupta, Malik: one ILP over operator order, allocation and replacement); ours leave allocation to the
`allocate` pass and index time by step.

- `solve_replacement`: the order fixed, which tensors stay on the device between two uses. One binary
  k[t,i] per gap between the i-th and (i+1)-th use of t (1: kept); leaving costs a reload, plus one store
  per dirty epoch (the uses after one write) in which t leaves (w[t,e] >= 1 - k[t,i]), except the last
  epoch of a kept tensor, whose store is compulsory. Capacity per step: what the op uses plus the gaps
  kept across it. Moving a tensor only right after a use and right before the next is no loss in this cost
  model, so this is exact for the order.
- `solve_region_order`: the order of one region's ops minimising its peak (no capacity). x[v,q] = 1 when
  op v runs at step q, within its window [ancestors, n - 1 - descendants]; precedence as prefix sums
  (X_b(q) <= X_a(q - 1)); a tensor is live at q when some use that starts it has run by q and some use
  that ends it has not run before q (alive >= X_a(q) - X_b(q - 1), every pair); M >= live bytes at q.
- `solve_joint`: order and replacement together under a capacity (small graphs): x as above, r[t,q]
  resident at step q (r >= x for every user, r <= X_producer), a load where r rises without the producer
  running, one store when a produced, not kept tensor leaves before all its users ran. Its dual bound is a
  lower bound over every order (it counts at most one store per tensor; the exact replacement of its order
  then prices the order exactly).

Costs are in units of the sizes' greatest common divisor (coarsened so the largest is at most 2^30 units),
the absolute gap is half a unit and the relative gap zero, so "optimal" is optimal to the unit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from memplan.solvers.milp import INF, MilpProblem, MilpResult, solve_milp
from memplan.solvers.schedule_problem import (
    Replacement,
    ScheduleProblem,
    check_replacement,
    positions,
    replay,
    use_steps,
)

MAX_UNITS = 2**30


@dataclass
class Model:
    """A MILP built column by column and row by row (sparse)."""

    cost: list[float]
    lower: list[float]
    upper: list[float]
    integer: list[int]
    rows: list[dict[int, float]]
    row_lower: list[float]
    row_upper: list[float]

    @staticmethod
    def empty() -> Model:
        return Model([], [], [], [], [], [], [])

    def var(self, cost: float = 0.0, lower: float = 0.0, upper: float = 1.0, integer: bool = True) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(int(integer))
        return len(self.cost) - 1

    def row(self, coefs: dict[int, float], lower: float = -INF, upper: float = INF) -> None:
        self.rows.append(coefs)
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    def problem(self) -> MilpProblem:
        n = len(self.cost)
        cols: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        for i, r in enumerate(self.rows):
            for j, a in r.items():
                if a != 0.0:
                    cols[j].append((i, a))
        indptr = np.zeros(n + 1, dtype=np.int64)
        for j in range(n):
            indptr[j + 1] = indptr[j] + len(cols[j])
        idx = np.array([i for c in cols for i, _ in c], dtype=np.int64)
        data = np.array([a for c in cols for _, a in c], dtype=np.float64)
        return MilpProblem(
            np.array(self.cost), np.array(self.lower), np.array(self.upper), np.array(self.integer),
            data, idx, indptr, np.array(self.row_lower), np.array(self.row_upper),
        )  # fmt: skip


def unit_of(sizes: list[int] | tuple[int, ...]) -> int:
    """Bytes per cost unit: the sizes' gcd, coarsened until the largest size is at most `MAX_UNITS`."""
    nz = [s for s in sizes if s > 0]
    if not nz:
        return 1
    g = math.gcd(*nz)
    top = max(nz)
    while top // g > MAX_UNITS:
        g *= 2
    return g


def exact_unit(sizes: list[int] | tuple[int, ...], unit: int) -> bool:
    """Whether every size is a whole number of units (then every objective is an integer)."""
    return all(s % unit == 0 for s in sizes)


def integral(bound: float | None, exact: bool) -> float | None:
    """A dual bound of an integer objective rounded up (when `exact`); HiGHS stops within half a unit."""
    if bound is None or not exact:
        return bound
    return float(math.ceil(bound - 1e-6))


def _solve(m: Model, time_limit_s: float, start: list[float] | None, began: float) -> MilpResult:
    """Solve within what is left of `time_limit_s` since `began` (building the model counts)."""
    x0 = np.array(start) if start is not None else None
    problem = m.problem()
    left = max(time_limit_s - (time.perf_counter() - began), 0.05)
    return solve_milp(problem, left, mip_rel_gap=0.0, start=x0, mip_abs_gap=0.5)


# -- replacement for a fixed order -------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplacementResult:
    replacement: Replacement
    result: MilpResult
    unit_bytes: int
    columns: int


def solve_replacement(
    p: ScheduleProblem,
    order: list[int],
    capacity: int,
    time_limit_s: float,
    start: Replacement | None = None,
) -> ReplacementResult:
    """The least non-compulsory traffic for `order` under `capacity` (see the module docstring); `start`,
    a feasible replacement of the same order (Belady's), is the first incumbent."""
    began = time.perf_counter()
    unit = unit_of(p.sizes)
    steps = use_steps(p, order)
    writes = [set() for _ in range(p.n_tensors)]  # type: list[set[int]]
    for k, v in enumerate(order):
        for t in p.writes[v]:
            writes[t].add(k)
    m = Model.empty()
    gap: dict[tuple[int, int], int] = {}
    need = [0] * len(order)
    for k, v in enumerate(order):
        need[k] = sum(p.sizes[t] for t in set(p.uses[v]))
    spanning: list[list[tuple[int, int]]] = [[] for _ in order]
    links: list[tuple[int, int]] = []
    for t, s in enumerate(steps):
        epoch = None if p.initial[t] else -1
        epoch_var: dict[int, int] = {}
        last_write = max(writes[t], default=-1)
        for i in range(len(s) - 1):
            if s[i] in writes[t]:
                epoch = s[i]
            if s[i + 1] - s[i] <= 1:
                continue  # adjacent uses: nothing to gain by leaving
            size = p.sizes[t] / unit
            j = m.var(cost=-size)
            gap[(t, i)] = j
            for q in range(s[i] + 1, s[i + 1]):
                spanning[q].append((t, j))
            free = epoch is None or (p.keep[t] and epoch == last_write)
            if not free:
                assert epoch is not None
                if epoch not in epoch_var:
                    epoch_var[epoch] = m.var(cost=size)
                m.row({epoch_var[epoch]: 1.0, j: 1.0}, lower=1.0)  # w >= 1 - k
                links.append((epoch_var[epoch], j))
    for q, span in enumerate(spanning):
        room = capacity - need[q]
        if sum(p.sizes[t] for t, _ in span) > room:
            m.row({j: p.sizes[t] / unit for t, j in span}, upper=room / unit)
    x0 = _replacement_start(m, gap, links, start, steps) if start is not None else None
    res = _solve(m, time_limit_s, x0, began)
    kept = {g: res.x[j] > 0.5 for g, j in gap.items()} if res.x is not None else {}
    for t, s in enumerate(steps):  # adjacent uses stay
        for i in range(len(s) - 1):
            if s[i + 1] - s[i] <= 1:
                kept[(t, i)] = True
    rep = replay(p, order, kept) if res.x is not None else start
    assert rep is not None
    if start is not None and rep.moved_bytes > start.moved_bytes:
        rep = start  # HiGHS's answer rounds worse than its start: keep the start
    check_replacement(p, order, capacity, rep)
    return ReplacementResult(rep, res, unit, len(m.cost))


def _replacement_start(
    m: Model,
    gap: dict[tuple[int, int], int],
    links: list[tuple[int, int]],
    start: Replacement,
    steps: list[list[int]],
) -> list[float]:
    x = [0.0] * len(m.cost)
    spans: dict[int, list[tuple[int, int]]] = {}
    for r in start.residences:
        spans.setdefault(r.tensor, []).append((r.start, r.end))
    for (t, i), j in gap.items():
        a, b = steps[t][i], steps[t][i + 1]
        x[j] = 1.0 if any(s <= a and b < e for s, e in spans.get(t, ())) else 0.0
    for w, k in links:  # a store wherever the start leaves a dirty epoch
        x[w] = max(x[w], 1.0 - x[k])
    return x


# -- order: windows and cumulative columns ----------------------------------------------------------------
@dataclass
class OrderVars:
    """X[v][q] = 1 when op v has run by step q (monotone in q), for q in its window but the last (where it
    is 1); x[v][q] = X[v][q] - X[v][q - 1] is op v running at step q."""

    ops: list[int]
    local: dict[int, int]
    window: dict[int, tuple[int, int]]
    cum: dict[int, dict[int, int]]

    def prefix(self, v: int, q: int) -> tuple[dict[int, float], float]:
        """X_v(q) as (coefficients, constant)."""
        lo, hi = self.window[v]
        if q < lo:
            return {}, 0.0
        if q >= hi:
            return {}, 1.0
        return {self.cum[v][q]: 1.0}, 0.0

    def at(self, v: int, q: int) -> tuple[dict[int, float], float]:
        """x_v(q) = X_v(q) - X_v(q - 1) as (coefficients, constant)."""
        c1, k1 = self.prefix(v, q)
        c0, k0 = self.prefix(v, q - 1)
        row = dict(c1)
        for j, a in c0.items():
            row[j] = row.get(j, 0.0) - a
        return row, k1 - k0


def order_vars(m: Model, p: ScheduleProblem, ops: list[int]) -> OrderVars:
    """Cumulative position columns for `ops` (the region), within windows, with the counting rows (q + 1
    ops have run by step q) and the precedence rows (X_b(q) <= X_a(q - 1) for an edge a -> b)."""
    local = {v: i for i, v in enumerate(ops)}
    n = len(ops)
    preds = {v: {u for u in p.preds[v] if u in local} for v in ops}
    anc: dict[int, set[int]] = {}
    for v in ops:  # captured order is topological
        a: set[int] = set()
        for u in preds[v]:
            a |= anc[u] | {u}
        anc[v] = a
    desc_count = dict.fromkeys(ops, 0)
    for v in ops:
        for u in anc[v]:
            desc_count[u] += 1
    seg_lo: dict[int, int] = {}
    seg_n: dict[int, int] = {}
    for v in ops:
        s = p.segment(v)
        seg_lo.setdefault(s, sum(seg_n.values()))
        seg_n[s] = seg_n.get(s, 0) + 1
    window = {}
    for v in ops:
        s = p.segment(v)
        window[v] = (max(len(anc[v]), seg_lo[s]), min(n - 1 - desc_count[v], seg_lo[s] + seg_n[s] - 1))
    cum = {v: {q: m.var() for q in range(window[v][0], window[v][1])} for v in ops}
    ov = OrderVars(ops, local, window, cum)
    for v in ops:
        qs = sorted(cum[v])
        for q0, q1 in zip(qs, qs[1:], strict=False):
            m.row({cum[v][q1]: 1.0, cum[v][q0]: -1.0}, lower=0.0)
    for q in range(n):
        row: dict[int, float] = {}
        const = 0.0
        for v in ops:
            c, k = ov.prefix(v, q)
            row.update(c)
            const += k
        if row:
            m.row(row, q + 1 - const, q + 1 - const)
    for v in ops:
        for u in preds[v]:
            lo, hi = window[v]
            for q in range(lo, hi):
                cv, kv = ov.prefix(v, q)
                cu, ku = ov.prefix(u, q - 1)
                row = dict(cv)
                _prefix_row(row, cu, -1.0)
                if row:
                    m.row(row, upper=ku - kv)
    return ov


def _order_start(m: Model, ov: OrderVars, order: list[int], x0: list[float]) -> None:
    for q, v in enumerate(order):
        for r, j in ov.cum[v].items():
            x0[j] = 1.0 if r >= q else 0.0


def order_columns(p: ScheduleProblem, ops: list[int]) -> int:
    """How many position columns `order_vars` would make (the caller's size check before building)."""
    local = set(ops)
    anc: dict[int, set[int]] = {}
    for v in ops:
        a: set[int] = set()
        for u in p.preds[v]:
            if u in local:
                a |= anc[u] | {u}
        anc[v] = a
    desc = dict.fromkeys(ops, 0)
    for v in ops:
        for u in anc[v]:
            desc[u] += 1
    return sum(max(len(ops) - 1 - desc[v] - len(anc[v]), 0) for v in ops)


def _prefix_row(row: dict[int, float], coefs: dict[int, float], sign: float) -> None:
    for j, a in coefs.items():
        row[j] = row.get(j, 0.0) + sign * a


@dataclass(frozen=True)
class OrderResult:
    order: list[int]
    result: MilpResult
    unit_bytes: int
    columns: int


def solve_region_order(
    p: ScheduleProblem,
    ops: list[int],
    live_before: frozenset[int],
    live_after: frozenset[int],
    time_limit_s: float,
    start: list[int],
) -> OrderResult:
    """The order of `ops` with the lowest peak of the live bytes of the tensors they use (tensors in
    `live_before` live from the region's start, in `live_after` to its end); `start` is an incumbent."""
    began = time.perf_counter()
    unit = unit_of(p.sizes)
    m = Model.empty()
    ov = order_vars(m, p, ops)
    n = len(ops)
    top = m.var(cost=1.0, upper=INF, integer=False)
    used: dict[int, list[int]] = {}
    for v in ops:
        for t in set(p.uses[v]):
            used.setdefault(t, []).append(v)
    live_cols: list[dict[int, float]] = [{} for _ in range(n)]
    const = [0.0] * n
    for t, us in used.items():
        size = p.sizes[t] / unit
        if size == 0:
            continue
        if t in live_before and t in live_after:
            for q in range(n):
                const[q] += size
            continue
        starters = [] if t in live_before else us
        enders = [] if t in live_after else us
        lo = 0 if not starters else min(ov.window[a][0] for a in starters)
        hi = n - 1 if not enders else max(ov.window[b][1] for b in enders)
        for q in range(lo, hi + 1):
            a_var = m.var(integer=False)
            live_cols[q][a_var] = size
            for a in starters or [None]:
                for b in enders or [None]:
                    row = {a_var: 1.0}
                    rhs = 0.0  # alive - X_a(q) + X_b(q-1) >= 0 (X_a = 1 without starters)
                    if a is None:
                        rhs += 1.0
                    else:
                        ca, ka = ov.prefix(a, q)
                        _prefix_row(row, ca, -1.0)
                        rhs += ka
                    if b is not None:
                        cb, kb = ov.prefix(b, q - 1)
                        _prefix_row(row, cb, 1.0)
                        rhs -= kb
                    m.row(row, lower=rhs)
    for q in range(n):
        row = {top: 1.0}
        _prefix_row(row, live_cols[q], -1.0)
        m.row(row, lower=const[q])
    x0 = [0.0] * len(m.cost)
    _order_start(m, ov, start, x0)
    _fill_continuous(m, x0)
    res = _solve(m, time_limit_s, x0, began)
    order = list(start)
    if res.x is not None:
        order = _decode_order(ov, res.x)
    return OrderResult(order, res, unit, len(m.cost))


def _decode_order(ov: OrderVars, x: np.ndarray) -> list[int]:
    at = {}
    for v in ov.ops:
        hi = ov.window[v][1]
        at[v] = min((q for q, j in ov.cum[v].items() if x[j] > 0.5), default=hi)
    return sorted(ov.ops, key=lambda v: (at[v], ov.local[v]))


def _fill_continuous(m: Model, x0: list[float]) -> None:
    """Give the continuous columns of a start the least values its rows allow (rows of the form
    `col - ... >= rhs` with one continuous column), processing rows until nothing changes."""
    cont = {j for j, i in enumerate(m.integer) if not i}
    for _ in range(3):
        changed = False
        for r, coefs in enumerate(m.rows):
            lo = m.row_lower[r]
            if lo == -INF:
                continue
            free = [j for j in coefs if j in cont and coefs[j] > 0]
            if len(free) != 1:
                continue
            j = free[0]
            rest = sum(a * x0[i] for i, a in coefs.items() if i != j)
            need = (lo - rest) / coefs[j]
            if need > x0[j] + 1e-9:
                x0[j] = min(need, m.upper[j])
                changed = True
        if not changed:
            break


# -- order and replacement together ----------------------------------------------------------------------
@dataclass(frozen=True)
class JointResult:
    order: list[int]
    result: MilpResult
    unit_bytes: int
    columns: int
    offset_units: float
    """Constant taken off the objective (the first loads of the initial tensors), in units."""


def solve_joint(
    p: ScheduleProblem,
    capacity: int,
    time_limit_s: float,
    start_order: list[int],
    start: Replacement,
) -> JointResult:
    """Order and replacement under `capacity` minimising the non-compulsory traffic (module docstring)."""
    began = time.perf_counter()
    unit = unit_of(p.sizes)
    ops = list(range(p.n_ops))
    n = len(ops)
    m = Model.empty()
    ov = order_vars(m, p, ops)
    users = p.users()
    prod = p.producer()
    r_cols: list[dict[int, int]] = []
    cap_rows: list[dict[int, float]] = [{} for _ in range(n)]
    offset = 0.0
    loads: list[dict[int, int]] = []
    stores: dict[int, int] = {}
    deads: list[dict[int, int]] = []
    for t in range(p.n_tensors):
        size = p.sizes[t] / unit
        us = users[t]
        if not us or size == 0:
            r_cols.append({})
            loads.append({})
            deads.append({})
            continue
        starters = [prod[t]] if prod[t] is not None else us
        lo = min(ov.window[a][0] for a in starters)
        hi = max(ov.window[b][1] for b in us)
        r = {q: m.var() for q in range(lo, hi + 1)}
        r_cols.append(r)
        for q, j in r.items():
            cap_rows[q][j] = size
        for v in us:
            for q in range(ov.window[v][0], ov.window[v][1] + 1):
                cx, kx = ov.at(v, q)  # r >= x
                row = {r[q]: 1.0}
                _prefix_row(row, cx, -1.0)
                m.row(row, lower=kx)
        produced = prod[t] is not None
        if produced:
            for q, j in r.items():
                cp, kp = ov.prefix(prod[t], q)  # r <= X_prod(q)
                row = {j: 1.0}
                _prefix_row(row, cp, -1.0)
                m.row(row, upper=kp)
        ld: dict[int, int] = {}
        for q, j in r.items():  # l >= r[q] - r[q-1] - x[prod][q]
            lj = m.var(cost=size, integer=False)
            ld[q] = lj
            row = {lj: 1.0, j: -1.0}
            rhs = 0.0
            if q - 1 in r:
                row[r[q - 1]] = 1.0
            if produced:
                cx, kx = ov.at(prod[t], q)
                _prefix_row(row, cx, 1.0)
                rhs -= kx
            m.row(row, lower=rhs)
        loads.append(ld)
        if not produced:
            offset += size
        dd: dict[int, int] = {}
        if produced and not p.keep[t]:
            w = m.var(cost=size, integer=False)
            stores[t] = w
            for q in range(lo + 1, hi + 1):  # w >= r[q-1] - r[q] - dead[q]
                d = m.var(integer=False)
                dd[q] = d
                for b in us:
                    cb, kb = ov.prefix(b, q - 1)  # dead <= X_b(q-1)
                    row = {d: 1.0}
                    _prefix_row(row, cb, -1.0)
                    m.row(row, upper=kb)
                m.row({w: 1.0, r[q - 1]: -1.0, r[q]: 1.0, d: 1.0}, lower=0.0)
        deads.append(dd)
    for q in range(n):
        m.row(cap_rows[q], upper=capacity / unit)
    x0 = _joint_start(m, ov, start_order, start, r_cols, loads, stores, deads, p, users)
    res = _solve(m, time_limit_s, x0, began)
    order = _decode_order(ov, res.x) if res.x is not None else list(start_order)
    return JointResult(order, res, unit, len(m.cost), offset)


def _joint_start(
    m: Model,
    ov: OrderVars,
    order: list[int],
    rep: Replacement,
    r_cols: list[dict[int, int]],
    loads: list[dict[int, int]],
    stores: dict[int, int],
    deads: list[dict[int, int]],
    p: ScheduleProblem,
    users: list[list[int]],
) -> list[float]:
    x0 = [0.0] * len(m.cost)
    _order_start(m, ov, order, x0)
    pos = positions(order)
    on: dict[int, list[tuple[int, int]]] = {}
    for r in rep.residences:
        on.setdefault(r.tensor, []).append((r.start, r.end))
        if r.loaded and r.start in loads[r.tensor]:
            x0[loads[r.tensor][r.start]] = 1.0
        if r.stored and r.tensor in stores:
            x0[stores[r.tensor]] = 1.0
    for t, cols in enumerate(r_cols):
        for q, j in cols.items():
            x0[j] = 1.0 if any(s <= q < e for s, e in on.get(t, ())) else 0.0
        last = max((pos[u] for u in users[t]), default=-1)
        for q, d in deads[t].items():
            x0[d] = 1.0 if q > last else 0.0
    return x0
