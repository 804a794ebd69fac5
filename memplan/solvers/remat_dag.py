"""Pure recomputation on a DAG (Checkmate, Jain et al., MLSys 2020): given nodes in a topological order, each
with a compute cost and an output size in bytes, decide which nodes to recompute at which stage so that memory
never exceeds a budget, minimising the total compute.

The stage model (Checkmate's). Stage t computes node t for the first time, after recomputing any earlier
nodes it chooses, in index order, each at most once per stage:

    compute[t]   R_t: the nodes computed in stage t, increasing, ending with t
    keep[t]      S_t: the nodes resident when stage t starts (checkpoints); S_0 is empty,
                 S_{t+1} is a subset of S_t | R_t

Memory is counted eagerly, the same way by the decoder (`events`), the checker (`check`) and the MILP: a
stage starts with S_t resident and drops at once the checkpoints it neither uses nor keeps; after computing
node k, the bytes resident (k's output, its inputs, every other output still resident) must fit the budget;
then each of k's inputs and k itself is freed if no later node of the stage reads it and S_{t+1} does not
keep it. Every node is computed at least once (in its own stage), so the total compute is at least the sum
of all costs: a bound that holds for any schedule. No plan of any kind fits a budget below the largest
working set of one node (its output plus its inputs): `working_set_bound`.

Costs and statuses. Totals are summed from the problem's own costs, never read back from a solver.
`cost_scale` fixes the objective's resolution (the costs' exact gcd, or their sum / `MAX_UNITS`), and `judge`
calls a schedule optimal only where its total is within half a unit of a proven bound; every result carries
that tolerance.

Solvers of the model: `greedy_schedule` below (a linear pass that evicts by a DTR-like score, Kirisame et
al., ICLR 2021, and recomputes what it needs on demand: fast, no bound, and it fails on graphs where evicting
one node forces long recompute chains), `remat_regions.solve_regions` (the order cut into regions at narrow
cuts, each solved by CP-SAT with its boundary pinned, stitched), `checkmate_milp.solve_checkmate` (the exact
MILP over HiGHS, with its dual bound) and `checkmate_cpsat.solve_cpsat` (Moccasin's interval model over
CP-SAT, with the LP relaxation's bound). `remat_solve.solve` runs them in that order, each starting from the
best schedule so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from memplan.errors import InternalError, InvalidInput

Status = Literal["optimal", "feasible", "infeasible", "timeout", "skipped"]
"""optimal: objective - bound <= the result's `tolerance` (in cost units); feasible: a schedule with a larger
gap; infeasible: proven that none exists; timeout: the solver ran and found no schedule; skipped: the solver
was not run (the graph is too large for it; the solver name says why)."""
Event = tuple[Literal["compute", "free"], int]


@dataclass(frozen=True)
class RematProblem:
    """A DAG in topological order: node i reads the outputs of `preds[i]`, all earlier than i."""

    names: tuple[str, ...]
    cost: tuple[float, ...]
    """Compute cost of each node (any unit: FLOPs, seconds); >= 0."""
    size: tuple[int, ...]
    """Bytes of each node's output; >= 0."""
    preds: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.cost) == len(self.size) == len(self.preds) == n):
            raise InternalError("RematProblem: names, cost, size and preds must have one entry per node")
        for i, ps in enumerate(self.preds):
            if any(not 0 <= p < i for p in ps):
                raise InternalError(f"RematProblem: node {i} reads {ps}, not all earlier nodes")

    @property
    def n(self) -> int:
        return len(self.names)

    def users(self) -> list[list[int]]:
        """users[i]: the nodes that read node i, increasing."""
        out: list[list[int]] = [[] for _ in range(self.n)]
        for j, ps in enumerate(self.preds):
            for i in sorted(set(ps)):
                out[i].append(j)
        return out


