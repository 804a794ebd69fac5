"""Pure recomputation on DAGs: the checker, the greedy pass and the Checkmate MILP against a brute force over
every stage-model schedule of tiny DAGs (hand-made ones with a known optimum, then random ones)."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memplan.errors import InvalidInput
from memplan.planner.commands import remat_cmd
from memplan.solvers.checkmate_milp import formulate, milp_columns, solve_checkmate
from memplan.solvers.remat_dag import (
    MAX_UNITS,
    CostScale,
    RematProblem,
    Schedule,
    check,
    cost_scale,
    events,
    greedy_schedule,
    judge,
    no_remat_peak,
    no_remat_schedule,
    working_set_bound,
)
from memplan.solvers.remat_solve import solve


def dag(cost: list[float], size: list[int], preds: list[tuple[int, ...]]) -> RematProblem:
    return RematProblem(tuple(f"n{i}" for i in range(len(cost))), tuple(cost), tuple(size), tuple(preds))


def chain(n: int, size: int = 10, cost: float = 1.0) -> RematProblem:
    return dag([cost] * n, [size] * n, [()] + [(i - 1,) for i in range(1, n)])


def stage_peak(p: RematProblem, keep: frozenset[int], comp: tuple[int, ...], nxt: frozenset[int]) -> int:
    """Bytes of the stage model, written out independently of the solver: drop unused checkpoints, then
    after each compute count the resident bytes and free what the rest of the stage does not read."""
    used = {i for k in comp for i in p.preds[k]}
    resident = {i for i in keep if i in used or i in nxt}
    peak = 0
    for pos, k in enumerate(comp):
        resident.add(k)
        peak = max(peak, sum(p.size[i] for i in resident))
        later = {i for j in comp[pos + 1:] for i in p.preds[j]}
        resident -= {i for i in (*p.preds[k], k) if i not in later and i not in nxt}
    return peak


def brute_force(p: RematProblem, budget: int) -> float | None:
    """Least total compute over every stage-model schedule (dynamic programming over the checkpoint set)."""
    best: dict[frozenset[int], float] = {frozenset(): 0.0}
    for t in range(p.n):
        nxt_best: dict[frozenset[int], float] = {}
        for keep, c in best.items():
            for extra in _subsets(range(t)):
                comp = tuple(sorted({*extra, t}))
                if any(i not in keep and i not in comp for k in comp for i in p.preds[k]):
                    continue
                for nxt in map(frozenset, _subsets(sorted(keep | set(comp)))):
                    if stage_peak(p, keep, comp, nxt) <= budget:
                        total = c + sum(p.cost[i] for i in comp)
                        nxt_best[nxt] = min(nxt_best.get(nxt, float("inf")), total)
        best = nxt_best
    return min(best.values()) if best else None


def _subsets(items: range | list[int]) -> list[tuple[int, ...]]:
    xs = list(items)
    return [c for r in range(len(xs) + 1) for c in itertools.combinations(xs, r)]


def test_no_remat_schedule_is_valid_and_its_peak_is_the_live_sum() -> None:
    p = chain(5, size=10)
    report = check(p, events(p, no_remat_schedule(p)))
    assert report.ok and report.cost == 5.0
    assert report.peak_bytes == 20 == no_remat_peak(p)  # a chain holds an input and an output


def test_checker_finds_each_violation() -> None:
    p = chain(3)
    assert "without its inputs" in check(p, [("compute", 1)]).violations[0]
    assert "not resident" in check(p, [("free", 0)]).violations[0]
    assert any("never computed" in v for v in check(p, [("compute", 0)]).violations)
    over = check(p, [("compute", 0), ("compute", 1)], budget=15)
    assert "over the budget 15" in over.violations[0] and over.peak_bytes == 20


def test_diamond_needs_one_recompute() -> None:
    """a -> b, a -> c, (b, c) -> d with a held by the time d runs: at a tight budget the best schedule frees a
    after b and recomputes it for c (cost 1) rather than holding a, b and c together."""
    p = dag([1, 5, 5, 1], [10, 10, 10, 10], [(), (0,), (0,), (1, 2)])
    assert no_remat_peak(p) == 30
    assert brute_force(p, 30) == 12.0
    assert brute_force(p, 29) is None  # b, c and d all need to be live at d: 30 bytes at least
    res = solve(p, 30, time_limit_s=10)
    assert res.status == "optimal" and res.objective == 12.0


def test_chain_at_a_tight_budget_recomputes_from_checkpoints() -> None:
    """A chain fits in two outputs without recompute; a skip edge 0 -> 4 holds node 0 through the chain
    (peak 30), and at 21 bytes node 0 must be dropped and rebuilt once for node 4 (cost 5 + 1)."""
    p = chain(6, size=10)
    assert brute_force(p, 20) == 6.0 and solve(p, 20, time_limit_s=10).objective == 6.0
    skip = dag([1] * 5, [10, 10, 10, 10, 1], [(), (0,), (1,), (2,), (0, 3)])
    assert no_remat_peak(skip) == 30 and working_set_bound(skip) == 21
    assert brute_force(skip, 21) == 6.0
    res = solve(skip, 21, time_limit_s=10)
    assert res.status == "optimal" and res.objective == 6.0


def test_budget_below_working_set_is_refused() -> None:
    p = dag([1, 1, 1], [10, 20, 5], [(), (0,), (0, 1)])
    assert working_set_bound(p) == 35
    with pytest.raises(InvalidInput, match="at least 35 bytes"):
        solve(p, 34)


def test_milp_size_is_lower_triangular() -> None:
    p = chain(4)
    milp, ix = formulate(p, 100)
    assert ix.cols == 10 + 6 + 10 + len(ix.free)
    assert len(milp.c) == ix.cols == milp_columns(p) and milp.lower[ix.r(3, 3)] == 1.0
    skipped = solve_checkmate(p, 100, 5.0, max_columns=ix.cols - 1)
    assert skipped.status == "skipped" and skipped.schedule is None and "skipped:" in skipped.solver


def test_greedy_gives_up_only_when_it_cannot_fit() -> None:
    p = chain(8, size=10)
    sched = greedy_schedule(p, 20)
    assert sched is not None and check(p, events(p, sched), 20).ok
    assert isinstance(sched, Schedule) and sched.cost(p) == 8.0


@st.composite
def tiny_dags(draw: st.DrawFn) -> tuple[RematProblem, float]:
    n = draw(st.integers(2, 6))
    preds = [()] + [tuple(sorted(draw(st.sets(st.integers(0, i - 1), max_size=2)))) for i in range(1, n)]
    size = draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    cost = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    return dag([float(c) for c in cost], size, preds), draw(st.floats(0.5, 1.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_dags())
def test_random_tiny_dags_against_brute_force(case: tuple[RematProblem, float]) -> None:
    p, fraction = case
    budget = max(int(fraction * no_remat_peak(p)), working_set_bound(p))
    want = brute_force(p, budget)
    exact = solve_checkmate(p, budget, 10.0, mip_rel_gap=1e-9)
    for result in (exact, solve(p, budget, 10.0, method="greedy")):
        if result.schedule is None:
            assert result.status in ("infeasible", "timeout")
            if result.status == "infeasible":
                assert want is None
            continue
        report = check(p, events(p, result.schedule), budget)
        assert report.ok, report.violations
        assert report.peak_bytes <= budget and report.cost == pytest.approx(result.objective)
        assert want is not None and result.objective >= want - 1e-9
        assert result.bound <= want + 1e-6
        if result.status == "optimal":
            assert result.objective == pytest.approx(want)
    assert exact.status == ("infeasible" if want is None else "optimal")


@pytest.mark.parametrize("method, solver", [("auto", ""), ("cpsat", "moccasin-cpsat")])
def test_cli_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, solver: str
) -> None:
    """`memplan remat graph.json --budget-fraction F [--method M]`: the skip DAG of the chain test, as
    node-link JSON."""
    nodes = [{"id": f"n{i}", "cost": 1, "size": s} for i, s in enumerate([10, 10, 10, 10, 1])]
    links = [{"source": f"n{a}", "target": f"n{b}"} for a, b in [(0, 1), (1, 2), (2, 3), (0, 4), (3, 4)]]
    path = tmp_path / "skip.json"
    path.write_text(json.dumps({"directed": True, "nodes": nodes, "links": links}))
    ap = argparse.ArgumentParser()
    remat_cmd.register(ap.add_subparsers())
    args = ap.parse_args(
        ["remat", str(path), "--budget-fraction", "0.7", "--timeout", "5", "--method", method]
    )
    assert remat_cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "optimal" in out and "21" in out and "+20.00%" in out  # budget int(0.7 * 30), one recompute of 5
    assert solver in out
    low = ap.parse_args(["remat", str(path), "--budget", "20"])
    with pytest.raises(InvalidInput, match="at least 21 bytes"):
        remat_cmd.run(low)


def test_cost_scale_is_the_exact_gcd_while_the_grid_is_coarse_enough() -> None:
    assert cost_scale(dag([6.0, 4.0, 0.0], [1] * 3, [()] * 3)) == CostScale(2.0, True)
    assert cost_scale(dag([0.75, 0.5], [1] * 2, [()] * 2)) == CostScale(0.25, True)
    assert cost_scale(dag([2e12 + 3e6, 2e12 + 1e6], [1] * 2, [()] * 2)) == CostScale(1e6, True)
    fine = cost_scale(dag([2e12 + 3, 2e12 + 1], [1] * 2, [()] * 2))  # gcd 1: 4e12 units, too many
    assert not fine.exact and fine.unit == pytest.approx(4e12 / MAX_UNITS) and fine.tolerance == fine.unit / 2
    assert judge(10.0, 10.0, CostScale(1.0, True)) == ("optimal", 0.0)
    assert judge(11.0, 10.0, CostScale(1.0, True)) == ("feasible", pytest.approx(1 / 11))
    assert CostScale(2.0, True).round_bound(7.1) == 8.0 and CostScale(2.0, False).round_bound(7.1) == 7.1


@st.composite
def huge_cost_dags(draw: st.DrawFn) -> tuple[RematProblem, float]:
    """Tiny DAGs whose costs are 2e12 each plus multiples of 1e6 (and, half the time, a few units more, so
    that their gcd is 1): a 1e13 total whose schedules differ by 1e-7 of it, as in a network's FLOPs."""
    p, fraction = draw(tiny_dags())
    steps = draw(st.lists(st.integers(0, 9), min_size=p.n, max_size=p.n))
    jitter = draw(st.lists(st.integers(0, 9), min_size=p.n, max_size=p.n)) if draw(st.booleans()) else []
    cost = [2e12 + 1e6 * k + (jitter[i] if jitter else 0) for i, k in enumerate(steps)]
    return dag(cost, list(p.size), list(p.preds)), fraction


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(huge_cost_dags())
@example((dag([2e12, 2000004000007.0], [1, 1], [(), ()]), 1.0))  # HiGHS's bound, in units, 5e-4 above
def test_huge_costs_solved_to_the_true_optimum(case: tuple[RematProblem, float]) -> None:
    """Normalising the costs by their sum (1e13) let HiGHS's gaps swallow differences of 1e6 and report a
    worse schedule as optimal: now every optimal status is the brute force's optimum, within the tolerance
    (0 on the 1e6 grid, half of 1.2e13 / 1e8 units otherwise)."""
    p, fraction = case
    budget = max(int(fraction * no_remat_peak(p)), working_set_bound(p))
    want = brute_force(p, budget)
    for res in (solve_checkmate(p, budget, 10.0), solve(p, budget, 10.0)):
        if want is None:
            assert res.schedule is None
            continue
        assert res.status == "optimal" and res.schedule is not None and res.objective is not None
        assert check(p, events(p, res.schedule), budget).ok
        assert want <= res.objective <= want + res.tolerance and res.bound <= want
        assert res.objective == res.schedule.cost(p)
        if cost_scale(p).exact:
            assert res.objective == want and res.tolerance == 0.5 * cost_scale(p).unit
