"""The multiple-choice solver: equal to brute force on tiny random problems (any cost scale), ties, every
limit kind, infeasible limits refused with their minimum, limits held exactly, and every refusal."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memplan.errors import InvalidInput
from memplan.solvers.multiple_choice import (
    RESOURCES,
    Choice,
    ChoiceProblem,
    Layer,
    Usage,
    cost_of,
    solve_multiple_choice,
    usage_of,
)


def layer(name: str, *choices: tuple[str, float, float, float, float]) -> Layer:
    """A layer from (format, cost, size, bops, latency) tuples."""
    return Layer(name, tuple(Choice(*c) for c in choices))


def two_bit(n: int, gains: list[float], sizes: list[float]) -> tuple[Layer, ...]:
    """HAWQ-like layers: int4 costs nothing and takes `size`, int8 costs `-gain` and takes twice the size."""
    return tuple(
        layer(f"l{i}", ("int4", 0.0, s, s, s), ("int8", -g, 2 * s, 4 * s, 1.5 * s))
        for i, (g, s) in enumerate(zip(gains, sizes, strict=True))
    )


def brute_force(problem: ChoiceProblem) -> tuple[float | None, dict[str, Fraction]]:
    """The least objective over every feasible choice (None if none), and each resource's least total over
    the tie-respecting choices, by enumeration in exact arithmetic."""
    best: float | None = None
    least: dict[str, Fraction] = {}
    for choice in itertools.product(*(range(len(lay.choices)) for lay in problem.layers)):
        fmt = [lay.choices[k].format for lay, k in zip(problem.layers, choice, strict=True)]
        if any(fmt[a] != fmt[b] for a, b in problem.ties):
            continue
        used = usage_of(problem, choice)
        for r in RESOURCES:
            least[r] = min(least.get(r, used[r]), used[r])
        if all((lim := getattr(problem.limits, r)) is None or used[r] <= Fraction(lim) for r in RESOURCES):
            cost = cost_of(problem, choice)
            best = cost if best is None else min(best, cost)
    return best, least


@st.composite
def problems(draw: st.DrawFn) -> ChoiceProblem:
    """1-5 layers of 1-3 choices (formats from a, b, c), small integer costs and resources times a scale
    from 1e-7 to 1e13, random ties and a random subset of limits."""
    scale = draw(st.sampled_from([1e-7, 1.0, 1e13]))
    n = draw(st.integers(1, 5))
    layers = []
    for i in range(n):
        formats = draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True))
        layers.append(Layer(f"l{i}", tuple(
            Choice(fmt, draw(st.integers(-20, 20)) * scale,
                   *(draw(st.integers(0, 9)) * scale for _ in RESOURCES))
            for fmt in formats
        )))
    ties = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=2))
    limits = Usage(*(draw(st.one_of(st.none(), st.integers(0, 9 * n).map(lambda v: v * scale)))
                     for _ in RESOURCES))
    return ChoiceProblem(tuple(layers), tuple(ties), limits)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_equals_brute_force(problem: ChoiceProblem) -> None:
    try:
        sol = solve_multiple_choice(problem, 10.0)
    except InvalidInput as e:  # only tied layers without a common format are refused here
        assert "no format in common" in str(e)
        return
    best, least = brute_force(problem)
    if best is None:
        assert sol.status == "infeasible" and sol.choice is None
        for s in sol.shortfalls:
            assert Fraction(s.limit) < least[s.resource] and s.minimum == float(least[s.resource])
        return
    assert sol.status == "optimal" and sol.choice is not None and sol.objective is not None
    assert math.isclose(sol.objective, best, rel_tol=1e-12, abs_tol=0.0)
    assert sol.objective == cost_of(problem, sol.choice)
    assert sol.bound is not None and sol.bound <= sol.objective
    assert sol.formats is not None and all(sol.formats[a] == sol.formats[b] for a, b in problem.ties)
    used = usage_of(problem, sol.choice)
    assert all((lim := getattr(problem.limits, r)) is None or used[r] <= Fraction(lim) for r in RESOURCES)


def test_hand_example_with_ties() -> None:
    # x0 and x2 tied; each int8 adds 1 to size over 3: size <= 4.5 allows one int8, the tied pair costs two
    layers = two_bit(3, [1.0, 2.5, 2.0], [1.0, 1.0, 1.0])
    sol = solve_multiple_choice(ChoiceProblem(layers, ((0, 2),), Usage(size=4.5)), 5.0)
    assert sol.status == "optimal" and sol.formats == ("int4", "int8", "int4")
    assert sol.objective == -2.5 and sol.usage == Usage(4.0, 6.0, 3.5) and sol.gap == 0.0
    untied = solve_multiple_choice(ChoiceProblem(layers, (), Usage(size=5.0)), 5.0)
    assert untied.formats == ("int4", "int8", "int8") and untied.objective == -4.5
    tied = solve_multiple_choice(ChoiceProblem(layers, ((0, 2),), Usage(size=5.0)), 5.0)
    assert tied.formats == ("int8", "int4", "int8") and tied.objective == -3.0


@pytest.mark.parametrize(
    ("limits", "formats"),
    [
        (Usage(size=8.0), ("int8", "int4", "int8", "int4")),  # size: int8 doubles 1, 2, 1, 2
        (Usage(bops=9.0), ("int8", "int4", "int4", "int4")),  # bops: int8 quadruples
        (Usage(latency=7.0), ("int8", "int4", "int8", "int4")),
        (Usage(size=9.0), ("int8", "int8", "int4", "int4")),
        (Usage(size=9.0, bops=12.0), ("int8", "int4", "int8", "int4")),  # bops rules out the pair above
        (Usage(), ("int8",) * 4),
    ],
)
def test_every_limit_kind(limits: Usage, formats: tuple[str, ...]) -> None:
    layers = two_bit(4, [3.0, 2.0, 1.5, 1.0], [1.0, 2.0, 1.0, 2.0])
    sol = solve_multiple_choice(ChoiceProblem(layers, (), limits), 5.0)
    assert sol.status == "optimal" and sol.formats == formats
    assert sol.usage is not None
    for r in RESOURCES:
        limit = getattr(limits, r)
        assert limit is None or getattr(sol.usage, r) <= limit


def test_infeasible_limit_gives_the_minimum_with_ties() -> None:
    # l1 and l2 tied and share only int8, so the least size is 1 (l0 at int4) + 2 + 2, not 3
    layers = (
        layer("l0", ("int4", 0.0, 1.0, 0.0, 0.0), ("int8", -1.0, 2.0, 0.0, 0.0)),
        layer("l1", ("int4", 0.0, 1.0, 0.0, 0.0), ("int8", -1.0, 2.0, 0.0, 0.0)),
        layer("l2", ("int8", -1.0, 2.0, 0.0, 0.0), ("fp16", -2.0, 4.0, 0.0, 0.0)),
    )
    sol = solve_multiple_choice(ChoiceProblem(layers, ((1, 2),), Usage(size=4.5)), 5.0)
    assert sol.status == "infeasible" and sol.choice is None
    assert [(s.resource, s.limit, s.minimum) for s in sol.shortfalls] == [("size", 4.5, 5.0)]
    at_minimum = solve_multiple_choice(ChoiceProblem(layers, ((1, 2),), Usage(size=5.0)), 5.0)
    assert at_minimum.status == "optimal" and at_minimum.formats == ("int4", "int8", "int8")


def test_limits_infeasible_only_together() -> None:
    # size wants int4 on l0, latency wants int8 there (int8 is the faster kernel)
    layers = (layer("l0", ("int4", 0.0, 1.0, 0.0, 2.0), ("int8", 0.0, 2.0, 0.0, 1.0)),)
    sol = solve_multiple_choice(ChoiceProblem(layers, (), Usage(size=1.0, latency=1.0)), 5.0)
    assert sol.status == "infeasible" and sol.shortfalls == () and sol.minimum == Usage(1.0, 0.0, 1.0)


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1.0, 1e13])
def test_tiny_and_huge_costs_are_solved_exactly(scale: float) -> None:
    """Gains differ by a part in 1e4 of the cost scale, below HiGHS's default absolute gap at 1e-7."""
    gains = [scale * (1 + d) for d in (0.0, 1e-4, 2e-4, 3e-4)]
    sol = solve_multiple_choice(ChoiceProblem(two_bit(4, gains, [1.0] * 4), (), Usage(size=6.0)), 5.0)
    assert sol.formats == ("int4", "int4", "int8", "int8")
    assert sol.objective == float(-(Fraction(gains[2]) + Fraction(gains[3])))


