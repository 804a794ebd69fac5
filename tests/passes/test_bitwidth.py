"""The bitwidth pass on hand-made graphs: its choice equals brute force, fused weights share a format, limits
hold (size, BOPs, latency; by default the device budget), refusals name the least reachable, and its record
survives verify and JSON."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.errors import InfeasibleBudget, InvalidInput
from memplan.ir.graph import Graph, Op, Role, Value
from memplan.ir.hardware import load_hardware
from memplan.passes.bitwidth import DEFAULT_CANDIDATES, BitwidthOptions
from memplan.passes.bitwidth_problem import SensitivityTable, TensorSensitivity
from memplan.passes.manager import run_pipeline
from memplan.passes.registry import PASSES, default_pipeline, passes_named
from memplan.plans.decisions import FORMAT_BITS, Candidate
from memplan.plans.plan import Plan, Workload
from memplan.plans.serialize import plan_from_dict, plan_to_dict
from memplan.plans.verify import verify_plan

HW = load_hardware("cpu")
WORK = Workload("infer", 1, 8)
SMALL = (Candidate("int8", True, "per-channel"), Candidate("int4", False, "per-group", 32))
"""Two formats beside fp32: three choices a weight, so brute force is 3**n."""
INT4_G32 = 64 * 64 // 2 + 64 * 64 // 32 * 4
"""Bytes of a [64, 64] weight at int4, groups of 32, asymmetric: codes, an fp16 scale and zero per group."""


def linears(names: list[str], width: int = 64) -> Graph:
    """x -> mm(x, w0) -> mm(., w1) ...: one [width, width] fp32 weight per name."""
    values = [Value(0, "x", 8 * width * 4, "float32", (8, width), Role.INPUT)]
    ops, prev = [], 0
    for i, name in enumerate(names):
        w = len(values)
        values.append(Value(w, name, width * width * 4, "float32", (width, width), Role.PARAMETER))
        out = w + 1
        values.append(Value(out, f"y{i}", 8 * width * 4, "float32", (8, width), Role.ACTIVATION))
        ops.append(Op(i, f"mm{i}", "aten.mm.default", (prev, w), (out,), flops=2.0 * 8 * width * width))
        prev = out
    return Graph("linears", tuple(values), tuple(ops), (prev,))


def table(
    names: list[str], curvature: list[float], scale: list[float], candidates: tuple[Candidate, ...] = SMALL
) -> SensitivityTable:
    """Squared errors as quantization noise grows, 4**-bits per element (asymmetric a little less), scaled
    per weight."""
    noise = {c.label: 4.0 ** -FORMAT_BITS[c.format] * (1.0 if c.symmetric else 0.7) for c in candidates}
    errors = {k: 4096 * v for k, v in noise.items()}
    rows = tuple(
        TensorSensitivity(n, c, {k: v * s for k, v in errors.items()})
        for n, c, s in zip(names, curvature, scale, strict=True)
    )
    return SensitivityTable(rows, "test table")


def plan_bits(graph: Graph, opts: BitwidthOptions, budget: int = 2**30) -> Plan:
    passes = passes_named(["bitwidth"])
    return run_pipeline(graph, HW, WORK, budget, "test:linears", passes, {"bitwidth": opts})


def small(sens: SensitivityTable, **kw: object) -> BitwidthOptions:
    return BitwidthOptions(candidates=SMALL, sensitivity=sens, **kw)  # type: ignore[arg-type]


def chosen_label(plan: Plan, vid: int) -> str:
    """The label of the candidate the pass chose for weight `vid`."""
    bits = plan.decisions.bits
    assert bits is not None
    row = next(t for t in bits.candidates if t.value_id == vid)
    picked = bits.of(vid)
    return next(c.label for c in row.candidates if c.bits == (picked or row.candidates[0].bits))


def brute_force(plan: Plan, limit: int) -> float:
    """The least total cost over every combination of candidates within the size limit."""
    tables = plan.decisions.bits.candidates  # type: ignore[union-attr]
    best = float("inf")
    for combo in itertools.product(*(t.candidates for t in tables)):
        if sum(c.stored_bytes for c in combo) <= limit:
            best = min(best, sum(c.cost for c in combo))
    return best


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    curv=st.lists(st.floats(1e-4, 10.0), min_size=4, max_size=4),
    scale=st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4),
    share=st.floats(0.15, 1.0),
)
def test_choice_equals_brute_force(n: int, curv: list[float], scale: list[float], share: float) -> None:
    names = [f"l{i}.weight" for i in range(n)]
    fp32 = n * 64 * 64 * 4
    limit = int(fp32 * share)
    opts = small(table(names, curv[:n], scale[:n]), size_limit_bytes=limit)
    try:
        plan = plan_bits(linears(names), opts)
    except InfeasibleBudget:
        assert limit < n * INT4_G32  # below every weight at its smallest
        return
    report = next(p for p in plan.passes if p.name == "bitwidth")
    assert report.solver.status == "optimal"
    assert report.solver.objective == pytest.approx(brute_force(plan, limit), rel=1e-9, abs=1e-12)
    stored = {v.id: v.size_bytes for v in plan.graph().values}
    assert sum(stored[t.value_id] for t in plan.decisions.bits.candidates) <= limit  # type: ignore[union-attr]
    assert verify_plan(plan).ok


def test_fused_projections_share_a_format() -> None:
    names = [f"layers.0.attn.{p}_proj.weight" for p in ("q", "k", "v", "o")]
    sens = table(names, [10.0, 1e-4, 1e-4, 1e-4], [1.0] * 4)  # q alone would stay at 8 bits
    limit = int(4 * 64 * 64 * 4 * 0.2)
    plan = plan_bits(linears(names), small(sens, size_limit_bytes=limit))
    bits = plan.decisions.bits
    assert bits is not None and [len(g) for g in bits.ties] == [3]
    assert len({chosen_label(plan, vid) for vid in bits.ties[0]}) == 1
    assert verify_plan(plan).ok
    untied = plan_bits(
        linears(names), BitwidthOptions(candidates=SMALL, size_limit_bytes=limit, sensitivity=sens, fused=())
    )
    assert untied.decisions.bits.ties == ()  # type: ignore[union-attr]
    assert untied.passes[-1].solver.objective <= plan.passes[-1].solver.objective  # ties only cost


def test_default_limit_is_what_fits_the_budget() -> None:
    names = ["a.weight", "b.weight"]
    sens = table(names, [1.0, 2.0], [1.0, 1.0])
    roomy = plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens))
    assert roomy.decisions.bits is not None and roomy.decisions.bits.tensors == ()  # fp32 fits: kept
    assert len(roomy.decisions.bits.candidates) == 2  # ...but priced, for a later pass
    peak = roomy.predictions.peak_bytes["device"]
    budget = peak - 64 * 64 * 4  # one weight's worth less
    tight = plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens), budget)
    assert tight.predictions.peak_bytes["device"] <= budget
    assert tight.decisions.bits is not None and tight.decisions.bits.tensors
    assert [e.kind for e in tight.events] == ["compute"] * 2


def test_an_unreachable_budget_names_the_least_size() -> None:
    names = ["a.weight", "b.weight"]
    sens = table(names, [1.0, 1.0], [1.0, 1.0])
    roomy = plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens))
    rest = roomy.predictions.peak_bytes["device"] - 2 * 64 * 64 * 4
    least = 2 * INT4_G32
    with pytest.raises(InfeasibleBudget, match="Raise the budget to at least") as err:
        plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens), rest + least - 1)
    assert err.value.lower_bound_bytes == rest + least
    with pytest.raises(InfeasibleBudget, match="size limit 1.00 KiB .* below the least") as err:
        plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens, size_limit_bytes=1024))
    assert err.value.lower_bound_bytes == least and "int4-g32-asym" in str(err.value)


def test_bops_and_latency_limits_hold() -> None:
    names = ["a.weight", "b.weight"]
    sens = table(names, [1.0, 3.0], [1.0, 1.0])
    base = plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens))
    tables = base.decisions.bits.candidates  # type: ignore[union-attr]
    macs = 64 * 64 * 8  # elements x tokens
    bops_limit = macs * 32 * (8 + 4) + 1  # one weight at 8 bits, one at 4
    plan = plan_bits(linears(names), small(sens, bops_limit=bops_limit))
    bits = {b.value_id: b.bits for b in plan.decisions.bits.tensors}  # type: ignore[union-attr]
    assert sorted(bits.values()) == [4, 8] and bits[tables[1].value_id] == 8  # the sensitive one keeps 8
    with pytest.raises(InfeasibleBudget, match="bops limit .* below the least"):
        plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens, bops_limit=1.0))
    fast = plan_bits(linears(names), small(sens, latency_limit_s=1e-3))
    assert fast.passes[-1].solver.status == "optimal"
    with pytest.raises(InfeasibleBudget, match="latency limit"):
        plan_bits(linears(names), BitwidthOptions(candidates=SMALL, sensitivity=sens, latency_limit_s=1e-12))


def test_the_record_is_verified_and_survives_json() -> None:
    names = ["a.weight", "b.weight", "c.weight"]
    every = BitwidthOptions().resolved_candidates()
    sens = table(names, [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], every)
    plan = plan_bits(linears(names), BitwidthOptions(sensitivity=sens, size_limit_bytes=20_000))
    assert verify_plan(plan).ok
    back = plan_from_dict(plan_to_dict(plan))
    assert back.decisions == plan.decisions and back.predictions == plan.predictions
    bits = plan.decisions.bits
    assert bits is not None
    for t in bits.candidates:
        assert t.candidates[0].cost == 0.0 and t.candidates[0].label == "fp32"
        assert [c.label for c in t.candidates] == ["fp32", *(c.label for c in every)]
        shape = plan.graph().value(t.value_id).shape
        assert all(c.stored_bytes == c.bits.stored_bytes(shape) for c in t.candidates)
    assert sum(v.size_bytes for v in plan.graph().values if v.role == Role.PARAMETER) <= 20_000


def test_refusals_of_bad_input() -> None:
    names = ["a.weight"]
    g = linears(names)
    with pytest.raises(InvalidInput, match="needs the weights' sensitivity"):
        plan_bits(g, BitwidthOptions())
    with pytest.raises(InvalidInput, match="no 2-D weight storage"):
        plan_bits(g, BitwidthOptions(sensitivity=table(["nope.weight"], [1.0], [1.0])))
    with pytest.raises(InvalidInput, match="has no error for candidate int3"):
        plan_bits(g, BitwidthOptions(candidates=(Candidate("int3", False, "per-group"),),
                                     sensitivity=table(names, [1.0], [1.0])))  # fmt: skip
    with pytest.raises(InvalidInput, match="per-channel or per-group"):
        plan_bits(g, BitwidthOptions(candidates=(Candidate("int4"),), sensitivity=table(names, [1.0], [1.0])))
    with pytest.raises(InvalidInput, match="repeat"):
        plan_bits(g, BitwidthOptions(candidates=SMALL + SMALL[:1], sensitivity=table(names, [1.0], [1.0])))
    with pytest.raises(InvalidInput, match="must be positive"):
        plan_bits(g, BitwidthOptions(size_limit_bytes=0, sensitivity=table(names, [1.0], [1.0])))


def test_registered_in_pipeline_order_and_opt_in() -> None:
    assert list(PASSES)[:4] == ["schedule", "bitwidth", "kv_budget", "remat_swap"]
    assert "bitwidth" not in [p.name for p in default_pipeline()]
    assert PASSES["bitwidth"].modes == frozenset({"infer", "generate"})
    labels = [c.label for c in BitwidthOptions(group_size=64).resolved_candidates()]
    assert labels == ["fp16", "int8-ch-sym", "int4-g64-sym", "int4-g64-asym", "int3-g64-sym", "int3-g64-asym",
                      "int2-g64-asym"]  # fmt: skip
    assert len(DEFAULT_CANDIDATES) == len(labels)


def test_a_table_from_elsewhere_must_say_how_it_was_measured() -> None:
    g = linears(["a.weight"])
    row = TensorSensitivity("a.weight", float("nan"), {c.label: 1.0 for c in SMALL}, estimator="given")
    with pytest.raises(InvalidInput, match="a finite number"):
        plan_bits(g, small(SensitivityTable((row,))))
    guess = TensorSensitivity("a.weight", 1.0, {c.label: 1.0 for c in SMALL}, estimator="guess")
    with pytest.raises(InvalidInput, match="must be one of hutchinson, fisher, given"):
        plan_bits(g, small(SensitivityTable((guess,))))
    given = replace(guess, estimator="given")
    assert plan_bits(g, small(SensitivityTable((given,)))).decisions.bits.candidates[0].estimator == "given"  # type: ignore[union-attr]
