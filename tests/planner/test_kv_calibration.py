"""The KV calibration: attention statistics per layer and key/value head, with GPT-2 and GQA Llama."""

from __future__ import annotations

import pytest
import torch

import memplan
from memplan.errors import InvalidInput
from memplan.planner.kv_calibration import KVCalibrationSettings, calibrate_kv, kv_geometry
from memplan.zoo import catalog

SETTINGS = KVCalibrationSettings(ratios=(0.25, 0.5, 1.0), sink_tokens=2, recent_tokens=4, window=4,
                                 group_size=16, follow=8)  # fmt: skip


def _sequences(n: int = 2, length: int = 40) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, length), generator=gen) for _ in range(n)]


@pytest.mark.parametrize(("name", "kv_heads"), [("gpt2-tiny", 4), ("llama-tiny", 2)])
def test_statistics_per_layer_and_head(name: str, kv_heads: int) -> None:
    model = catalog.get(name).build()
    cal = calibrate_kv(model, _sequences(), SETTINGS)
    geo = kv_geometry(model.config, torch.float32)
    assert (cal.layers, cal.kv_heads, cal.head_dim, cal.dtype_bytes) == (2, kv_heads, geo.head_dim, 4)
    assert (cal.prompt, cal.follow, cal.samples) == (32, 8, 2)
    assert len(cal.heads) == cal.layers * (kv_heads + 1)
    for h in cal.heads:
        assert list(h.mass) == sorted(h.mass) and h.mass[-1] == pytest.approx(1.0)
        assert 0 < h.entropy and 0 <= h.sink_mass <= 1 and 0 <= h.recent_mass <= 1
        full, *quantized = h.errors[-1]
        assert full == 0.0, "the whole prompt at the cache dtype is the full cache"
        assert 0 < quantized[0] <= quantized[1] <= quantized[2], "fewer bits, more error"
        assert h.errors[0][0] >= h.errors[1][0] >= 0, "fewer tokens, more error"
    layer = cal.of(1)
    heads = [cal.of(1, j) for j in range(kv_heads)]
    assert layer.entropy == pytest.approx(sum(h.entropy for h in heads) / kv_heads)


def test_short_or_ragged_sequences_are_refused() -> None:
    model = catalog.get("gpt2-tiny").build()
    with pytest.raises(InvalidInput, match="prompt"):
        calibrate_kv(model, _sequences(length=12), SETTINGS)
    with pytest.raises(InvalidInput, match="same length"):
        calibrate_kv(model, [*_sequences(1), *_sequences(1, length=44)], SETTINGS)
    with pytest.raises(InvalidInput, match="at least one"):
        calibrate_kv(model, [], SETTINGS)


def test_memplan_plan_measures_and_stores_the_statistics() -> None:
    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", batch=2, seq=16, gen=6, kv_budget="30%")
    kv = plan.decisions.kv
    assert kv is not None and kv.method == "memplan" and kv.calibration is not None
    assert kv.calibration.layers == 2 and kv.planned_bytes <= kv.budget_bytes
    assert kv.group_size == 16, "gpt2-tiny's heads of 16 take groups of 16"
