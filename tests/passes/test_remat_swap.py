"""The remat_swap pass on real captured training steps: budgets held in prediction, decisions consistent,
monotone in the budget, infeasible budgets refused with a bound; its options switch techniques off."""

import pytest

from memplan.errors import InfeasibleBudget
from memplan.ir.hardware import load_hardware
from memplan.ir.phases import phases
from memplan.passes.baseline import baseline_plan
from memplan.passes.remat_candidates import find_candidates
from memplan.passes.remat_swap import RematSwapOptions, run
from memplan.planner.models import capture, load_model
from memplan.plans.plan import Workload
from memplan.plans.verify import verify_plan

HW = load_hardware("cpu")


@pytest.fixture(scope="module")
def graph():
    loaded = load_model("zoo:gpt2-tiny", "train", batch=4, seq=64)
    return capture(loaded, "train")[0]


def _plan(graph, budget, **opts):
    base = baseline_plan(
        graph, HW, Workload("train", 4, 64), {"device": budget, "ssd": 2**36}, "zoo:gpt2-tiny"
    )
    return run(graph, HW, base, RematSwapOptions(**opts)).plan, base


def _peak(plan):
    return plan.predictions.peak_bytes["device"]


def test_candidates_are_saved_activations(graph):
    ph, cands = find_candidates(graph, HW, HW.tier("ssd"))
    assert 0 < ph.fwd_end < ph.bwd_end <= len(graph.ops)
    assert cands
    for c in cands:
        assert c.produced < ph.fwd_end <= c.first_bwd_use <= c.last_use
        assert c.last_fwd_use < c.first_bwd_use
        assert all(i < ph.fwd_end for i in c.recompute_ops)
    assert phases(graph) == ph


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5])
@pytest.mark.parametrize("opts", [{}, {"allow_swap": False}, {"allow_recompute": False}])
def test_budget_held_and_plan_valid(graph, fraction, opts):
    _, base = _plan(graph, 2**40)
    budget = int(base.predictions.peak_bytes["device"] * fraction)
    try:
        plan, _ = _plan(graph, budget, **opts)
    except InfeasibleBudget as e:
        assert opts and e.lower_bound_bytes > budget  # only a restricted pass may run out of options
        return
    assert _peak(plan) <= budget
    report = verify_plan(plan)
    assert report.ok, report.violations[:3]
    decisions = {t.decision for t in plan.decisions.remat.tensors}
    if opts.get("allow_swap") is False:
        assert "swap" not in decisions
    if opts.get("allow_recompute") is False:
        assert "recompute" not in decisions
    assert plan.predictions.time_s >= base.predictions.time_s


def test_peak_monotone_in_budget(graph):
    _, base = _plan(graph, 2**40)
    peaks = [
        _peak(_plan(graph, int(base.predictions.peak_bytes["device"] * f))[0]) for f in (0.9, 0.75, 0.6, 0.45)
    ]
    assert peaks == sorted(peaks, reverse=True)


def test_solver_report(graph):
    _, base = _plan(graph, 2**40)
    budget = int(base.predictions.peak_bytes["device"] * 0.6)
    out = run(graph, HW, base.with_(budget_bytes={**base.budget_bytes, "device": budget}), RematSwapOptions())
    s = out.report.solver
    assert s.solver == "highs-milp" and s.status in ("optimal", "feasible")
    assert s.time_limit_s == 30.0 and s.time_s <= s.time_limit_s + 1
    assert s.bound is not None and s.objective is not None and s.objective >= s.bound - 1e-9


def test_nothing_to_do_within_budget(graph):
    plan, base = _plan(graph, 2**40)
    assert plan.residency == base.residency


def test_infeasible_names_a_bound(graph):
    with pytest.raises(InfeasibleBudget, match="Raise the budget to at least") as err:
        _plan(graph, 64 * 1024)
    assert err.value.lower_bound_bytes > 64 * 1024 and err.value.tensors