@dataclass(frozen=True)
class Schedule:
    """A stage-model schedule (see module docstring)."""

    compute: tuple[tuple[int, ...], ...]
    keep: tuple[frozenset[int], ...]

    def cost(self, problem: RematProblem) -> float:
        return math.fsum(problem.cost[i] for stage in self.compute for i in stage)


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What the checker found: the violations (empty: valid), the peak bytes and the total compute."""

    violations: tuple[str, ...]
    peak_bytes: int
    cost: float

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True, slots=True)
class RematResult:
    """A solve: `schedule` is None without a feasible one; `objective` is its total compute, summed from the
    problem's own costs. `bound` is a proven lower bound on the optimal total compute (never below the sum of
    costs); `gap` is (objective - bound) / objective; the status is optimal only where objective - bound <=
    `tolerance` (cost units: half of `CostScale.unit`)."""

    status: Status
    schedule: Schedule | None
    objective: float | None
    bound: float
    gap: float | None
    time_s: float
    solver: str
    tolerance: float = 0.0


MAX_UNITS = 1e8
"""Most cost units in the sum of all costs (`cost_scale`). The MILP works in these units with HiGHS's
feasibility tolerances at 1e-9 (`checkmate_milp`), so a unit stays well above what they can shift the
objective or the bound by."""


@dataclass(frozen=True, slots=True)
class CostScale:
    """The objective's resolution, `unit` in the problem's cost units. `exact`: every cost is an integer
    multiple of `unit` (their exact gcd), so every schedule's total is too, and a bound less than one unit
    below an objective proves it optimal. Otherwise `unit` is the sum of costs / `MAX_UNITS` and "optimal"
    means within `tolerance` of the bound."""

    unit: float
    exact: bool

    @property
    def tolerance(self) -> float:
        """Largest objective - bound still reported optimal, in cost units."""
        return 0.5 * self.unit

    def round_bound(self, bound: float) -> float:
        """A proven bound raised to the next multiple of the unit where every total is one (`exact`)."""
        if not self.exact:
            return bound
        return math.ceil(bound / self.unit - 1e-6) * self.unit


def cost_scale(problem: RematProblem) -> CostScale:
    """The exact gcd of the nonzero costs (floats are dyadic rationals) while the sum of costs is at most
    `MAX_UNITS` of it, else the sum / `MAX_UNITS`."""
    costs = [Fraction(c) for c in problem.cost if c > 0]
    if not costs:
        return CostScale(1.0, True)
    total = sum(costs)
    den = math.lcm(*(c.denominator for c in costs))
    gcd = Fraction(math.gcd(*(int(c * den) for c in costs)), den)
    unit = float(gcd)
    if total / gcd <= MAX_UNITS and all((c / unit).is_integer() for c in problem.cost):
        return CostScale(unit, True)
    return CostScale(float(total) / MAX_UNITS, False)


def judge(objective: float, bound: float, scale: CostScale) -> tuple[Status, float]:
    """Status and gap of a schedule costing `objective` against a proven `bound`: optimal only within
    `scale.tolerance` (cost units), then the gap is 0; else feasible with (objective - bound) / objective."""
    gap = max(objective - bound, 0.0) / objective if objective > 0 else 0.0
    return ("optimal" if objective - bound <= scale.tolerance else "feasible"), gap


def working_set_bound(problem: RematProblem) -> int:
    """The least budget any schedule needs: the largest output-plus-inputs of one node."""
    return max((_working_set(problem, k) for k in range(problem.n)), default=0)


def _working_set(problem: RematProblem, k: int) -> int:
    return problem.size[k] + sum(problem.size[i] for i in set(problem.preds[k]))


def no_remat_schedule(problem: RematProblem) -> Schedule:
    """Compute each node once, keep it until its last reader has run."""
    users = problem.users()
    keep = [frozenset(i for i in range(t) if users[i] and users[i][-1] >= t) for t in range(problem.n)]
    return Schedule(tuple((t,) for t in range(problem.n)), tuple(keep))


def no_remat_peak(problem: RematProblem) -> int:
    """Peak bytes of the no-recompute schedule (the reference for budgets such as 0.8x and 0.9x)."""
    return check(problem, events(problem, no_remat_schedule(problem))).peak_bytes


def events(problem: RematProblem, schedule: Schedule) -> list[Event]:
    """The schedule as compute / free events, with the eager frees of the stage model."""
    out: list[Event] = []
    n = len(schedule.compute)
    for t, stage in enumerate(schedule.compute):
        nxt = schedule.keep[t + 1] if t + 1 < n else frozenset()
        last_use = {i: k for k in stage for i in problem.preds[k]}
        out += [("free", i) for i in sorted(schedule.keep[t]) if i not in last_use and i not in nxt]
        for k in stage:
            out.append(("compute", k))
            done = sorted({*problem.preds[k], k})
            out += [("free", i) for i in done if last_use.get(i, k) <= k and i not in nxt]
    return out


def check(problem: RematProblem, evs: list[Event], budget: int | None = None) -> CheckReport:
    """Independent replay of events: inputs resident at each compute, frees of resident nodes only, every node
    computed, and (if `budget` is given) the resident bytes after each compute within it."""
    resident: set[int] = set()
    live, peak, cost = 0, 0, 0.0
    bad: list[str] = []
    computed: set[int] = set()
    for step, (kind, i) in enumerate(evs):
        if kind == "free":
            if i not in resident:
                bad.append(f"event {step}: frees node {i}, which is not resident")
                continue
            resident.remove(i)
            live -= problem.size[i]
            continue
        missing = [p for p in problem.preds[i] if p not in resident]
        if missing:
            bad.append(f"event {step}: computes node {i} without its inputs {missing}")
        if i not in resident:
            resident.add(i)
            live += problem.size[i]
        computed.add(i)
        cost += problem.cost[i]
        peak = max(peak, live)
        if budget is not None and live > budget:
            bad.append(
                f"event {step}: {live} bytes resident after computing node {i}, over the budget {budget}"
            )
    bad += [f"node {i} is never computed" for i in sorted(set(range(problem.n)) - computed)]
    return CheckReport(tuple(bad), peak, cost)


def check_budget(problem: RematProblem, budget: int) -> None:
    """Raise `InvalidInput` if no schedule can exist (budget below the working-set bound)."""
    bound = working_set_bound(problem)
    if budget < bound:
        k = max(range(problem.n), key=lambda j: _working_set(problem, j))
        raise InvalidInput(
            f"budget {budget} bytes is below the working set of node {problem.names[k]!r} ({bound} bytes: "
            f"its output plus its inputs), so no schedule exists; the budget must be at least {bound} bytes"
        )


def greedy_schedule(problem: RematProblem, budget: int, score: str = "dtr") -> Schedule | None:
    """One pass in stage order: each stage recomputes the missing ancestors of t; before each compute,
    resident nodes the stage no longer needs are evicted in the order of `score` (see `SCORES`). Nodes no
    later node reads are dropped at once. None if some compute cannot fit even after evicting."""
    users = problem.users()
    resident: set[int] = set()
    compute: list[tuple[int, ...]] = []
    keep: list[frozenset[int]] = []
    for t in range(problem.n):
        keep.append(frozenset(resident))
        stage = _closure(problem, t, resident)
        for pos, k in enumerate(stage):
            pinned = {i for j in stage[pos:] for i in problem.preds[j]}
            if not _make_room(problem, users, resident, pinned, problem.size[k], budget, t, SCORES[score]):
                return None
            resident.add(k)
            later = {i for j in stage[pos + 1 :] for i in problem.preds[j]}
            resident -= {i for i in resident if i not in later and (not users[i] or users[i][-1] <= t)}
        compute.append(tuple(stage))
    return Schedule(tuple(compute), tuple(keep))


def _closure(problem: RematProblem, t: int, resident: set[int]) -> list[int]:
    """t and every ancestor that stage t must recompute because it is not resident, increasing."""
    need = {t}
    stack = [t]
    while stack:
        for i in problem.preds[stack.pop()]:
            if i not in resident and i not in need:
                need.add(i)
                stack.append(i)
    return sorted(need)


def _make_room(
    problem: RematProblem,
    users: list[list[int]],
    resident: set[int],
    pinned: set[int],
    extra: int,
    budget: int,
    t: int,
    score: Score,
) -> bool:
    live = sum(problem.size[i] for i in resident)
    if live + extra <= budget:
        return True
    victims = sorted(
        resident - pinned,
        key=lambda i: score(problem, _rebuild(problem, i, resident), i, _distance(problem, users, i, t)),
    )
    for v in victims:
        resident.remove(v)
        live -= problem.size[v]
        if live + extra <= budget:
            return True
    return False


def _rebuild(problem: RematProblem, i: int, resident: set[int]) -> float:
    """Cost to rebuild i: its own, plus its non-resident inputs'."""
    return problem.cost[i] + sum(problem.cost[p] for p in problem.preds[i] if p not in resident)


def _distance(problem: RematProblem, users: list[list[int]], i: int, t: int) -> int:
    """Stages until the next node that reads i is first computed (n + 1 if none will)."""
    return next((j for j in users[i] if j > t), problem.n + t + 1) - t


Score = Callable[[RematProblem, float, int, int], float]
SCORES: dict[str, Score] = {
    "dtr": lambda p, rebuild, i, dist: (rebuild + 1e-12) / ((p.size[i] + 1) * dist),
    "cost-per-byte": lambda p, rebuild, i, dist: (rebuild + 1e-12) / (p.size[i] + 1),
    "belady": lambda p, rebuild, i, dist: -float(dist),
    "largest": lambda p, rebuild, i, dist: -float(p.size[i]),
}
"""Eviction orders, lowest first: DTR's cost / (bytes x staleness) with the distance to the next use in place
of staleness; cost per byte; farthest next use first (Belady); largest first."""


def best_greedy(problem: RematProblem, budget: int) -> Schedule | None:
    """The cheapest schedule among the greedy passes of every eviction order."""
    found = [s for s in (greedy_schedule(problem, budget, name) for name in SCORES) if s is not None]
    return min(found, key=lambda s: s.cost(problem), default=None)
