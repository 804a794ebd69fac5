"""The kv_budget pass and its allocation rules: budgets sum to the total, ratios in [0, 1], the byte budget
held, PrefixKV's threshold exact, honest refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memplan
from memplan.errors import InfeasibleBudget, InvalidInput
from memplan.ir.graph import Role
from memplan.passes import kv_budget
from memplan.passes.kv_budget import KVBudgetOptions, KVGeometry, fitted_group, parse_kv_budget
from memplan.passes.kv_methods import apportion, inverse_curve, prefix_ratios, pyramid_budgets, round_to_total
from memplan.plans.decisions import KVCalibration, KVHeadStats, kv_token_bytes
from memplan.plans.serialize import load_plan, save_plan
from memplan.plans.verify import verify_plan

LAYERS, HEADS, HEAD_DIM, BATCH, PROMPT, GEN = 2, 4, 16, 2, 16, 6
CONTEXT = PROMPT + GEN
FULL_TOKEN = kv_token_bytes(HEAD_DIM, None, 4, 1) * HEADS * BATCH
"""Bytes one token of one gpt2-tiny layer holds at fp32, for the batch."""
RATIOS = (0.1, 0.25, 0.5, 0.75, 1.0)
BITS = (None, 8, 4, 2)
QUANT_COST = {None: 0.0, 8: 1e-4, 4: 3e-3, 2: 5e-2}


def _calibration(steep: tuple[float, ...] = (3.0, 0.5)) -> KVCalibration:
    """Synthetic statistics: layer L's attention is concentrated by `steep[L]`; quantization costs grow as
    bits fall, token loss as the unheld attention."""
    heads = []
    for layer, k in enumerate(steep):
        mass = tuple(1 - (1 - r) ** (1 + k) for r in RATIOS)
        for head in (None, *range(HEADS)):
            scale = 1.0 if head is None else 0.5 + head / HEADS
            errors = tuple(
                tuple(scale * ((1 - m) + QUANT_COST[b]) for b in BITS) for m in mass
            )
            heads.append(KVHeadStats(layer, head, mass, 1.0 + k, 0.1, 0.2, errors))
    return KVCalibration(RATIOS, BITS, tuple(heads), LAYERS, HEADS, HEAD_DIM, 4, 48, 16, 2)


def _plan(budget: object, **kw: object) -> memplan.Plan:
    opts = KVBudgetOptions(calibration=_calibration(), sink_tokens=2, recent_tokens=2, **kw)  # type: ignore
    return memplan.plan("zoo:gpt2-tiny", mode="infer", batch=BATCH, seq=PROMPT, gen=GEN, kv_budget=budget,
                        options={"kv_budget": opts})  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize("method", ["uniform", "pyramidkv", "prefixkv", "zigzagkv"])
@pytest.mark.parametrize("share", [0.5, 0.2])
def test_token_methods_spend_the_budget_within_a_token_per_layer(method: str, share: float) -> None:
    plan = _plan(f"{share:.0%}", method=method)
    kv = plan.decisions.kv
    assert kv is not None and kv.method == method and kv.context == CONTEXT
    assert len(kv.budgets) == LAYERS and all(b.bits is None and b.head is None for b in kv.budgets)
    assert all(4 <= b.tokens <= CONTEXT for b in kv.budgets)
    assert kv.planned_bytes == sum(b.tokens for b in kv.budgets) * FULL_TOKEN
    assert kv.budget_bytes - LAYERS * FULL_TOKEN < kv.planned_bytes <= kv.budget_bytes
    assert verify_plan(plan).ok


def test_memplan_method_trades_tokens_for_bits_and_holds_the_budget() -> None:
    plan = _plan("20%")
    kv = plan.decisions.kv
    assert kv is not None and kv.method == "memplan"
    assert kv.planned_bytes <= kv.budget_bytes
    assert {b.bits for b in kv.budgets} & {8, 4, 2}, "at 20% the ladder's cheaper bits keep more tokens"
    for b in kv.budgets:
        assert b.size_bytes == b.tokens * kv_token_bytes(HEAD_DIM, b.bits, 4, kv.group_size) * HEADS * BATCH
    report = next(p for p in plan.passes if p.name == "kv_budget")
    assert report.solver.status == "optimal" and report.solver.gap is not None
    # the spare bytes are spent: no budget can take one more token at its bits
    spare = kv.budget_bytes - kv.planned_bytes
    assert all(b.tokens == CONTEXT or spare < b.size_bytes // b.tokens for b in kv.budgets)


def test_per_head_budgets_differ_by_head_and_hold_the_budget() -> None:
    plan = _plan("30%", per_head=True)
    kv = plan.decisions.kv
    assert kv is not None and len(kv.budgets) == LAYERS * HEADS
    assert {b.head for b in kv.budgets} == set(range(HEADS))
    assert kv.planned_bytes <= kv.budget_bytes
    assert len({(b.tokens, b.bits) for b in kv.budgets}) > 1


def test_effective_graph_prices_the_compressed_cache_and_it_survives_json(tmp_path: object) -> None:
    plan = _plan("25%", method="uniform")
    kv = plan.decisions.kv
    assert kv is not None
    caches = {v.layer: v.size_bytes for v in plan.graph().values if v.role == Role.KV_CACHE}
    assert caches == {b.layer: b.size_bytes + b.index_bytes for b in kv.budgets}
    path = f"{tmp_path}/plan.json"
    save_plan(plan, path)
    assert load_plan(path).decisions.kv == kv


def test_a_full_budget_keeps_everything_at_the_cache_dtype() -> None:
    kv = _plan("100%").decisions.kv
    assert kv is not None and all(b.tokens == CONTEXT and b.bits is None for b in kv.budgets)


def test_no_budget_leaves_the_cache_alone() -> None:
    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", batch=BATCH, seq=PROMPT, gen=GEN)
    assert plan.decisions.kv is None


def test_a_budget_below_the_protected_tokens_is_refused_with_the_least() -> None:
    least_full = LAYERS * 4 * FULL_TOKEN
    with pytest.raises(InfeasibleBudget, match="sink") as e:
        _plan(least_full - 1, method="uniform")
    assert e.value.lower_bound_bytes == least_full
    least_2bit = LAYERS * 4 * kv_token_bytes(HEAD_DIM, 2, 4, 16) * HEADS * BATCH
    with pytest.raises(InfeasibleBudget) as e:
        _plan(least_2bit - 1)
    assert e.value.lower_bound_bytes == least_2bit
    assert _plan(least_2bit).decisions.kv.planned_bytes <= least_2bit  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "h2o"}, "unknown KV budget method"),
        ({"method": "pyramidkv", "per_head": True}, "per-head"),
        ({"bits": (3,)}, "KV bits 3"),
        ({"window": 0}, "window"),
        ({"time_limit_s": 0}, "time limit"),
    ],
)
def test_bad_options_are_refused(kw: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        _plan("20%", **kw)


def test_the_pass_alone_says_what_it_needs() -> None:
    base = memplan.plan("zoo:gpt2-tiny", mode="infer", batch=BATCH, seq=PROMPT, gen=GEN)
    geometry = KVGeometry(LAYERS, HEADS, HEAD_DIM, 4)
    with pytest.raises(InvalidInput, match="geometry"):
        kv_budget.run(base.graph(), base.hardware, base, KVBudgetOptions(budget="20%", method="uniform"))
    with pytest.raises(InvalidInput, match="attention statistics"):
        opts = KVBudgetOptions(budget="20%", method="prefixkv", geometry=geometry)
        kv_budget.run(base.graph(), base.hardware, base, opts)
    done = kv_budget.run(base.graph(), base.hardware, base, KVBudgetOptions(budget=None))
    assert done.plan.decisions.kv is None and done.report.solver.status == "trivial"


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("2GiB", "bytes", 2**31), ("20%", "ratio", 0.2), ("96 tokens", "tokens", 96), ("8tok", "tokens", 8),
     (4096, "bytes", 4096), (0.5, "ratio", 0.5)],
)  # fmt: skip
def test_parse_kv_budget(text: object, kind: str, value: float) -> None:
    spec = parse_kv_budget(text)  # type: ignore[arg-type]
    assert (spec.kind, spec.value) == (kind, value)


@pytest.mark.parametrize("text", ["0%", "120%", "0 tokens", "lots", "-3MiB"])
def test_parse_kv_budget_refuses(text: str) -> None:
    with pytest.raises(InvalidInput, match="KV budget|size"):
        parse_kv_budget(text)


def test_fitted_group() -> None:
    assert [fitted_group(32, d) for d in (16, 64, 80, 96, 7)] == [16, 32, 20, 32, 7]


def test_a_kv_budget_without_generation_is_refused() -> None:
    with pytest.raises(InvalidInput, match="generation"):
        memplan.plan("zoo:gpt2-tiny", mode="infer", batch=BATCH, seq=PROMPT, kv_budget="20%")


# -- the allocation rules -------------------------------------------------------------------------------


def _reference_pyramid(q_len: int, ratio: float, layers: int, window: int, beta: int, idx: int) -> int:
    """PyramidKV's budget written out again from the paper's formula (kvpress's docstring)."""
    cap = window + q_len * (1 - ratio)
    lo = (cap - window) / beta
    hi = (cap - window) * 2 - lo
    if hi >= q_len - window:
        hi = q_len - window
        lo = (cap - window) * 2 - hi
    if not (q_len >= hi >= lo >= window):
        return max(1, round(q_len * (1 - ratio)))
    return round(hi - idx * (hi - lo) / (layers - 1))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8192), st.floats(0.0, 0.99), st.integers(2, 80), st.integers(1, 128),
       st.integers(1, 40))  # fmt: skip
