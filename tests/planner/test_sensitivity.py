"""Sensitivity: Hutchinson's estimate is exact on a diagonal Hessian, the quantizable weights are the Linear
and Conv1D ones (not a tied embedding), costs are non-negative and grow as bits fall, and `memplan.plan`
measures them for the bitwidth pass (tied q/k/v of a Llama generation included)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memplan
from memplan.errors import InvalidInput
from memplan.passes.bitwidth import BitwidthOptions
from memplan.planner.calibration import calibration_batches
from memplan.planner.sensitivity import (
    SensitivitySettings,
    measure_sensitivity,
    quantizable_weights,
    squared_errors,
)
from memplan.plans.decisions import Candidate
from memplan.zoo import catalog

CANDIDATES = BitwidthOptions(group_size=32).resolved_candidates()


def test_hutchinson_is_exact_on_a_diagonal_hessian() -> None:
    model = nn.Sequential(nn.Linear(8, 16, bias=False))
    c = torch.rand(16, 8) + 0.5

    def loss(m: nn.Module, _: torch.Tensor) -> torch.Tensor:
        return 0.5 * (c * m[0].weight ** 2).sum()  # Hessian diag(c): v^T H v = sum(c) for every v in {-1,1}^n

    for estimator in ("hutchinson", "fisher"):
        s = SensitivitySettings(estimator=estimator, probes=2)
        row = measure_sensitivity(model, [torch.zeros(1)] * 2, CANDIDATES, s, loss=loss).tensors[0]
        grad = c * model[0].weight.detach()
        expect = float(c.mean()) if estimator == "hutchinson" else float((grad**2).mean())
        assert row.curvature == pytest.approx(expect, rel=1e-5) and row.estimator == estimator
        assert row.name == "0.weight" and not row.transposed


def test_quantizable_weights_are_linear_and_conv1d_not_a_tied_embedding() -> None:
    gpt2 = catalog.get("gpt2-tiny").build()
    found = {w.name: w.transposed for w in quantizable_weights(gpt2)}
    assert len(found) == 8 and all(found.values())  # 2 layers x (c_attn, c_proj, c_fc, mlp c_proj): Conv1D
    assert "lm_head.weight" not in found and "transformer.wte.weight" not in found  # tied to the embedding
    llama = catalog.get("llama-tiny").build()
    names = {w.name: w.transposed for w in quantizable_weights(llama)}
    assert "lm_head.weight" in names and not any(names.values())  # untied: nn.Linear, [out, in]
    assert "model.embed_tokens.weight" not in names and len(names) == 2 * 7 + 1


def test_errors_grow_as_bits_fall() -> None:
    w = torch.randn(64, 128)
    e = squared_errors(w, False, CANDIDATES)
    assert 0 < e["fp16"] < e["int8-ch-sym"] < e["int4-g32-sym"] < e["int3-g32-sym"]
    assert e["int4-g32-asym"] < e["int3-g32-asym"] < e["int2-g32-asym"]
    stored_in_out = w.T.contiguous()  # the same matrix, stored [in, out] as a Conv1D keeps it
    assert squared_errors(stored_in_out, True, CANDIDATES) == pytest.approx(e)


@pytest.fixture(scope="module")
def gpt2_table() -> object:
    entry = catalog.get("gpt2-tiny")
    model = entry.inference_module(entry.build())
    batches = calibration_batches(256, 128, SensitivitySettings(batches=1, batch_size=2, seq=32), text=False)
    return measure_sensitivity(model, batches, CANDIDATES, SensitivitySettings(probes=2))


def test_costs_are_non_negative_and_larger_for_fewer_bits(gpt2_table: object) -> None:
    rows = gpt2_table.tensors  # type: ignore[attr-defined]
    assert [r.name for r in rows][0] == "model.transformer.h.0.attn.c_attn.weight"
    for r in rows:
        assert r.curvature > 0 and r.estimator in ("hutchinson", "fisher")
        cost = {k: r.curvature / 2 * v for k, v in r.errors.items()}
        assert all(v >= 0 for v in cost.values())
        assert cost["fp16"] < cost["int8-ch-sym"] < cost["int4-g32-asym"] < cost["int3-g32-asym"]
        assert cost["int3-g32-asym"] < cost["int2-g32-asym"]
    assert "lm_loss" in gpt2_table.description  # type: ignore[attr-defined]


def test_a_meta_model_or_a_wrong_estimator_is_refused() -> None:
    meta = catalog.get("gpt2-tiny").build(device="meta")
    with pytest.raises(InvalidInput, match="real weights"):
        measure_sensitivity(meta, [torch.zeros(1, 4, dtype=torch.long)], CANDIDATES)
    with pytest.raises(InvalidInput, match="unknown sensitivity estimator"):
        measure_sensitivity(meta, [], CANDIDATES, SensitivitySettings(estimator="gauss"))
    with pytest.raises(InvalidInput, match="no nn.Linear"):
        measure_sensitivity(nn.Sequential(nn.ReLU()), [torch.zeros(1)], CANDIDATES)


def test_plan_measures_sensitivity_and_ties_fused_projections() -> None:
    roomy = memplan.plan("zoo:llama-tiny", mode="infer", gen=3, batch=1, seq=8, passes=[])
    peak = roomy.predictions.peak_bytes["device"]
    weights = sum(v.size_bytes for v in roomy.tensors if v.name.endswith("proj.weight"))
    two = (Candidate("int8", True, "per-channel"), Candidate("int4", False, "per-group", 32))
    opts = BitwidthOptions(estimator="fisher", candidates=two)
    plan = memplan.plan("zoo:llama-tiny", mode="infer", gen=3, batch=1, seq=8, passes=["bitwidth"],
                        budget=peak - weights // 8, options={"bitwidth": opts})  # fmt: skip
    bits = plan.decisions.bits
    assert bits is not None and plan.predictions.peak_bytes["device"] <= peak - weights // 8
    assert len(bits.ties) == 4 and sorted(len(g) for g in bits.ties) == [2, 2, 3, 3]  # qkv, gate/up per layer
    assert bits.sensitivity.startswith("fisher, 2 batches of 4x128")
    by_id = {v.id: v.name for v in plan.tensors}
    label = {}
    for row in bits.candidates:
        picked = bits.of(row.value_id) or row.candidates[0].bits
        label[row.value_id] = next(c.label for c in row.candidates if c.bits == picked)
    for group in bits.ties:
        assert len({label[v] for v in group}) == 1, [by_id[v] for v in group]
    assert memplan.verify(plan).ok


class TinyLM(nn.Module):
    """Token ids -> logits, with two Linear layers: what a caller might plan."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))  # [batch, seq, vocab]


def test_a_module_given_is_measured_on_its_example_inputs() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 8))
    opts = BitwidthOptions(estimator="fisher", size_limit_bytes=3000)
    plan = memplan.plan(TinyLM(), (ids,), mode="infer", passes=["bitwidth"], options={"bitwidth": opts})
    bits = plan.decisions.bits
    assert bits is not None and {plan.tensors[t.value_id].name for t in bits.candidates} == {"up.weight",
                                                                                              "down.weight"}
    assert "1 batches of 2x8" in bits.sensitivity and "lm_loss" in bits.sensitivity


def test_sensitivity_is_refused_where_it_cannot_be_measured() -> None:
    from memplan.planner.calibration import with_sensitivity
    from memplan.planner.models import LoadedModel

    loaded = LoadedModel("x", "x", None, ())
    with pytest.raises(InvalidInput, match="on language models"):
        with_sensitivity(BitwidthOptions(), "zoo:resnet50", loaded, 0, torch.float32)
    with pytest.raises(InvalidInput, match="on zoo models and nn.Modules"):
        with_sensitivity(BitwidthOptions(), "model.onnx", loaded, 0, torch.float32)
