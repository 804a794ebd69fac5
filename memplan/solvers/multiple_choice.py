"""Multiple-choice knapsack with ties: pick one choice (a storage format) per layer, minimising the summed
cost under limits on summed size, BOPs and latency, where tied layers pick the same format.

    minimise    Σ_i Σ_k c_ik x_ik
    subject to  Σ_k x_ik = 1                  every layer i                          (one-hot rows)
                x_if = x_jf                   every tie (i, j), every format f of its group (tie rows)
                x_ik = 0                      k's format is not common to i's whole tie group
                Σ_i Σ_k r_ik x_ik <= L_r      every given limit r in {size, bops, latency} (limit rows)
                x_ik in {0, 1}

This is HAWQ-V3's bit-allocation ILP (Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021)
with any number of formats per layer, solved exactly on HiGHS through `milp.py`. Knows nothing of models.

Numerics. Each layer's costs and resources are shifted by their minimum over its allowed choices (a constant,
since exactly one choice is taken) and each row is divided by its largest coefficient, so costs of 1e-7 or
1e13 reach HiGHS as numbers in [0, 1], with both MIP gaps set to zero. What HiGHS returns is then checked in
exact rational arithmetic (every float is a rational): a choice that breaks a limit by less than HiGHS's
feasibility tolerance is cut off by a no-good row and the MILP solved again, so a returned choice meets every
limit exactly, and its objective and usage are recomputed from the original numbers. Invariant: a cut only
removes a choice that breaks a limit, so HiGHS's bound stays a bound of the true problem. A limit below the
minimum of its resource (each tie group at its smallest common format) is refused before any solve, exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Literal

import numpy as np

from memplan.errors import InvalidInput, internal_assert
from memplan.solvers.milp import MilpProblem, MilpResult, solve_milp

Resource = Literal["size", "bops", "latency"]
RESOURCES: tuple[Resource, ...] = ("size", "bops", "latency")
Status = Literal["optimal", "feasible", "infeasible", "timeout"]

_Row = tuple[list[int], list[float], float, float]
"""A MILP row: (columns, coefficients, lower, upper)."""

GAP_TOLERANCE = 1e-9
"""`optimal` means objective − bound <= GAP_TOLERANCE × the cost scale (the largest spread of one layer's
costs): differences smaller than that are ties for HiGHS, whose arithmetic is float64 on costs in [0, 1]."""
MAX_REPAIRS = 20
"""Re-solves allowed after cutting off a choice that breaks a limit within HiGHS's tolerance."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One way to store a layer: a format name, its cost (e.g. the loss sensitivity it adds), resources."""

    format: str
    cost: float
    size: float = 0.0
    bops: float = 0.0
    latency: float = 0.0


