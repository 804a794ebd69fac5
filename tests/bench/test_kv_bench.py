"""bench/kv.py's evaluation on a tiny model: the full budget reproduces the full cache, a small one holds
its planned bytes, and the PrefixKV check reads the plans."""

import math

import pytest
import torch

import bench.kv as kv_bench
from memplan.planner.kv_calibration import KVCalibrationSettings, calibrate_kv
from memplan.zoo import catalog


def test_rows_on_a_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_bench, "PROMPT", 40)
    monkeypatch.setattr(kv_bench, "GEN", 8)
    model = catalog.get("gpt2-tiny").build().eval()
    gen = torch.Generator().manual_seed(0)
    evals = [torch.randint(0, 256, (2, 48), generator=gen)]
    cal = calibrate_kv(model, evals, KVCalibrationSettings(group_size=16, follow=8))
    reference = [kv_bench._full(model, ids) for ids in evals]
    ref_ppl = math.exp(reference[0][0])
    plan = kv_bench._plan(model, evals[0], "uniform", 1.0, cal)
    full = kv_bench._row(plan, model, evals, reference, ref_ppl, 1.0)
    assert full["agree"] == 1.0 and full["ppl"] == pytest.approx(ref_ppl, rel=1e-5)
    small = kv_bench._row(kv_bench._plan(model, evals[0], "prefixkv", 0.5, cal), model, evals, reference,
                          ref_ppl, 0.5)  # fmt: skip
    assert small["measured"] == small["planned"] <= small["kv_bytes"]
    check = kv_bench._prefix_check(cal, [small])
    assert check["worst_mean_ratio_error"] < 1e-9 and all(s < 1 for s in check["spare_tokens_per_layer"])
