"""Planned generation: the same logits and greedy tokens as the plain model, every tier within its budget,
the SSD file laid out as the allocate pass said, and clear errors for faults and mismatches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import memplan
from memplan.errors import InvalidInput, PlanMismatch
from memplan.ir.hardware import hardware_from_dict
from memplan.plans.verify import verify_plan
from memplan.runtime.generation import applied_generation
from memplan.runtime.tiers.errors import TierCorrupt, TierFull
from memplan.zoo import catalog

GEN = 32


def _model(name: str) -> torch.nn.Module:
    model = catalog.get(name).build(device="cpu")
    model.eval()
    return model


def _ids(batch: int = 2, prompt: int = 16, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1))


def _generate(model: torch.nn.Module, ids: torch.Tensor, gen: int = GEN) -> object:
    return model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)  # fmt: skip


def _tight(model: torch.nn.Module, ids: torch.Tensor, hardware: object = "cpu", **kw: object) -> memplan.Plan:
    """A plan at a budget just above the least that fits (so that most weights stream)."""
    try:
        memplan.plan(model, ids, mode="infer", budget=1, hardware=hardware, gen=GEN, **kw)  # type: ignore[arg-type]
    except memplan.InfeasibleBudget as e:
        least = e.lower_bound_bytes
    return memplan.plan(model, ids, mode="infer", budget=least + 4096, hardware=hardware, gen=GEN, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_same_logits_and_tokens_within_budget(name: str) -> None:
    model, ids = _model(name), _ids()
    plan = _tight(model, ids)
    assert plan.decisions.placement is not None and plan.decisions.placement.tensors
    assert verify_plan(plan).ok
    plain = _generate(model, ids)
    with memplan.applied(plan, model) as run:
        tokens = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    m = run.finish()
    assert torch.equal(plain.sequences, tokens)  # type: ignore[attr-defined]
    with memplan.applied(plan, model):  # the scores generate keeps are the caller's memory, not the plan's
        placed = _generate(model, ids)
    for a, b in zip(plain.scores, placed.scores, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)
    cmp = plan.compare(m)
    assert cmp.within_budget, cmp.describe()
    assert abs(cmp.measured_peak_bytes - cmp.predicted_peak_bytes) <= 0.1 * cmp.predicted_peak_bytes
    assert m.forwards == GEN and m.bytes_read["ssd"] >= sum(cmp.predicted_read_bytes.values())
    # the model has its weights back
    again = _generate(model, ids)
    assert torch.equal(plain.sequences, again.sequences)  # type: ignore[attr-defined]


def test_ssd_file_layout_is_the_allocate_pass_offsets() -> None:
    model, ids = _model("gpt2-tiny"), _ids()
    plan = _tight(model, ids)
    with applied_generation(plan, model) as run:
        assert run.file is not None
        layout = {v: s.offset for v, s in run.file.stored.items()}
        assert layout == plan.offsets["ssd"]
        assert all(off % 4096 == 0 for off in layout.values())
        path = run.file.path
        assert os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))  # nothing left behind


def test_host_and_cxl_tiers(tmp_path: Path) -> None:
    """A GPU-like machine whose host and (emulated) CXL tiers hold what the device cannot."""
    gib = 2**30
    tier = {"read_bw": 1e9, "write_bw": 1e9, "latency_s": 1e-6}
    hw = hardware_from_dict({
        "name": "tiers", "device_kind": "cuda", "flops": 2e10, "mem_bw": 1e10, "emulated": ["cxl"],
        "tiers": [
            {"name": "device", "capacity_bytes": gib, **tier},
            {"name": "host", "capacity_bytes": 96 * 1024, **tier},
            {"name": "cxl", "capacity_bytes": 96 * 1024, **tier},
            {"name": "ssd", "capacity_bytes": gib, "read_bw": 1e8, "write_bw": 1e8, "latency_s": 1e-4,
             "path": str(tmp_path)},
        ],
    })  # fmt: skip
    model, ids = _model("gpt2-tiny"), _ids()
    plan = _tight(model, ids, hw)
    used = {p.tier for p in plan.decisions.placement.tensors}  # type: ignore[union-attr]
    assert {"host", "cxl"} <= used
    plain = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    with memplan.applied(plan, model) as run:
        placed = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    m = run.finish()
    assert torch.equal(plain, placed)
    assert plan.compare(m).within_budget
    assert m.bytes_read.get("host", 0) > 0 and m.bytes_read.get("cxl", 0) > 0
    assert "emulated" in m.backends["cxl"] or "host memory" in m.backends["cxl"]


def test_corrupted_weight_file_is_a_clear_error() -> None:
    model, ids = _model("gpt2-tiny"), _ids()
    plan = _tight(model, ids)
    with pytest.raises(TierCorrupt, match="corrupted"):
        with applied_generation(plan, model) as run:
            assert run.file is not None
            with open(run.file.path, "r+b") as f:
                f.seek(next(iter(run.file.stored.values())).offset + 10)
                f.write(b"\xff\xfe\xfd")
            _generate(model, ids)
    assert torch.equal(_generate(model, ids).sequences, _generate(model, ids).sequences)  # type: ignore[attr-defined]


def test_full_disk_is_refused_before_writing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, ids = _model("gpt2-tiny"), _ids()
    plan = _tight(model, ids)
    import memplan.runtime.weight_file as wf

    class Usage:
        free = 1000

    monkeypatch.setattr(wf.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(TierFull, match="has 1000 free"):
        with applied_generation(plan, model, ssd_dir=str(tmp_path)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_mismatches_are_refused() -> None:
    model, ids = _model("gpt2-tiny"), _ids()
    plan = _tight(model, ids)
    with pytest.raises(PlanMismatch, match="gen=32 new tokens; generate asks for max_new_tokens=8"):
        with memplan.applied(plan, model):
            model.generate(ids, max_new_tokens=8, do_sample=False)
    with pytest.raises(PlanMismatch, match="batch 2, prompt 16"):
        with memplan.applied(plan, model):
            model.generate(_ids(prompt=12), max_new_tokens=GEN, do_sample=False)
    other = _model("llama-tiny")
    with pytest.raises(PlanMismatch, match="another model"):
        with memplan.applied(plan, other):
            pass
    single = memplan.plan("zoo:gpt2-tiny", mode="infer", budget="1GiB", batch=2, seq=16)
    with pytest.raises(InvalidInput, match="one inference forward"):
        with memplan.applied(single, model):
            pass
    # the refused runs gave the model its weights back
    assert all(p.numel() > 0 for p in model.parameters())


def test_plan_file_round_trip(tmp_path: Path) -> None:
    model, ids = _model("gpt2-tiny"), _ids()
    plan = _tight(model, ids)
    path = tmp_path / "plan.json"
    plan.save(str(path))
    loaded = memplan.load(str(path))
    assert loaded.decisions.placement == plan.decisions.placement and loaded.workload.gen == GEN
    assert json.loads(path.read_text())["workload"]["gen"] == GEN


def test_kv_caches_on_the_host_tier() -> None:
    """KV caches planned off the device come back one layer at a time: same tokens, budget held."""
    from memplan.passes.placement import PlacementOptions
    from tests.conftest import gpu_like

    hw = gpu_like("kv-host", 1e10)
    model, ids = _model("gpt2-tiny"), _ids()
    opts = {"placement": PlacementOptions(kv_tiers=("host",))}
    plan = _tight(model, ids, hw, options=opts)
    kv_off = [p for p in plan.decisions.placement.tensors if p.value_id in _kv_ids(plan)]  # type: ignore[union-attr]
    assert kv_off and all(p.tier == "host" for p in kv_off)
    plain = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    with memplan.applied(plan, model) as run:
        placed = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    m = run.finish()
    assert torch.equal(plain, placed)
    cmp = plan.compare(m)
    assert cmp.within_budget, cmp.describe()
    assert m.bytes_read["host"] > 0


def _kv_ids(plan: memplan.Plan) -> set[int]:
    from memplan.ir.graph import Role

    return {v.id for v in plan.tensors if v.role == Role.KV_CACHE}


def test_weights_read_together_but_dropped_apart_do_not_outlive_their_copy() -> None:
    """Step 0 issues the first two units' weights; the first is dropped a step earlier than the second, so
    they must not share a read buffer (it would live until the later drop, above the plan)."""
    model, ids = _model("gpt2-tiny"), _ids(batch=1, prompt=4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = memplan.plan(model, ids, mode="infer", budget=int(0.9 * weights), gen=4)
    with memplan.applied(plan, model) as run:
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    cmp = plan.compare(run.finish())
    assert cmp.within_budget, cmp.describe()


def test_quantized_weights_stream_from_the_ssd_within_budget() -> None:
    from memplan.passes.bitwidth import BitwidthOptions
    from memplan.plans.decisions import Candidate
    from memplan.runtime.quantized import quantize_model

    model, ids = _model("gpt2-tiny"), _ids()
    int4 = (Candidate("int4", False, "per-group", 32),)
    opts = {"bitwidth": BitwidthOptions(estimator="fisher", candidates=int4, size_limit_bytes=64_000)}
    passes = ["bitwidth", "placement", "allocate"]
    plan = _tight(model, ids, passes=passes, options=opts)
    bits, placed = plan.decisions.bits, plan.decisions.placement
    assert bits is not None and bits.tensors and placed is not None
    quantized = {b.value_id for b in bits.tensors}
    streamed = {p.value_id for p in placed.tensors} & quantized
    assert streamed, "some quantized weights live on the SSD tier"
    sizes = {v.id: v.size_bytes for v in plan.graph().values}
    reference = _model("gpt2-tiny")
    quantize_model(plan, reference)
    expect = _generate(reference, ids)
    with memplan.applied(plan, model) as run:
        assert run.file is not None
        assert all(run.file.stored[v].nbytes == sizes[v] for v in streamed), "the stored form, not floats"
        got = _generate(model, ids)
    m = run.finish()
    assert torch.equal(got.sequences, expect.sequences)  # type: ignore[attr-defined]
    for a, b in zip(expect.scores, got.scores, strict=True):  # type: ignore[attr-defined]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(a.abs().max()))
    cmp = plan.compare(m)
    assert cmp.within_budget, cmp.describe()
    assert type(model.lm_head).__name__ == "Linear", "the float modules are back"


def test_kv_budgets_run_under_memplan_applied_with_placement() -> None:
    from memplan.passes.kv_budget import KVBudgetOptions

    model, ids = _model("gpt2-tiny"), _ids()
    opts = {"kv_budget": KVBudgetOptions(method="uniform", sink_tokens=2, recent_tokens=4)}
    plan = _tight(model, ids, kv_budget="40%", options=opts)
    kv, placed = plan.decisions.kv, plan.decisions.placement
    assert kv is not None and placed is not None and placed.tensors
    assert all(b.tokens < ids.shape[1] + GEN for b in kv.budgets)
    with memplan.applied(plan, model) as run:
        tokens = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    m = run.finish()
    assert tokens.shape == (2, ids.shape[1] + GEN)
    assert m.kv is not None and m.kv.evicted_tokens > 0
    assert m.kv_peak_bytes == kv.planned_bytes <= kv.budget_bytes
    cmp = plan.compare(m)
    assert cmp.kv == (kv.planned_bytes, kv.planned_bytes, kv.budget_bytes)
    assert cmp.within_budget, cmp.describe()


def test_budgeted_kv_caches_on_the_host_tier() -> None:
    """Compressed caches planned off the device leave after their layer and come back before it: the same
    tokens as the compressed cache on the device, every budget held."""
    from memplan.passes.kv_budget import KVBudgetOptions
    from memplan.passes.placement import PlacementOptions
    from memplan.runtime.kv_cache import applied_kv
    from tests.conftest import gpu_like

    hw = gpu_like("kv-host", 1e10)
    model, ids = _model("tiny-lm"), _ids(batch=4, prompt=64)  # 4 layers: one or two caches at a time
    opts = {"placement": PlacementOptions(kv_tiers=("host",)),
            "kv_budget": KVBudgetOptions(method="uniform", sink_tokens=2, recent_tokens=4)}  # fmt: skip
    plan = _tight(model, ids, hw, kv_budget="60%", options=opts)
    kv = plan.decisions.kv
    kv_off = [p for p in plan.decisions.placement.tensors if p.value_id in _kv_ids(plan)]  # type: ignore[union-attr]
    assert kv is not None and kv_off and all(p.tier == "host" for p in kv_off)
    with applied_kv(kv, model):
        expect = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    with memplan.applied(plan, model) as run:
        got = model.generate(ids, max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    m = run.finish()
    assert torch.equal(expect, got)
    cmp = plan.compare(m)
    assert cmp.within_budget, cmp.describe()
    assert m.bytes_read["host"] > 0 and m.tier_peak_bytes["host"] > 0
    assert m.kv is not None and m.kv.evicted_tokens > 0 and m.kv_peak_bytes < kv.planned_bytes