def test_large_offsets_keep_small_differences() -> None:
    """Costs near 1e13 that differ by 1: the per-layer shift keeps the difference."""
    layers = tuple(layer(f"l{i}", ("a", 1e13 + i, 1.0, 0, 0), ("b", 1e13, 2.0, 0, 0)) for i in range(1, 4))
    sol = solve_multiple_choice(ChoiceProblem(layers, (), Usage(size=4.0)), 5.0)
    assert sol.formats == ("a", "a", "b") and sol.objective == 3e13 + 3


def test_a_limit_is_held_exactly_within_the_solvers_tolerance() -> None:
    """The cheapest choice breaks the limit by 1e-9 (relative), which HiGHS's tolerance would accept."""
    big = 1.0 + 2.0**-30
    layers = (layer("l0", ("a", 0.0, big, 0, 0), ("b", 1.0, 0.0, 0, 0)),
              layer("l1", ("a", 0.0, 1.0, 0, 0), ("b", 2.0, 0.0, 0, 0)))
    sol = solve_multiple_choice(ChoiceProblem(layers, (), Usage(size=2.0)), 5.0)
    assert sol.formats == ("b", "a") and sol.objective == 1.0
    assert sol.repairs == 1  # HiGHS (1.12) returned (a, a) within its tolerance; the cut removed it
    on_limit = solve_multiple_choice(ChoiceProblem(layers, (), Usage(size=big + 1.0)), 5.0)
    assert on_limit.formats == ("a", "a") and on_limit.repairs == 0