def test_pyramid_budgets_follow_the_formula(q_len: int, ratio: float, layers: int, window: int,
                                            beta: int) -> None:  # fmt: skip
    got = pyramid_budgets(q_len, ratio, layers, window, beta)
    assert got == [_reference_pyramid(q_len, ratio, layers, window, beta, i) for i in range(layers)]
    assert got == sorted(got, reverse=True)


curves = st.lists(st.floats(0.01, 20.0), min_size=1, max_size=12).map(
    lambda ks: [[1 - (1 - r) ** (1 + k) for r in RATIOS] for k in ks]
)


@settings(max_examples=100, deadline=None)
@given(curves, st.floats(0.01, 0.99))
def test_prefix_threshold_hits_the_target_mean_ratio(layer_curves: list[list[float]], target: float) -> None:
    ratios, threshold = prefix_ratios(layer_curves, RATIOS, target)
    assert math.isclose(sum(ratios) / len(ratios), target, abs_tol=1e-9)
    assert all(0 <= r <= 1 for r in ratios) and 0 <= threshold <= 1
    # every layer sits at the one threshold: its curve there holds the threshold's mass
    for c, r in zip(layer_curves, ratios, strict=True):
        mass = float(np.interp(r, [0.0, *RATIOS], [0.0, *c]))
        assert mass == pytest.approx(threshold, abs=1e-6) or r == pytest.approx(inverse_curve(RATIOS, c, 1.0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 50.0), min_size=1, max_size=20), st.integers(0, 40), st.integers(0, 5))
