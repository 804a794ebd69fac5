"""The region decomposition: crossing sets, cuts by dynamic programming, the pinned subproblem, and stitched
schedules that the checker accepts within the budget on random layered DAGs (where the greedy pass finds
none), within the time limit."""

from __future__ import annotations

import time

from bench.checkmate import layered
from memplan.solvers.remat_dag import RematProblem, RematResult, best_greedy, check, events, no_remat_peak
from memplan.solvers.remat_regions import crossing, cuts, region, solve_regions, subproblem
from tests.solvers.test_remat_dag import dag


def assert_valid(p: RematProblem, budget: int, res: RematResult) -> None:
    assert res.schedule is not None and res.objective is not None
    report = check(p, events(p, res.schedule), budget)
    assert report.ok, report.violations
    assert report.peak_bytes <= budget and report.cost == res.objective
    assert sum(p.cost) <= res.bound <= res.objective


def test_crossing_sets_and_cuts() -> None:
    """A chain 0 -> 1 -> ... with a skip 1 -> 4: X(c) holds c - 1, and 1 until node 4 has run."""
    p = dag([1.0] * 6, [10] * 6, [(), (0,), (1,), (2,), (1, 3), (4,)])
    assert crossing(p) == [frozenset(), {0}, {1}, {1, 2}, {1, 3}, {4}, frozenset()]
    plan = cuts(p, 100, min_nodes=2, max_nodes=3)
    assert plan is not None and plan[0] == 0 and plan[-1] == 6
    assert all(2 <= b - a <= 3 for a, b in zip(plan, plan[1:-1], strict=False))
    assert 3 not in (cuts(p, 100, 0, frozenset({3}), 2, 3) or [3])  # a banned cut is avoided
    assert cuts(p, 100, 0, frozenset({2, 3, 4}), 2, 3) is None  # no way round


def test_subproblem_pins_the_boundary() -> None:
    """Region [2, 5) of the skip chain: externals 1 (read by 2 and 4) first, with no inputs and no cost; the
    sink reads the handover X(5) = {4}."""
    p = dag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [10] * 6, [(), (0,), (1,), (2,), (1, 3), (4,)])
    reg = region(p, crossing(p), 2, 5)
    assert reg.externals == (1,) and reg.passing == frozenset() and reg.handover == (4,)
    sub, orig = subproblem(p, reg)
    assert orig == [1, 2, 3, 4, -1]
    assert sub.preds == ((), (0,), (1,), (0, 2), (3,)) and sub.cost == (0.0, 3.0, 4.0, 5.0, 0.0)
    assert sub.size[-1] == 0


def test_random_layered_250_nodes_get_a_valid_schedule_in_time() -> None:
    """250 nodes in layers of 5, each reading 1-3 nodes of the two layers before, at 0.8x of the peak: every
    greedy eviction order gives up, and the decomposition's stitched schedule passes the checker in 20 s."""
    p = layered(250, seed=0)
    budget = int(0.8 * no_remat_peak(p))
    assert best_greedy(p, budget) is None
    t0 = time.perf_counter()
    res = solve_regions(p, budget, 20.0)
    assert time.perf_counter() - t0 < 25.0
    assert res.status == "feasible" and res.solver == "regions"
    assert_valid(p, budget, res)
    assert res.objective < 1.1 * sum(p.cost)


def test_stitched_schedules_of_small_layered_graphs_are_valid() -> None:
    """Short regions force many cuts; whatever comes back passes the checker (or is no schedule)."""
    found = 0
    for seed in range(4):
        p = layered(40, seed=seed)
        budget = int(0.9 * no_remat_peak(p))
        res = solve_regions(p, budget, 5.0, max_nodes=8)
        if res.schedule is None:
            assert res.status == "timeout"
            continue
        assert_valid(p, budget, res)
        found += 1
    assert found >= 2