def test_per_layer_formulation_shares_decisions(graph):
    _, base = _plan(graph, 2**40)
    plan, _ = _plan(graph, int(base.predictions.peak_bytes["device"] * 0.7), per_layer=True)
    assert _peak(plan) <= int(base.predictions.peak_bytes["device"] * 0.7)
    by_sig = {}
    _, cands = find_candidates(graph, HW, HW.tier("ssd"))
    decided = {t.value_id: t.decision for t in plan.decisions.remat.tensors}
    for c in cands:
        if c.layer is not None:
            by_sig.setdefault(c.signature, set()).add(decided[c.value_id])
    assert by_sig and all(len(d) == 1 for d in by_sig.values())


def test_measured_compute_share_prices_swaps(graph):
    """A tier whose transfers barely slow compute (`compute_share` from `memplan calibrate`) makes swaps
    cheaper than the cpu preset's default (copies take all their time from compute): more swapping, and a
    faster predicted step at the same budget."""
    from dataclasses import replace

    _, base = _plan(graph, 2**40)
    budget = int(base.predictions.peak_bytes["device"] * 0.6)
    cheap_hw = replace(
        HW, tiers=tuple(replace(t, compute_share=0.05) if t.name == "ssd" else t for t in HW.tiers)
    )
    start = baseline_plan(graph, cheap_hw, Workload("train", 4, 64), {"device": budget, "ssd": 2**36}, "x")
    cheap = run(graph, cheap_hw, start).plan
    dear, _ = _plan(graph, budget)

    def swapped(plan):
        return sum(t.decision in ("swap", "split") for t in plan.decisions.remat.tensors)

    assert swapped(cheap) > swapped(dear)
    assert cheap.predictions.time_s < dear.predictions.time_s


def test_no_plan_in_time_falls_back_to_the_lowest_peak_plan(graph, monkeypatch):
    """The time MILP stops without any plan (a tiny feasible set, a short limit): the lowest-peak MILP's
    plan fits the budget, so it starts a second solve instead of an InfeasibleBudget being raised."""
    import memplan.passes.remat_diagnose as rd
    import memplan.passes.remat_swap as rs
    from memplan.solvers.milp import MilpResult

    real, calls = rs.solve_milp, []

    def first_times_out(problem, time_limit_s, gap=1e-4, start=None):
        calls.append(start is not None)
        if len(calls) == 1:
            return MilpResult("timeout", None, None, None, None, time_limit_s, time_limit_s)
        return real(problem, time_limit_s, gap, start=start)

    monkeypatch.setattr(rs, "solve_milp", first_times_out)
    monkeypatch.setattr(rd, "solve_milp", first_times_out)  # the lowest-peak MILP
    _, base = _plan(graph, 2**40)
    budget = int(base.predictions.peak_bytes["device"] * 0.7)
    plan, _ = _plan(graph, budget)
    assert calls == [False, False, True]  # timed out; lowest peak; the time MILP again, from that start
    assert _peak(plan) <= budget and verify_plan(plan).ok


def test_unproved_lowest_peak_is_not_called_infeasible(graph, monkeypatch):
    """When the min-peak MILP stops before proving its answer, the error gives what was found and the
    solver's bound, never "proved infeasible"."""
    from memplan.passes import remat_diagnose
    from memplan.solvers.milp import MilpResult

    real = remat_diagnose.solve_milp

    def stopped(problem, time_limit_s, gap, start=None):  # what HiGHS returns at its time limit
        r = real(problem, time_limit_s, gap)
        return MilpResult("feasible", r.x, r.objective, r.objective * 0.5, 1.0, r.time_s, time_limit_s)

    monkeypatch.setattr(remat_diagnose, "solve_milp", stopped)
    _, base = _plan(graph, 2**40)
    budget = int(base.predictions.peak_bytes["device"] * 0.2)
    with pytest.raises(InfeasibleBudget) as info:
        _plan(graph, budget)
    text = str(info.value)
    assert "proved" not in text and "Lowest found" in text and "proven lower bound" in text
    assert "undecided" in text
    assert info.value.lower_bound_bytes < info.value.reachable_bytes
