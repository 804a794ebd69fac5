"""Quantized weights at run time: outputs within tolerance of the reference (the float model on dequantized
weights) in every format, the tracker's peak falls by the bytes the plan saves, the float model is back
after the block, weights load from a safetensors file onto a meta model, a generation runs on them, and
what is not built is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

import memplan
from memplan.errors import InvalidInput, PlanMismatch
from memplan.kernels.quantize import dequantize, quantize
from memplan.passes.baseline import rebased
from memplan.passes.bitwidth import BitwidthOptions
from memplan.plans.decisions import BitsDecision, Candidate, DeviceCopy, PlacementDecision, TensorPlacement
from memplan.plans.plan import Plan
from memplan.runtime.quantized import CastLinear, QuantizedLinear, quantize_model
from memplan.runtime.tracker import LiveStorageTracker
from memplan.zoo import catalog

ENTRY = catalog.get("gpt2-tiny")
IDS = ENTRY.example_inputs(2, 32, "cpu", "infer")[0]
FORMATS = (
    Candidate("fp16"), Candidate("int8", True, "per-channel"), Candidate("int4", False, "per-group", 32),
    Candidate("int3", True, "per-group", 32), Candidate("int2", False, "per-group", 16), Candidate("bf16"),
    Candidate("int4", True, "per-group", 64), Candidate("int8", False, "per-channel"),
)  # fmt: skip
"""One format per weight of gpt2-tiny's eight: native kernels, the reference path and casts."""
TOLERANCE = 1e-4
"""max |quantized - reference| / max |reference| on the logits, fp32 activations (the module docstring's)."""


@pytest.fixture(scope="module")
def plan() -> Plan:
    """gpt2-tiny (batch 2, seq 32) at 25% of its layers' weight bytes, formats chosen by the pass (fisher)."""
    roomy = memplan.plan("zoo:gpt2-tiny", mode="infer", passes=[])
    weights = sum(v.size_bytes for v in roomy.tensors if v.name.endswith(("attn.weight", "proj.weight",
                                                                            "fc.weight")))  # fmt: skip
    opts = BitwidthOptions(estimator="fisher", size_limit_bytes=int(0.25 * weights))
    return memplan.plan("zoo:gpt2-tiny", mode="infer", passes=["bitwidth", "allocate"],
                        options={"bitwidth": opts})  # fmt: skip


@pytest.fixture(scope="module")
def every_format(plan: Plan) -> Plan:
    """The same plan with one of `FORMATS` per weight."""
    bits = plan.decisions.bits
    assert bits is not None
    shapes = {v.id: v.shape for v in plan.tensors}
    chosen = tuple(
        c.for_tensor(t.value_id, shapes[t.value_id], transposed=True)
        for t, c in zip(bits.candidates, FORMATS, strict=True)
    )
    return rebased(plan.with_(decisions=plan.decisions.with_(bits=BitsDecision(chosen), allocate=None),
                              offsets={}))  # fmt: skip


def reference_model(plan: Plan) -> torch.nn.Module:
    """The float model with every planned weight replaced by what its format stores."""
    model = ENTRY.build()
    params = dict(model.named_parameters())
    names = {v.id: v.name.removeprefix("model.") for v in plan.tensors}
    with torch.no_grad():
        for b in plan.decisions.bits.tensors:  # type: ignore[union-attr]
            w = params[names[b.value_id]]
            m = w.T if b.transposed else w
            if b.format in ("fp16", "bf16"):
                d = m.to(torch.float16 if b.format == "fp16" else torch.bfloat16).float()
            else:
                d = dequantize(quantize(m, b))
            w.copy_(d.T if b.transposed else d)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def test_every_format_is_within_tolerance_of_the_reference(every_format: Plan) -> None:
    model = ENTRY.build()
    ref = logits(reference_model(every_format))
    with memplan.applied(every_format, model) as run:
        out = logits(model)
    kinds = {type(m) for m in run.modules.values()}
    assert kinds == {QuantizedLinear, CastLinear} and len(run.modules) == 8
    quantized = [m.prepared for m in run.modules.values() if isinstance(m, QuantizedLinear)]
    # int8 in PyTorch's kernel layout, its path chosen per call by rows; the others on the reference path
    assert {p.native.kind for p in quantized if p.native} == {"int8pack"}
    assert all(p.path is None for p in quantized if p.native)
    assert all(p.q.payload.numel() for p in quantized if not p.native)
    assert float((out - ref).abs().max()) <= TOLERANCE * float(ref.abs().max())
    assert float((out - logits(ENTRY.build())).abs().max()) > 0  # quantized: not the float model