@dataclass(frozen=True, slots=True)
class Layer:
    """A layer and its choices (format names unique within the layer: ties match choices by name)."""

    name: str
    choices: tuple[Choice, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    """An amount of each resource (a usage, a minimum, or limits where None means no limit)."""

    size: float | None = None
    bops: float | None = None
    latency: float | None = None


@dataclass(frozen=True, slots=True)
class ChoiceProblem:
    """Layers, ties `(i, j)` (layer indices that must pick the same format) and the limits on the sums."""

    layers: tuple[Layer, ...]
    ties: tuple[tuple[int, int], ...] = ()
    limits: Usage = Usage()


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A limit below the least of its resource any choice reaches (ties respected): infeasible alone."""

    resource: Resource
    limit: float
    minimum: float


@dataclass(frozen=True, slots=True)
class ChoiceSolution:
    """status: optimal (gap within GAP_TOLERANCE), feasible (best found, e.g. at the time limit), infeasible
    (see `shortfalls`; empty when only the limits together are infeasible), timeout (nothing found in time).
    `choice` is the chosen choice's index per layer; `gap` = (objective − bound) / max(|objective|, scale)."""

    status: Status
    choice: tuple[int, ...] | None
    formats: tuple[str, ...] | None
    objective: float | None
    bound: float | None
    gap: float | None
    usage: Usage | None
    minimum: Usage
    time_s: float
    time_limit_s: float
    shortfalls: tuple[Shortfall, ...] = ()
    repairs: int = 0
    """No-good cuts added after HiGHS returned a choice that breaks a limit within its tolerance."""


def check_problem(problem: ChoiceProblem) -> list[set[str]]:
    """Refuse what no solver should see (InvalidInput); the formats each layer may take under the ties."""
    for i, layer in enumerate(problem.layers):
        _check_layer(i, layer)
    n = len(problem.layers)
    for t, (a, b) in enumerate(problem.ties):
        if not (0 <= a < n and 0 <= b < n):
            raise InvalidInput(f"ties[{t}] = [{a}, {b}]: a layer index is out of range (0..{n - 1})")
    for r in RESOURCES:
        limit = getattr(problem.limits, r)
        if limit is not None and not (math.isfinite(limit) and limit >= 0):
            raise InvalidInput(f"limits.{r} = {limit}: must be a finite number >= 0")
    return _allowed_formats(problem)


def _allowed_formats(problem: ChoiceProblem) -> list[set[str]]:
    """Per layer, the formats every layer of its tie group has (InvalidInput if a group has none)."""
    allowed: list[set[str]] = [set() for _ in problem.layers]
    for group in tie_groups(problem):
        common = set.intersection(*({c.format for c in problem.layers[i].choices} for i in group))
        if not common:
            names = ", ".join(f"{i} ({problem.layers[i].name!r})" for i in group)
            raise InvalidInput(f"tied layers {names} have no format in common: no choice satisfies the tie")
        for i in group:
            allowed[i] = common
    return allowed


def _check_layer(i: int, layer: Layer) -> None:
    where = f"layers[{i}] ({layer.name!r})"
    if not layer.choices:
        raise InvalidInput(f"{where}: has no choices; give it at least one")
    formats = [c.format for c in layer.choices]
    if len(set(formats)) != len(formats):
        raise InvalidInput(f"{where}: format names repeat ({formats}); ties match choices by format name")
    for k, c in enumerate(layer.choices):
        for field in ("cost", *RESOURCES):
            value = getattr(c, field)
            if not math.isfinite(value) or (field != "cost" and value < 0):
                need = "a finite number" if field == "cost" else "a finite number >= 0"
                raise InvalidInput(f"{where}.choices[{k}].{field} = {value}: must be {need}")


def tie_groups(problem: ChoiceProblem) -> list[list[int]]:
    """The layers joined by ties, transitively (union-find), each group sorted, in order of first layer."""
    parent = list(range(len(problem.layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in problem.ties:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for i in range(len(problem.layers)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def minimum_usage(problem: ChoiceProblem, allowed: list[set[str]]) -> dict[Resource, Fraction]:
    """The least total of each resource, alone: each tie group at its smallest common format (exact)."""
    groups = tie_groups(problem)
    return {
        r: sum(
            (
                min(_exact_sum(getattr(_choice(problem.layers[i], f), r) for i in g) for f in allowed[g[0]])
                for g in groups
            ),
            Fraction(0),
        )
        for r in RESOURCES
    }


def usage_of(problem: ChoiceProblem, choice: tuple[int, ...]) -> dict[Resource, Fraction]:
    """The exact total of each resource taken by `choice` (one choice index per layer)."""
    picked = _picked(problem, choice)
    return {r: _exact_sum(getattr(c, r) for c in picked) for r in RESOURCES}


def cost_of(problem: ChoiceProblem, choice: tuple[int, ...]) -> float:
    """The objective of `choice`, summed exactly and rounded once."""
    return float(_exact_sum(c.cost for c in _picked(problem, choice)))


def _exact_sum(values: Iterable[float]) -> Fraction:
    return sum((Fraction(v) for v in values), Fraction(0))


def _picked(problem: ChoiceProblem, choice: tuple[int, ...]) -> list[Choice]:
    return [layer.choices[k] for layer, k in zip(problem.layers, choice, strict=True)]


def _choice(layer: Layer, fmt: str) -> Choice:
    return next(c for c in layer.choices if c.format == fmt)


def _as_usage(values: dict[Resource, Fraction]) -> Usage:
    return Usage(*(float(values[r]) for r in RESOURCES))


def solve_multiple_choice(problem: ChoiceProblem, time_limit_s: float) -> ChoiceSolution:
    """The cheapest choice per layer within the limits, exactly (see the module docstring), or the best found
    in `time_limit_s` seconds, with its status, bound and gap."""
    t0 = time.perf_counter()
    if not time_limit_s > 0:
        raise InvalidInput(f"time limit {time_limit_s}: must be a positive number of seconds")
    allowed = check_problem(problem)
    minimum = minimum_usage(problem, allowed)
    least = _as_usage(minimum)
    empty = ChoiceSolution("infeasible", None, None, None, None, None, None, least, 0.0, time_limit_s)
    if short := shortfalls(problem, minimum):
        return replace(empty, shortfalls=short, time_s=_since(t0))
    if not problem.layers:
        return replace(
            empty,
            status="optimal",
            choice=(),
            formats=(),
            objective=0.0,
            bound=0.0,
            gap=0.0,
            usage=Usage(0.0, 0.0, 0.0),
            time_s=_since(t0),
        )
    model = _Model.build(problem, allowed)
    cuts: list[tuple[int, ...]] = []
    while True:
        left = time_limit_s - _since(t0)
        res = solve_milp(model.milp(cuts), max(left, 1e-3), mip_rel_gap=0.0, mip_abs_gap=0.0)
        choice = model.decode(res)
        if choice is None or _within_limits(problem, choice):
            break
        cuts.append(choice)  # breaks a limit by less than HiGHS's tolerance: cut it off, solve again
        if len(cuts) > MAX_REPAIRS or _since(t0) >= time_limit_s:
            return replace(empty, status="timeout", repairs=len(cuts), time_s=_since(t0))
    return _solution(problem, model, res, choice, replace(empty, repairs=len(cuts)), t0)


def shortfalls(problem: ChoiceProblem, minimum: dict[Resource, Fraction]) -> tuple[Shortfall, ...]:
    """The limits below the least of their resource (exact comparison)."""
    return tuple(
        Shortfall(r, limit, float(minimum[r]))
        for r in RESOURCES
        if (limit := getattr(problem.limits, r)) is not None and Fraction(limit) < minimum[r]
    )


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def _within_limits(problem: ChoiceProblem, choice: tuple[int, ...]) -> bool:
    used = usage_of(problem, choice)
    return all((limit := getattr(problem.limits, r)) is None or used[r] <= Fraction(limit) for r in RESOURCES)


def _solution(
    problem: ChoiceProblem,
    model: _Model,
    res: MilpResult,
    choice: tuple[int, ...] | None,
    empty: ChoiceSolution,
    t0: float,
) -> ChoiceSolution:
    """HiGHS's answer in the problem's own units, its objective and usage recomputed exactly."""
    bound = None if res.bound is None else model.cost_offset + res.bound * model.cost_scale
    if choice is None:
        if res.status == "infeasible":
            return replace(empty, time_s=_since(t0))
        return replace(empty, status="timeout", bound=bound, time_s=_since(t0))
    objective = cost_of(problem, choice)
    if bound is None:  # HiGHS proves optimality without a finite dual bound only when presolve solves it
        bound = objective if res.status == "optimal" else None
    else:
        bound = min(bound, objective)
    scale = model.cost_scale
    optimal = res.status == "optimal" and bound is not None and objective - bound <= GAP_TOLERANCE * scale
    return replace(
        empty,
        status="optimal" if optimal else "feasible",
        choice=choice,
        formats=tuple(c.format for c in _picked(problem, choice)),
        objective=objective,
        bound=bound,
        gap=None if bound is None else (objective - bound) / max(abs(objective), scale),
        usage=_as_usage(usage_of(problem, choice)),
        time_s=_since(t0),
    )


@dataclass(frozen=True)
class _Model:
    """The MILP's fixed part (columns; one-hot, tie and limit rows; normalised); `milp(cuts)` adds cuts."""

    first: tuple[int, ...]
    """Column of each layer's first choice; layer i's columns are first[i] .. first[i] + len(choices) - 1."""
    cost: np.ndarray
    upper: np.ndarray
    rows: list[_Row]
    cost_offset: float
    cost_scale: float

    @staticmethod
    def build(problem: ChoiceProblem, allowed: list[set[str]]) -> _Model:
        """Columns and rows of the problem; allowed[i] are the formats layer i may take under the ties."""
        first = tuple(np.cumsum([0] + [len(layer.choices) for layer in problem.layers[:-1]]).tolist())
        ok = [[c.format in allowed[i] for c in layer.choices] for i, layer in enumerate(problem.layers)]
        costs, offset = _shifted(problem, ok, "cost")
        scale = max(costs.max(), 0.0) or 1.0
        upper = np.array([1.0 if a else 0.0 for row in ok for a in row])
        rows: list[_Row] = [
            ([f + k for k in range(len(layer.choices))], [1.0] * len(layer.choices), 1.0, 1.0)
            for f, layer in zip(first, problem.layers, strict=True)
        ]  # one-hot
        rows += _tie_rows(problem, allowed, first)
        for r in RESOURCES:
            rows += _limit_row(problem, ok, r, getattr(problem.limits, r))
        return _Model(first, costs / scale, upper, rows, float(offset), float(scale))

    def milp(self, cuts: list[tuple[int, ...]]) -> MilpProblem:
        """The MILP with a no-good row `Σ_i x_{i, cut_i} <= n − 1` for each cut."""
        n = len(self.first)
        rows = self.rows + [
            ([f + k for f, k in zip(self.first, cut, strict=True)], [1.0] * n, 0.0, n - 1.0) for cut in cuts
        ]
        return _csc(self.cost, self.upper, rows)

    def decode(self, res: MilpResult) -> tuple[int, ...] | None:
        """The choice index per layer of HiGHS's point (None without one)."""
        if res.x is None:
            return None
        ends = [*self.first[1:], len(self.cost)]
        choice = tuple(int(np.argmax(res.x[f:e])) for f, e in zip(self.first, ends, strict=True))
        internal_assert(
            all(res.x[f + k] > 0.5 for f, k in zip(self.first, choice, strict=True)),
            "multiple-choice MILP: a layer has no choice at 1",
        )
        return choice


def _tie_rows(problem: ChoiceProblem, allowed: list[set[str]], first: tuple[int, ...]) -> list[_Row]:
    """`x_ia − x_jb = 0` for each tie (i, j) and each format both may take (a and b: its choice indices)."""
    rows: list[_Row] = []
    for i, j in problem.ties:
        if i == j:
            continue
        k_of = {c.format: k for k, c in enumerate(problem.layers[i].choices)}
        for k, c in enumerate(problem.layers[j].choices):
            if c.format in allowed[j]:
                rows.append(([first[i] + k_of[c.format], first[j] + k], [1.0, -1.0], 0.0, 0.0))
    return rows


def _shifted(problem: ChoiceProblem, ok: list[list[bool]], field: str) -> tuple[np.ndarray, Fraction]:
    """Every column's `field` minus its layer's least allowed one, and the sum of those least values."""
    out: list[float] = []
    offset = Fraction(0)
    for layer, allowed in zip(problem.layers, ok, strict=True):
        values = [getattr(c, field) for c in layer.choices]
        least = min(v for v, a in zip(values, allowed, strict=True) if a)
        offset += Fraction(least)
        out += [
            float(Fraction(v) - Fraction(least)) if a else 0.0 for v, a in zip(values, allowed, strict=True)
        ]
    return np.array(out), offset


def _limit_row(problem: ChoiceProblem, ok: list[list[bool]], r: Resource, limit: float | None) -> list[_Row]:
    """`Σ (r_ik − min_k r_ik) x_ik <= limit − Σ min_k r_ik`, divided by its largest coefficient (none without
    a limit, or if all are zero: the limit then holds, as the shortfall check passed)."""
    values, offset = _shifted(problem, ok, r)
    scale = float(values.max())
    if limit is None or scale <= 0:
        return []
    cols = [j for j in range(len(values)) if values[j] > 0]
    upper = float((Fraction(limit) - offset) / Fraction(scale))
    return [(cols, [float(values[j] / scale) for j in cols], -np.inf, upper)]


def _csc(cost: np.ndarray, upper: np.ndarray, rows: list[_Row]) -> MilpProblem:
    """Rows as (columns, coefficients, lower, upper) -> the facade's column-wise matrix."""
    cols = np.array([c for cs, _, _, _ in rows for c in cs], dtype=np.int64)
    vals = np.array([v for _, vs, _, _ in rows for v in vs], dtype=np.float64)
    row_of = np.array([i for i, (cs, _, _, _) in enumerate(rows) for _ in cs], dtype=np.int64)
    order = np.lexsort((row_of, cols))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=len(cost)))])
    return MilpProblem(
        c=cost,
        lower=np.zeros(len(cost)),
        upper=upper,
        integrality=np.ones(len(cost), dtype=np.int64),
        a_data=vals[order],
        a_indices=row_of[order],
        a_indptr=indptr,
        row_lower=np.array([lo for _, _, lo, _ in rows]),
        row_upper=np.array([up for _, _, _, up in rows]),
    )
