"""bench/bitwidth.py's pieces on tiny inputs: llama.cpp's Q4_K_M rule, the peer comparison, the whole quality
curve on a two-layer MLP measured with the embedding loss, the plot, and MiniLM's loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench import bitwidth as bw
from memplan.planner.models import capture, load_model
from memplan.planner.sensitivity import SensitivitySettings, embedding_loss, measure_sensitivity
from memplan.plans.plan import Workload


def test_q4km_more_bits_follows_use_more_bits() -> None:
    gpt2 = [f"model.transformer.h.{i}.{k}.weight" for i in range(4) for k in ("attn.c_attn", "attn.c_proj",
                                                                               "mlp.c_fc", "mlp.c_proj")]
    more = bw.q4km_more_bits(gpt2)
    assert all(more[n] for n in gpt2 if "c_attn" in n)  # a fused qkv: Q5_K always
    down = {int(n.split(".")[3]) for n in gpt2 if "mlp.c_proj" in n and more[n]}
    assert down == {2, 3}  # 4 layers: i >= 7*4//8 = 3, or i % 3 == 2
    assert not any(more[n] for n in gpt2 if "attn.c_proj" in n or "c_fc" in n)
    bert = [f"bert.encoder.layer.{i}.{k}.weight" for i in range(6) for k in (
        "attention.self.query", "attention.self.value", "attention.output.dense", "output.dense")]
    more = bw.q4km_more_bits(bert)
    assert {n for n in bert if more[n]} == {f"bert.encoder.layer.{i}.{k}.weight" for i in (2, 5)
                                            for k in ("attention.self.value", "output.dense")}


def test_compare_to_peers_takes_the_best_peer_that_fits() -> None:
    rows: list[dict[str, Any]] = [
        {"config": "int4", "bytes": 10, "cos": 0.90}, {"config": "rule", "bytes": 14, "cos": 0.95},
        {"config": "int8", "bytes": 20, "cos": 0.99},
        {"config": "memplan @ a", "bytes": 9, "limit": 9, "cos": 0.5},
        {"config": "memplan @ b", "bytes": 15, "limit": 15, "cos": 0.96},
        {"config": "memplan @ c", "bytes": 20, "limit": 20, "cos": 0.98},
    ]
    out = {r["config"]: r for r in bw.compare_to_peers(rows, "cos", higher_better=True)}
    assert (out["memplan @ a"]["best_peer"], out["memplan @ a"]["vs_peer"]) == ("-", "ok")
    assert (out["memplan @ b"]["best_peer"], out["memplan @ b"]["vs_peer"]) == ("rule", "ok")
    assert (out["memplan @ c"]["best_peer"], out["memplan @ c"]["vs_peer"]) == ("int8", "LOSES")
    assert "int4" not in out or "best_peer" not in out["int4"]
    assert bw.verdict(list(out.values())) == "memplan at least the best peer that fits at 1 of 2 sizes; " \
        "loses at memplan @ c"
    lower = {r["config"]: r for r in bw.compare_to_peers(
        [{"config": "int4", "bytes": 1, "dloss": 0.2}, {"config": "memplan @ x", "bytes": 1, "limit": 1,
                                                         "dloss": 0.1}], "dloss", higher_better=False)}
    assert lower["memplan @ x"]["vs_peer"] == "ok"


def _mlp_subject() -> bw.Subject:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    calib = [torch.randn(8, 64) for _ in range(2)]
    evals = [torch.randn(16, 64)]
    graph, _ = capture(load_model(model, "infer", (evals[0][:1],)), "infer")
    return bw.Subject("mlp", model, graph, Workload("infer", 1, None), calib, embedding_loss,
                      lambda m: bw.embeddings(m, evals), bw.embedding_quality, "cos", True, ("hutchinson",),
                      ())  # fmt: skip


def test_embedding_loss_curvature_is_gauss_newton() -> None:
    s = _mlp_subject()
    cands = bw.BitwidthOptions().resolved_candidates()
    table = measure_sensitivity(s.model, s.calib, cands, SensitivitySettings(probes=2), embedding_loss)
    assert "embedding_loss" in table.description and "replaced" not in table.description
    assert all(t.curvature > 0 for t in table.tensors)  # every probe of a PSD Hessian is >= 0
    fisher = measure_sensitivity(s.model, s.calib, cands, SensitivitySettings("fisher"), embedding_loss)
    assert all(t.curvature < 1e-9 * h.curvature for t, h in zip(fisher.tensors, table.tensors, strict=True))


def test_quality_curve_on_a_tiny_mlp(tmp_path: Path) -> None:
    s = _mlp_subject()
    rows, tables = bw.quality_curve(s, probes=2)
    by = {r["config"]: r for r in rows}
    assert set(bw.PEERS) | {"float"} <= set(by)
    assert by["float"]["cos"] == pytest.approx(1.0) and by["float"]["of_fp32"] == 1.0
    assert by["int8"]["cos"] > by["int4"]["cos"]
    for k, r in by.items():
        if k.startswith("memplan @"):
            assert r["bytes"] <= r["limit"] and r["vs_peer"] in ("ok", "LOSES")
    assert by["memplan @ int4 bytes"]["best_peer"] == "int4"
    bw.plot(rows, {"mlp": ("cos", True)}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_minilm_loads_and_embeds() -> None:
    loaded = bw.load_minilm()
    if isinstance(loaded, str):
        pytest.skip(loaded)
    encoder, batches = loaded
    (ids,) = batches(("A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a "
                      "baby."), 8)
    emb = bw.embeddings(encoder, [ids])
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.7 > 0.0 > sim[0, 2]  # all-MiniLM-L6-v2's trained weights, not a random init
    assert not set(bw.CALIBRATION) & set(bw.HELD_OUT)
