"""Exact search and portfolio on hand-built tight problems and on MiniMalloc's challenging instances."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from memplan.solvers.packing import Problem, Status, make_buffer, max_load, solve, validate
from memplan.solvers.packing.csv_format import read
from memplan.solvers.packing.greedy import best_greedy
from memplan.solvers.packing.search import Outcome, SearchParams, search

DATA = Path(__file__).resolve().parents[1] / "data" / "minimalloc"

# Five buffers with a max load of 8, packable at height 8, where every greedy ordering needs 10
# (found by a random search against the exact search, then checked by hand).
TIGHT = Problem((
    make_buffer("a", [(5, 6)], 4), make_buffer("b", [(3, 6)], 3), make_buffer("c", [(0, 1)], 4),
    make_buffer("d", [(1, 4)], 2), make_buffer("e", [(0, 4)], 3),
))
OPT = 8


def test_search_finds_tight_packing() -> None:
    res = search(TIGHT, OPT, 5.0)
    assert res.outcome is Outcome.FOUND and res.offsets_bytes is not None
    assert validate(Problem(TIGHT.buffers, OPT), res.offsets_bytes) == []


def test_search_proves_infeasible_below_the_optimum() -> None:
    assert search(TIGHT, OPT - 1, 5.0).outcome is Outcome.INFEASIBLE


def test_portfolio_reports_infeasible_with_a_bound() -> None:
    sol = solve(TIGHT, 5.0, capacity=OPT - 1)
    assert sol.status is Status.INFEASIBLE and sol.lower_bound_bytes == OPT


def test_max_load_above_capacity_is_infeasible_at_once() -> None:
    sol = solve(TIGHT, 5.0, capacity=OPT - 2)
    assert sol.status is Status.INFEASIBLE and sol.offsets_bytes is None and sol.solver == "max-load"


def test_timeout_without_solution() -> None:
    problem, _ = read(DATA / "J.1048576.csv", 1048576)
    sol = solve(problem, 0.05)  # greedy alone cannot fit this instance
    assert sol.status is Status.TIMEOUT
    assert sol.height_bytes is not None and sol.height_bytes > 1048576  # still the lowest packing found


@pytest.mark.parametrize("name", ["F", "G", "J"])
def test_challenging_instances_fit_the_capacity(name: str) -> None:
    problem, _ = read(DATA / f"{name}.1048576.csv", 1048576)
    assert best_greedy(problem).height_bytes > 1048576  # greedy alone does not fit them
    sol = solve(problem, 20.0)
    assert sol.status in (Status.OPTIMAL, Status.FEASIBLE), sol
    assert validate(problem, sol.offsets_bytes) == []
    assert max_load(problem) <= sol.height_bytes <= 1048576


OFF = SearchParams(canonical_only=False, dominance=False, section_inference=False, unallocated_floor=False,
                   symmetry=False, dynamic_decomposition=False, hatless_pruning=False, dynamic_preorder=False,
                   preorderings=("A",))


def test_every_technique_can_be_switched_off() -> None:
    res = search(TIGHT, OPT, 5.0, OFF)
    assert res.outcome is Outcome.FOUND and validate(Problem(TIGHT.buffers, OPT), res.offsets_bytes) == []
    assert search(TIGHT, OPT - 1, 5.0, OFF).outcome is Outcome.INFEASIBLE


def _random_problem(rng: random.Random, n: int) -> Problem:
    bufs = []
    for i in range(n):
        lo = rng.randrange(0, 12)
        bufs.append(make_buffer(f"b{i}", [(lo, lo + rng.randrange(1, 6))], rng.randrange(1, 9)))
    return Problem(tuple(bufs), None, rng.choice([1, 1, 2]))


@pytest.mark.parametrize("params", [SearchParams(), SearchParams(dynamic_preorder=False),
                                    SearchParams(hatless_pruning=False, dynamic_preorder_max=0),
                                    SearchParams(parallel=True, parallel_min_buffers=0)],
                         ids=["default", "static-preorder", "no-hatless", "race"])
def test_every_setting_agrees_with_the_plain_search(params: SearchParams) -> None:
    """Complete searches must agree on found / infeasible; every packing must be valid (seeded instances,
    capacities around the max load, where pruning matters most)."""
    rng = random.Random(7)
    for _ in range(25):
        problem = _random_problem(rng, rng.randrange(2, 10))
        cap = max_load(problem) + rng.randrange(0, 4)
        res, ref = search(problem, cap, 5.0, params), search(problem, cap, 5.0, OFF)
        assert res.outcome is ref.outcome, (problem, cap)
        if res.offsets_bytes is not None:
            assert validate(Problem(problem.buffers, cap, problem.alignment_bytes), res.offsets_bytes) == []


def test_race_returns_the_first_answer_and_proves_infeasibility() -> None:
    race = SearchParams(parallel=True, parallel_min_buffers=0)
    res = search(TIGHT, OPT, 5.0, race)
    assert res.outcome is Outcome.FOUND and validate(Problem(TIGHT.buffers, OPT), res.offsets_bytes) == []
    assert search(TIGHT, OPT - 1, 5.0, race).outcome is Outcome.INFEASIBLE


def test_minimise_reaches_the_optimum_and_says_so() -> None:
    assert best_greedy(TIGHT).height_bytes > OPT
    sol = solve(TIGHT, 5.0)
    assert sol.height_bytes == OPT == sol.lower_bound_bytes and sol.status is Status.OPTIMAL
    assert sol.solver == "exact"
