"""The captured graph on quantized weights: the same outputs as the eager model on them (GPT-2's Conv1D
through addmm, Llama's Linear through permute + mm), and a measured peak equal to the prediction plus the
kernels' layout overhead."""

from __future__ import annotations

import pytest
import torch

import memplan
from memplan.passes.bitwidth import BitwidthOptions
from memplan.planner.models import capture, load_model
from memplan.planner.run import run_plan
from memplan.plans.decisions import Candidate
from memplan.plans.plan import Plan
from memplan.runtime.quantized import quantize_model
from memplan.runtime.quantized_graph import Stored, bind, run_graph
from memplan.zoo import catalog

FORMATS = (Candidate("int8", True, "per-channel"), Candidate("int4", False, "per-group", 32),
           Candidate("int3", True, "per-group", 32), Candidate("fp16"))  # fmt: skip


def _plan(zoo: str, limit: int) -> Plan:
    opts = BitwidthOptions(estimator="fisher", candidates=FORMATS, size_limit_bytes=limit)
    return memplan.plan(zoo, mode="infer", passes=["bitwidth", "allocate"], options={"bitwidth": opts})


@pytest.mark.parametrize(("zoo", "limit"), [("zoo:gpt2-tiny", 70_000), ("zoo:llama-tiny", 60_000)])
def test_the_graph_on_stored_weights_matches_the_eager_model(zoo: str, limit: int) -> None:
    plan = _plan(zoo, limit)
    assert plan.decisions.bits is not None and len({b.format for b in plan.decisions.bits.tensors}) > 1
    entry = catalog.get(zoo)
    loaded = load_model(zoo, "infer", device="cpu")
    _, cap = capture(loaded, "infer")
    assert cap is not None and loaded.module is not None
    args = bind(plan, cap, loaded.module, loaded.example_inputs)
    assert sum(isinstance(a, Stored) for a in args) == len(plan.decisions.bits.tensors)
    with torch.no_grad():
        graph_out = run_graph(cap, args)[0]
        eager = entry.build()
        quantize_model(plan, eager)
        eager_out = entry.forward(eager, *loaded.example_inputs)
    assert float((graph_out - eager_out).abs().max()) <= 1e-4 * float(eager_out.abs().max())


def test_memplan_run_measures_the_predicted_peak() -> None:
    plan = _plan("zoo:gpt2-tiny", 70_000)
    measured, comparison = run_plan(plan)
    model = catalog.get("gpt2-tiny").build()
    run = quantize_model(plan, model)
    overhead = sum(run.held_bytes.values()) - sum(run.planned_bytes.values())  # the kernels' fp32 scales
    assert measured.peak_bytes == comparison.measured_peak_bytes
    assert measured.peak_bytes - comparison.predicted_peak_bytes == pytest.approx(overhead, abs=512)


def test_run_refuses_what_it_cannot_run_with_quantized_weights() -> None:
    from memplan.errors import InvalidInput, PlanMismatch
    from memplan.planner.run import run_arena_for_plan, run_generation_plan

    plan = _plan("zoo:gpt2-tiny", 70_000)
    with pytest.raises(InvalidInput, match="whose ops multiply float weights"):
        run_arena_for_plan(plan)
    generation = plan.with_(workload=plan.workload.__class__("infer", 1, 8, "none", 4))
    with pytest.raises(PlanMismatch, match="not a generation's"):
        run_generation_plan(generation)