def test_round_to_total_keeps_sum_bounds_and_closeness(values: list[float], extra: int, lo: int) -> None:
    hi = lo + 60
    values = [min(max(v, lo), hi) for v in values]
    total = min(max(round(sum(values)), lo * len(values)), hi * len(values))
    got = round_to_total(values, total, lo, hi)
    assert sum(got) == total and all(lo <= g <= hi for g in got)
    if math.isclose(sum(values), total, abs_tol=1e-9):
        assert all(abs(g - v) < 1 + 1e-9 for g, v in zip(got, values, strict=True))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.001, 10.0), min_size=1, max_size=20), st.floats(0.0, 1.0))
def test_apportion_sums_to_the_total_within_bounds(weights: list[float], share: float) -> None:
    lo, hi = 2.0, 30.0
    total = len(weights) * (lo + share * (hi - lo))
    got = apportion(weights, total, lo, hi)
    assert sum(got) == pytest.approx(total, rel=1e-9, abs=1e-6)
    assert all(lo - 1e-9 <= g <= hi + 1e-9 for g in got)


def test_apportion_refuses_an_impossible_total() -> None:
    with pytest.raises(InvalidInput):
        apportion([1.0, 1.0], 100.0, 0.0, 10.0)


def test_placement_and_allocate_see_the_compressed_cache() -> None:
    full = memplan.plan("zoo:gpt2-tiny", mode="infer", batch=BATCH, seq=PROMPT, gen=GEN)
    small = _plan("25%", method="uniform")
    assert [p.name for p in small.passes] == [p.name for p in full.passes]
    cut = sum(v.size_bytes for v in full.graph().values if v.role == Role.KV_CACHE) - sum(
        b.size_bytes for b in small.decisions.kv.budgets  # type: ignore[union-attr]
    )
    assert cut > 0
    assert small.predictions.peak_bytes["device"] <= full.predictions.peak_bytes["device"] - cut // 2