def test_the_model_is_float_again_after_the_block(plan: Plan) -> None:
    model = ENTRY.build()
    before = logits(model)
    with memplan.applied(plan, model):
        assert not torch.equal(logits(model), before)
    assert torch.equal(logits(model), before)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_the_measured_peak_falls_by_the_bytes_the_plan_saves(plan: Plan) -> None:
    model = ENTRY.build()
    with torch.no_grad(), LiveStorageTracker() as tracker:
        tracker.track([*model.parameters()])
        model(IDS, use_cache=False)
    float_peak = tracker.result.peak_bytes
    with memplan.applied(plan, model) as run:
        model(IDS, use_cache=False)
    measured = run.measured()
    baseline = memplan.plan("zoo:gpt2-tiny", mode="infer", passes=[])
    planned_saving = baseline.predictions.peak_bytes["device"] - plan.predictions.peak_bytes["device"]
    overhead = sum(run.held_bytes.values()) - sum(run.planned_bytes.values())  # the kernels' fp32 scales
    assert 0 <= overhead <= 0.1 * sum(run.planned_bytes.values())
    assert float_peak - measured.peak_bytes == pytest.approx(planned_saving - overhead, abs=1024)
    assert measured.baseline_bytes < sum(p.numel() * 4 for p in model.parameters())


def test_weights_load_from_safetensors_onto_a_meta_model(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "gpt2-tiny.safetensors"
    save_model(ENTRY.build(), str(path))  # keeps one name of the tied wte / lm_head
    meta = ENTRY.build(device="meta")
    run = quantize_model(plan, meta, weights=path)
    assert not [n for n, p in meta.named_parameters() if p.device.type == "meta"]
    assert meta.lm_head.weight is meta.transformer.wte.weight  # still tied
    in_memory = ENTRY.build()
    quantize_model(plan, in_memory)
    assert torch.equal(logits(meta), logits(in_memory))
    chosen = {b.value_id for b in plan.decisions.bits.tensors}  # type: ignore[union-attr]
    assert set(run.planned_bytes) == {v.name.removeprefix("model.") for v in plan.tensors if v.id in chosen}


def test_a_generation_runs_on_quantized_weights() -> None:
    int4 = (Candidate("int4", False, "per-group", 32),)
    opts = BitwidthOptions(estimator="fisher", candidates=int4, size_limit_bytes=64_000)  # all at int4
    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", gen=4, batch=1, seq=8, passes=["bitwidth"],
                        options={"bitwidth": opts})  # fmt: skip
    assert plan.decisions.bits is not None and plan.decisions.bits.tensors
    ids = IDS[:1, :8]
    expect = reference_model(plan).generate(ids, max_new_tokens=4, do_sample=False)
    model = ENTRY.build()
    with memplan.applied(plan, model) as run:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expect) and run.finish().peak_bytes > 0


def test_what_is_not_built_or_does_not_match_is_refused(plan: Plan) -> None:
    streamed = plan.with_(decisions=plan.decisions.with_(
        placement=PlacementDecision((TensorPlacement(4, "ssd", copies=(DeviceCopy(0, 1),)),))))  # fmt: skip
    with pytest.raises(InvalidInput, match="generation only"):
        with memplan.applied(streamed, ENTRY.build()):
            pass
    with pytest.raises(InvalidInput, match="one inference forward"):
        with memplan.applied(plan.with_(decisions=plan.decisions.with_(bits=None)), ENTRY.build()):
            pass
    other = catalog.get("llama-tiny").build()
    with pytest.raises(PlanMismatch, match="made for another model"):
        quantize_model(plan, other)
    with pytest.raises(InvalidInput, match="on the meta device"):
        quantize_model(plan, ENTRY.build(device="meta"))


def test_weights_given_must_hold_what_the_model_lacks(plan: Plan) -> None:
    with pytest.raises(PlanMismatch, match="hold no tensor"):
        quantize_model(plan, ENTRY.build(), weights={})
    float_model = dict(ENTRY.build().named_parameters())
    only_quantized = {n: float_model[n] for n in float_model if n.endswith(("c_attn.weight", "c_proj.weight",
                                                                             "c_fc.weight"))}  # fmt: skip
    with pytest.raises(InvalidInput, match="on the meta device and the weights given do not hold it"):
        quantize_model(plan, ENTRY.build(device="meta"), weights=only_quantized)
    with pytest.raises(InvalidInput, match="nothing was measured"):
        quantize_model(plan, ENTRY.build()).measured()
