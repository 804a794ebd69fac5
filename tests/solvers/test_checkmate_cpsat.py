"""Moccasin's CP-SAT model of pure recomputation: its schedules pass the checker within the budget, the exact
model (a copy per stage) agrees with the Checkmate MILP and a brute force, the restricted one never does worse
than its greedy hint, the time limit holds; and the greedy warm start of the MILP."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings

from bench.checkmate import chain, unet
from memplan.errors import InvalidInput
from memplan.solvers.checkmate_cpsat import (
    build,
    copy_counts,
    exact_counts,
    hint_intervals,
    serve_literals,
    solve_cpsat,
)
from memplan.solvers.checkmate_milp import formulate, lp_bound, milp_columns, solve_checkmate, start_vector
from memplan.solvers.remat_dag import (
    RematProblem,
    RematResult,
    best_greedy,
    check,
    cost_scale,
    events,
    no_remat_peak,
    working_set_bound,
)
from memplan.solvers.remat_solve import AUTO_MILP_COLUMNS, solve
from tests.solvers.test_remat_dag import brute_force, dag, tiny_dags


def budget_of(p: RematProblem, fraction: float) -> int:
    return int(fraction * no_remat_peak(p))


def assert_valid(p: RematProblem, budget: int, res: RematResult) -> None:
    """The schedule replays without violation within the budget and costs what the result says."""
    assert res.schedule is not None and res.objective is not None
    report = check(p, events(p, res.schedule), budget)
    assert report.ok, report.violations
    assert report.peak_bytes <= budget and report.cost == pytest.approx(res.objective)
    assert res.bound >= sum(p.cost) and res.bound <= res.objective + 1e-9


@pytest.mark.parametrize(
    ("name", "fraction"), [("chain6", 0.9), ("chain6", 0.8), ("chain8", 0.8), ("unet2", 0.9)]
)
def test_exact_model_matches_the_milp_optimum(name: str, fraction: float) -> None:
    """Small training graphs (forward + mirrored backward): all copies, so the optimum and bound are exact;
    at chain8 0.8 both beat the greedy pass (93 against 94)."""
    p = {"chain6": chain(6), "chain8": chain(8), "unet2": unet(2)}[name]
    budget = budget_of(p, fraction)
    milp = solve_checkmate(p, budget, 10.0, mip_rel_gap=1e-9)
    assert milp.status == "optimal"
    greedy = best_greedy(p, budget)
    res = solve_cpsat(p, budget, 10.0, hint=greedy)
    assert "all copies" in res.solver and res.status == "optimal"
    assert_valid(p, budget, res)
    assert res.objective == pytest.approx(milp.objective) and res.bound == pytest.approx(res.objective)
    assert greedy is None or res.objective <= greedy.cost(p)


def test_exact_model_proves_infeasibility() -> None:
    """unet2 at its working-set bound: no node alone is over it, and still no schedule (the MILP agrees;
    CP-SAT takes 9-14 s on two shared cores, stopping once proven)."""
    p = unet(2)
    budget = working_set_bound(p)
    assert solve_checkmate(p, budget, 10.0).status == "infeasible"
    assert solve(p, budget, 10.0, method="milp").status == "infeasible"
    res = solve_cpsat(p, budget, 40.0)
    assert res.status == "infeasible" and res.schedule is None


def test_restricted_model_is_never_worse_than_its_hint_and_reports_the_lp_bound() -> None:
    """The restricted model's own bound is no bound; the LP relaxation's is, and is above the trivial one."""
    p = chain(16)
    budget = budget_of(p, 0.8)
    greedy = best_greedy(p, budget)
    assert greedy is not None
    res = solve_cpsat(p, budget, 3.0, copies=2, hint=greedy)
    assert "2 copies" in res.solver and "LP bound" in res.solver and res.status == "feasible"
    assert_valid(p, budget, res)
    lp = lp_bound(p, budget, 10.0)
    assert lp is not None and sum(p.cost) < lp <= 246  # 246: the MILP's optimum
    assert res.objective <= greedy.cost(p) and res.bound == pytest.approx(lp)


def test_copies_cover_the_hint_and_the_exact_model_only_when_small() -> None:
    p = chain(16)
    exact = exact_counts(p)
    assert copy_counts(p, None, None) == [min(2, e) for e in exact]  # 17.6k serve literals: restricted
    small = unet(2)
    assert copy_counts(small, None, None) == exact_counts(small)
    assert 0 < serve_literals(small, exact_counts(small)) < serve_literals(p, exact)
    budget = budget_of(p, 0.8)
    greedy = best_greedy(p, budget)
    assert greedy is not None
    intervals, serving = hint_intervals(p, greedy) or ([], {})
    assert sum(len(c) for c in intervals) == sum(len(s) for s in greedy.compute)
    counts = copy_counts(p, 1, intervals)
    assert all(c >= len(h) for c, h in zip(counts, intervals, strict=True))
    assert build(p, budget, counts).exact_copies is False and serving


def test_time_limit_holds_on_a_graph_of_hundreds_of_nodes() -> None:
    p = chain(150)  # 301 nodes
    budget = budget_of(p, 0.8)
    t0 = time.perf_counter()
    res = solve(p, budget, 1.0, method="cpsat")
    assert time.perf_counter() - t0 < 3.0
    assert_valid(p, budget, res)
    greedy = best_greedy(p, budget)
    assert greedy is not None and res.objective <= greedy.cost(p)


def test_auto_picks_cpsat_above_the_milp_size() -> None:
    """chain-40's training graph (81 nodes) has 18.1k MILP columns, chain-48's (97 nodes) 25.9k."""
    assert milp_columns(chain(40)) <= AUTO_MILP_COLUMNS < milp_columns(chain(48))
    big = chain(48)
    res = solve(big, budget_of(big, 0.8), 2.0)
    assert "cpsat" in res.solver
    assert_valid(big, budget_of(big, 0.8), res)


def test_budget_below_working_set_is_refused() -> None:
    p = dag([1, 1, 1], [10, 20, 5], [(), (0,), (0, 1)])
    with pytest.raises(InvalidInput, match="at least 35 bytes"):
        solve(p, 34, method="cpsat")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_dags())
def test_random_tiny_dags_against_brute_force(case: tuple[RematProblem, float]) -> None:
    p, fraction = case
    budget = max(int(fraction * no_remat_peak(p)), working_set_bound(p))
    want = brute_force(p, budget)
    res = solve_cpsat(p, budget, 10.0, hint=best_greedy(p, budget))
    if want is None:
        assert res.status == "infeasible" and res.schedule is None
        return
    assert_valid(p, budget, res)
    assert res.status == "optimal" and res.objective == pytest.approx(want)


def test_milp_warm_start_from_greedy() -> None:
    """The greedy schedule is a point of the MILP, and HiGHS keeps it as its incumbent even when the time
    limit is too short to find one of its own (chain-32's training graph, 65 nodes: none cold in 0.3 s)."""
    p = chain(32)
    budget = budget_of(p, 0.8)
    greedy = best_greedy(p, budget)
    assert greedy is not None
    milp, ix = formulate(p, budget)
    x = start_vector(p, budget, milp, ix, greedy)
    assert x is not None and float(milp.c @ x) * cost_scale(p).unit == pytest.approx(greedy.cost(p))
    warm = solve_checkmate(p, budget, 0.3, start=greedy)
    assert warm.objective is not None and warm.objective <= greedy.cost(p)
    assert_valid(p, budget, warm)