def test_a_single_layer_and_a_self_tie() -> None:
    layers = (layer("only", ("fp16", 0.0, 2.0, 0, 0)),)
    sol = solve_multiple_choice(ChoiceProblem(layers, ((0, 0),)), 1.0)
    assert sol.status == "optimal" and sol.formats == ("fp16",) and sol.objective == 0.0


def test_no_layers() -> None:
    sol = solve_multiple_choice(ChoiceProblem(()), 1.0)
    assert sol.status == "optimal" and sol.choice == () and sol.objective == 0.0


GOOD = two_bit(2, [1.0, 2.0], [1.0, 1.0])


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        (ChoiceProblem((Layer("empty", ()),)), r"layers\[0\] \('empty'\): has no choices"),
        (ChoiceProblem((layer("d", ("a", 0, 0, 0, 0), ("a", 1, 0, 0, 0)),)), "format names repeat"),
        (ChoiceProblem(GOOD, ((0, 2),)), r"ties\[0\] = \[0, 2\]: a layer index is out of range \(0..1\)"),
        (ChoiceProblem(GOOD, ((-1, 0),)), "out of range"),
        (ChoiceProblem((GOOD[0], layer("x", ("fp16", 0, 0, 0, 0))), ((0, 1),)), "have no format in common"),
        (ChoiceProblem((layer("n", ("a", 0, -1.0, 0, 0)),)), r"choices\[0\]\.size = -1.0: must be a finite"),
        (ChoiceProblem((layer("n", ("a", math.nan, 0, 0, 0)),)), r"choices\[0\]\.cost = nan"),
        (ChoiceProblem(GOOD, (), Usage(bops=-1.0)), r"limits\.bops = -1.0"),
        (ChoiceProblem(GOOD, (), Usage(latency=math.inf)), r"limits\.latency = inf"),
    ],
)
def test_refusals(problem: ChoiceProblem, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        solve_multiple_choice(problem, 1.0)


def test_refuses_a_bad_time_limit() -> None:
    with pytest.raises(InvalidInput, match="time limit 0"):
        solve_multiple_choice(ChoiceProblem(GOOD), 0)


def test_solution_fields() -> None:
    sol = solve_multiple_choice(ChoiceProblem(GOOD, (), Usage(size=3.0)), 2.0)
    assert sol.time_limit_s == 2.0 and 0 < sol.time_s < 2.0 and sol.choice == (0, 1)
    assert replace(sol, time_s=0.0).minimum == Usage(2.0, 2.0, 2.0)
