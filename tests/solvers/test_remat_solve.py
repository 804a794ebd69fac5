"""`remat_solve.solve`: statuses as documented (optimal only within the tolerance of a proven bound, feasible
with its gap, skipped for a MILP not run, timeout for a run that found nothing), the pipeline on a random
layered graph, and the `memplan remat` command's table and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.checkmate import chain, layered
from memplan.planner.commands import remat_cmd
from memplan.solvers import checkmate_milp
from memplan.solvers.remat_dag import check, events, no_remat_peak
from memplan.solvers.remat_solve import solve


def test_optimal_only_within_the_tolerance_and_feasible_with_its_gap() -> None:
    """chain-16's training graph at 0.8x: the MILP proves 246 (gap 0); CP-SAT's restricted model finds 246
    too but proves nothing, and its LP bound is below: feasible, with that gap."""
    p = chain(16)
    budget = int(0.8 * no_remat_peak(p))
    exact = solve(p, budget, 20.0, method="milp")
    assert exact.status == "optimal" and exact.objective == 246 and exact.gap == 0.0
    assert exact.objective - exact.bound <= exact.tolerance == 0.5  # integral costs: unit 1
    cp = solve(p, budget, 5.0, method="cpsat")
    assert cp.objective == 246 and cp.status == "feasible"
    assert cp.gap is not None and cp.gap == pytest.approx((246 - cp.bound) / 246) and cp.gap > 0


def test_milp_too_large_is_skipped_not_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkmate_milp, "MAX_COLUMNS", 100)
    p = chain(8)
    budget = int(0.8 * no_remat_peak(p))
    res = solve(p, budget, 5.0, method="milp")
    assert res.status == "skipped" and "skipped:" in res.solver and "> 100" in res.solver
    assert res.schedule is not None  # the greedy start is still returned, checked
    assert check(p, events(p, res.schedule), budget).ok


def test_timeout_means_it_ran_and_found_nothing() -> None:
    p = layered(250, seed=0)
    budget = int(0.8 * no_remat_peak(p))
    res = solve(p, budget, 5.0, method="greedy")
    assert res.status == "timeout" and res.schedule is None and res.objective is None
    assert res.bound == sum(p.cost)


def test_auto_on_a_random_layered_graph_of_250_nodes() -> None:
    """The greedy pass finds nothing; the decomposition does, CP-SAT starts from it; the gap is to a proven
    bound (the LP relaxation's, at least the sum of costs)."""
    p = layered(250, seed=1)
    budget = int(0.9 * no_remat_peak(p))
    res = solve(p, budget, 15.0)
    assert res.schedule is not None and res.objective is not None and res.gap is not None
    assert check(p, events(p, res.schedule), budget).ok and res.time_s < 20.0
    assert sum(p.cost) <= res.bound <= res.objective and res.status in ("feasible", "optimal")
    assert "regions" in res.solver and "cpsat" in res.solver


def skip_graph(tmp_path: Path) -> Path:
    nodes = [{"id": f"n{i}", "cost": 1, "size": s} for i, s in enumerate([10, 10, 10, 10, 1])]
    links = [{"source": f"n{a}", "target": f"n{b}"} for a, b in [(0, 1), (1, 2), (2, 3), (0, 4), (3, 4)]]
    path = tmp_path / "skip.json"
    path.write_text(json.dumps({"directed": True, "nodes": nodes, "links": links}))
    return path


def run_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    remat_cmd.register(ap.add_subparsers())
    return int(remat_cmd.run(ap.parse_args(["remat", *argv])))


def test_cli_prints_the_tolerance_and_runs_the_regions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = skip_graph(tmp_path)
    assert run_cli([str(path), "--budget-fraction", "0.7", "--timeout", "5", "--method", "regions"]) == 0
    out = capsys.readouterr().out
    assert "optimal within (cost units)" in out and "0.5" in out and "regions" in out and "optimal" in out


def test_cli_exit_code_when_the_milp_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing found and the MILP asked for not run: exit 5, status skipped (not timeout)."""
    monkeypatch.setattr(checkmate_milp, "MAX_COLUMNS", 10)
    path = tmp_path / "layered.json"
    p = layered(60, seed=0)
    nodes = [{"id": n, "cost": c, "size": s} for n, c, s in zip(p.names, p.cost, p.size, strict=True)]
    links = [{"source": p.names[i], "target": p.names[j]} for j, ps in enumerate(p.preds) for i in ps]
    path.write_text(json.dumps({"nodes": nodes, "links": links}))
    monkeypatch.setattr("memplan.solvers.remat_solve.REGION_MIN_NODES", 10**6)  # greedy, then the MILP
    code = run_cli([str(path), "--budget-fraction", "0.8", "--timeout", "5", "--method", "milp"])
    out = capsys.readouterr().out
    assert code == remat_cmd.EXIT_SKIPPED and "skipped" in out
