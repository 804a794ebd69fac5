"""The generation frontend: units in call order, costs from a fake-tensor run, KV growth, the unit graph."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import CaptureError, InvalidInput
from memplan.ir.analysis import lifetimes
from memplan.ir.frontends.causal_lm import find_layers, generation_graph, profile_generation
from memplan.ir.graph import Role
from memplan.zoo import catalog


@pytest.fixture(scope="module")
def gpt2_profile():  # type: ignore[no-untyped-def]
    return profile_generation(catalog.get("gpt2-tiny").build(device="meta"), 2, 16, "gpt2-tiny")


def test_units_are_the_call_order_of_generate(gpt2_profile) -> None:  # type: ignore[no-untyped-def]
    paths = [u.path for u in gpt2_profile.units]
    assert paths == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                     "transformer.ln_f", "lm_head"]  # fmt: skip
    assert [u.layer for u in gpt2_profile.units] == [None, None, 0, 1, None, None]
    # the LM head reads the embedding's weight (tied): the same storage, by its first name
    assert gpt2_profile.units[-1].state == ("transformer.wte.weight",)


def test_kv_cache_bytes_follow_the_config(gpt2_profile) -> None:  # type: ignore[no-untyped-def]
    layer = gpt2_profile.units[2]
    # keys and values, batch 2, 4 heads x 16 dims (width 64), fp32
    assert layer.kv_token_bytes == 2 * 2 * 64 * 4
    assert layer.kv_prompt_bytes == 16 * layer.kv_token_bytes
    assert layer.prefill.flops > 16 * layer.decode.flops * 0.5  # the prompt is 16 tokens, decode is 1


def test_probing_two_layers_gives_what_profiling_all_gives() -> None:
    model = catalog.get("llama-tiny").build(device="meta")
    layers_path, layers = find_layers(model)
    model.config.num_hidden_layers = 4
    extra = [type(layers[0])(model.config, i) for i in range(2, 4)]
    for m in extra:
        m.to("meta")
    model.get_submodule(layers_path.rsplit(".", 1)[0]).layers = torch.nn.ModuleList([*layers, *extra])
    short = profile_generation(model, 1, 8)
    from memplan.ir.frontends import causal_lm

    original = causal_lm._probe_layers
    causal_lm._probe_layers = lambda ls: len(ls)  # type: ignore[assignment]
    try:
        full = profile_generation(model, 1, 8)
    finally:
        causal_lm._probe_layers = original  # type: ignore[assignment]
    assert [u.path for u in short.units] == [u.path for u in full.units]
    for a, b in zip(short.units, full.units, strict=True):
        assert (a.prefill, a.decode, a.kv_prompt_bytes, a.kv_token_bytes) == (
            b.prefill, b.decode, b.kv_prompt_bytes, b.kv_token_bytes,
        )  # fmt: skip


def test_generation_graph(gpt2_profile) -> None:  # type: ignore[no-untyped-def]
    g = generation_graph(gpt2_profile, 5)
    assert len(g.ops) == 5 * len(gpt2_profile.units)
    assert g.ops[0].name == "prefill:transformer.wte" and g.ops[-1].name == "decode4:lm_head"
    kv = [v for v in g.values if v.role == Role.KV_CACHE]
    assert len(kv) == 2 and all(v.size_bytes == (16 + 4) * 2 * 2 * 64 * 4 for v in kv)
    spans = lifetimes(g)
    first_decode = len(gpt2_profile.units)
    assert all(spans[v.id][0] < first_decode <= spans[v.id][1] - 1 for v in kv)
    wte = next(v for v in g.values if v.name == "transformer.wte.weight")
    assert len(g.consumers(wte.id)) == 2 * 5  # the embedding and the tied LM head, every forward


def test_bad_input() -> None:
    model = catalog.get("gpt2-tiny").build(device="meta")
    with pytest.raises(InvalidInput, match="does not fit the model's 128 positions"):
        profile_generation(model, 1, 200)
    with pytest.raises(InvalidInput, match="at least 1"):
        profile_generation(model, 0, 4)
    with pytest.raises(CaptureError, match="no repeated decoder layers"):
        find_layers(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidInput, match="gen must be at least 1"):
        generation_graph(profile_generation(model, 1, 4), 0)
