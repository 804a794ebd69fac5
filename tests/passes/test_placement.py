"""The placement pass: budgets held, copies around every use, counts spread evenly, honest refusals."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memplan
from memplan.errors import InfeasibleBudget
from memplan.ir.graph import Role
from memplan.passes.placement_model import spread
from memplan.plans.verify import verify_plan


def _plan(budget: int | str, gen: int = 6, hardware: str = "cpu", **kw: object) -> memplan.Plan:
    return memplan.plan("zoo:gpt2-tiny", mode="infer", budget=budget, hardware=hardware, batch=2, seq=16,
                        gen=gen, **kw)  # type: ignore[arg-type]  # fmt: skip


def _placement(plan: memplan.Plan) -> Any:
    return next(p for p in plan.passes if p.name == "placement")


def _weights(plan: memplan.Plan) -> int:
    return sum(v.size_bytes for v in plan.tensors if v.role == Role.PARAMETER and v.alias_of is None)


@pytest.fixture(scope="module")
def roomy() -> memplan.Plan:
    return _plan("1GiB")


def test_ample_budget_keeps_everything_on_the_device(roomy: memplan.Plan) -> None:
    assert roomy.decisions.placement is not None and roomy.decisions.placement.tensors == ()
    report = next(p for p in roomy.passes if p.name == "placement")
    assert report.solver.status == "optimal"
    assert not [e for e in roomy.events if e.kind == "prefetch"]


MIN_BYTES = 629_632
"""The least device budget gpt2-tiny's generation (batch 2, prompt 16, gen 6) can be placed in."""


@pytest.mark.parametrize("share", [0.6, 0.3, 0.0])
def test_tight_budget_streams_and_holds(roomy: memplan.Plan, share: float) -> None:
    budget = MIN_BYTES + int((roomy.predictions.peak_bytes["device"] - MIN_BYTES) * share)
    plan = _plan(budget)
    assert plan.predictions.peak_bytes["device"] <= budget
    assert verify_plan(plan).ok
    placed = plan.decisions.placement
    assert placed is not None and placed.tensors
    graph = plan.graph()
    for p in placed.tensors:
        assert p.tier == "ssd"
        for use in graph.consumers(p.value_id):
            assert any(c.prefetch_step <= use <= c.evict_step for c in p.copies), (p.value_id, use)
    assert set(plan.offsets["ssd"]) == {p.value_id for p in placed.tensors}
    assert plan.predictions.time_s > roomy.predictions.time_s


def test_more_budget_is_never_slower(roomy: memplan.Plan) -> None:
    peak = roomy.predictions.peak_bytes["device"]
    times = [_placement(_plan(int(MIN_BYTES + (peak - MIN_BYTES) * f))).solver.objective for f in (0, 0.5, 1)]
    assert all(a >= b - 1e-12 for a, b in zip(times, times[1:]))


def test_too_small_budget_is_refused_with_the_numbers() -> None:
    with pytest.raises(InfeasibleBudget) as e:
        _plan(64 * 1024)
    msg = str(e.value)
    assert "transformer.h.0 (one of 2 alike)" in msg and "activations and workspaces" in msg
    assert "at least 614.88 KiB" in msg and e.value.lower_bound_bytes == MIN_BYTES
    with pytest.raises(InfeasibleBudget):
        _plan(MIN_BYTES - 1)


def test_a_small_ssd_budget_raises_the_device_minimum() -> None:
    with pytest.raises(InfeasibleBudget, match="the weights the other tiers \\(ssd 8.00 KiB\\) cannot take"):
        _plan({"device": "300KiB", "ssd": "8KiB"})


def test_single_forward_plans_are_left_alone() -> None:
    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", budget="1GiB", batch=2, seq=16)
    assert [p.name for p in plan.passes] == ["baseline", "allocate"] and plan.decisions.placement is None


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["device", "host", "ssd"]), st.integers(0, 20), min_size=1))
def test_spread_keeps_counts_and_spreads_evenly(counts: dict[str, int]) -> None:
    tiers = spread(counts)
    assert len(tiers) == sum(counts.values())
    for tier, n in counts.items():
        assert tiers.count(tier) == n
        positions = [i for i, t in enumerate(tiers) if t == tier]
        gaps = [b - a for a, b in zip(positions, positions[1:])]
        if gaps:  # evenly: gaps differ by at most what the other tiers' interleaving adds
            assert max(gaps) <= -(-len(tiers) // n) + 1


def test_joint_bits_and_tiers() -> None:
    """With candidates, bits and tiers are chosen together: within the sensitivity limit and the budget,
    never slower than the bits-blind plan, and the plan's bits decision prices the quantized bytes."""
    import torch

    from memplan.passes.placement import PlacementOptions
    from memplan.planner.bits_candidates import quantization_candidates
    from memplan.zoo import catalog

    model = catalog.get("gpt2-tiny").build(device="cpu")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = memplan.plan(model, ids, mode="infer", budget=MIN_BYTES, gen=6)
    cands = quantization_candidates(plain, model)
    limit = 0.5 * sum(max(c.cost for c in cs) for cs in cands.values())
    opts = PlacementOptions(bits_candidates=cands, sensitivity_limit=limit)
    joint = memplan.plan(model, ids, mode="infer", budget=MIN_BYTES, gen=6, options={"placement": opts})
    assert joint.decisions.bits is not None and joint.decisions.bits.tensors
    chosen = {b.value_id: b for b in joint.decisions.bits.tensors}
    spent = sum(next(c.cost for c in cands[v] if c.bits == b) for v, b in chosen.items())
    assert spent <= limit * (1 + 1e-9)
    assert joint.predictions.peak_bytes["device"] <= MIN_BYTES and verify_plan(joint).ok
    assert _placement(joint).solver.objective <= _placement(plain).solver.objective + 1e-12
    graph = joint.graph()
    assert all(graph.value(v).size_bytes == b.stored_bytes(graph.value(v).shape) for v, b in chosen.items())
    with pytest.raises(InfeasibleBudget, match="within the sensitivity limit"):
        strict = PlacementOptions(bits_candidates=cands, sensitivity_limit=0.0)
        memplan.plan(model, ids, mode="infer", budget=400_000, gen=6, options={"placement": strict})
