"""The compressed KV cache under `applied_kv`: budgets held at every step, the tracker's KV bytes equal to
the plan's, a full budget bitwise equal to DynamicCache, quantized tokens within their bound, sinks and
the recent window never evicted, per-layer and per-head budgets, positions right (a recent-only budget is
transformers' own sliding-window cache, bit for bit), HF's default generate call, and every refusal."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformers import DynamicCache

from memplan.errors import InvalidInput, PlanMismatch
from memplan.kernels.kv_quant import QuantizedKV, dequantize_kv, error_bound
from memplan.plans.decisions import KVBudget, KVDecision, kv_token_bytes
from memplan.runtime.kv_cache import KVCache, applied_kv
from memplan.zoo import catalog
from memplan.zoo.catalog import build_from_config, opt_config

GROUP = 16
"""The tiny configs' head dim is 16: groups of 16 (the default 32 does not divide it)."""


def build(name: str, impl: str = "eager") -> torch.nn.Module:
    if name == "opt-tiny":
        cfg = opt_config(64, 2, 4)
        cfg.vocab_size, cfg.max_position_embeddings = 256, 128
        model = build_from_config(transformers.OPTForCausalLM, cfg, "cpu", torch.float32)
    else:
        model = catalog.get(name).build()
    model.set_attn_implementation(impl)
    return model


def prompt(batch: int = 2, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask that left-pads the first sequence by 3."""
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> Any:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)  # fmt: skip


def same(a: Any, b: Any) -> bool:
    return torch.equal(a.sequences, b.sequences) and all(
        torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True)
    )


def kv_heads(model: torch.nn.Module) -> int:
    return getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads


def per_layer(tokens: int, bits: int | None = None, layers: int = 2, **kw: int) -> KVDecision:
    return KVDecision(tuple(KVBudget(layer, tokens, bits) for layer in range(layers)), group_size=GROUP, **kw)


@pytest.mark.parametrize(
    ("name", "impl", "heads"),
    [("gpt2-tiny", "eager", False), ("gpt2-tiny", "sdpa", True), ("llama-tiny", "eager", True),
     ("llama-tiny", "sdpa", False), ("opt-tiny", "eager", False)],
)  # fmt: skip
def test_a_full_budget_reproduces_the_uncompressed_outputs(name: str, impl: str, heads: bool) -> None:
    model = build(name, impl)
    ids, mask = prompt()
    ref = generate(model, ids, mask, 6)
    budgets = [KVBudget(layer, 17, None, h if heads else None)
               for layer in range(2) for h in (range(kv_heads(model)) if heads else [None])]  # fmt: skip
    with applied_kv(KVDecision(tuple(budgets), group_size=GROUP), model) as run:
        out = generate(model, ids, mask, 6)
    assert same(out, ref)
    m = run.finish()
    assert m.evicted_tokens == 0 and m.kept_tokens == {0: (17,) * kv_heads(model), 1: (17,) * kv_heads(model)}
    assert (
        m.peak_kv_bytes
        == m.planned_kv_bytes
        == 2 * 17 * kv_token_bytes(16, None, 4, GROUP) * 2 * kv_heads(model)
    )
    assert model.config._attn_implementation == impl


def test_hf_default_generate_call() -> None:
    """use_cache and return_dict_in_generate at their defaults: a tensor of ids, the cache made by us."""
    model = build("gpt2-tiny")
    ids = prompt(batch=1)[0]
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    with applied_kv(per_layer(16), model) as run:
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), ref)
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    m = run.finish()
    assert out.shape == (1, 17) and m.caches == 2 and m.forwards == 10
    assert m.peak_kv_bytes == m.planned_kv_bytes  # the first call's cache was freed before the second


def test_budgets_hold_at_every_step_of_a_long_generation() -> None:
    model = build("llama-tiny")
    ids, mask = prompt(length=24)
    decision = KVDecision((KVBudget(0, 12, 4), KVBudget(1, 20)), sink_tokens=2, recent_tokens=4, window=8,
                          group_size=GROUP)  # fmt: skip
    held: list[dict[int, list[int]]] = []
    with applied_kv(decision, model) as run:
        caches: list[KVCache] = []
        model.register_forward_hook(
            lambda *a: held.append({i: lay.held() for i, lay in enumerate(caches[-1].layers)})
        )
        cache = run.new_cache()
        caches.append(cache)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                             past_key_values=cache)  # fmt: skip
    m = run.finish()
    assert out.shape == (2, 64) and len(held) == 40
    assert all(h[0] == [12, 12] and h[1] == [20, 20] for h in held)  # full from the prefill on
    assert m.max_kept_tokens == {0: (12, 12), 1: (20, 20)}
    assert cache.get_seq_length() == 63 == m.seen_tokens
    assert m.evicted_tokens == ((63 - 12) + (63 - 20)) * 2 * 2  # per layer, x batch x kv heads
    planned = 2 * 2 * (12 * kv_token_bytes(16, 4, 4, GROUP) + 20 * kv_token_bytes(16, None, 4, GROUP))
    assert m.peak_kv_bytes == m.planned_kv_bytes == planned
    model._forward_hooks.clear()


def test_tracker_kv_bytes_equal_the_planned_bytes_per_head_and_bits() -> None:
    """GQA, per-head budgets at different bits: the tracker sees exactly the budgets' bytes; the heads a
    per-head layer leaves without a budget keep everything (reported apart)."""
    model = build("llama-tiny")
    ids, mask = prompt(length=20)
    budgets = (KVBudget(0, 6, 2, head=0), KVBudget(0, 9, 8, head=1), KVBudget(1, 7, 4, head=0),
               KVBudget(1, 11, None, head=1))  # fmt: skip
    with applied_kv(KVDecision(budgets, sink_tokens=1, recent_tokens=2, group_size=GROUP), model) as run:
        generate(model, ids, mask, 8)
    m = run.finish()
    want = 2 * sum(b.tokens * kv_token_bytes(16, b.bits, 4, GROUP) for b in budgets)
    assert m.peak_kv_bytes == m.planned_kv_bytes == want
    assert m.kept_tokens == {0: (6, 9), 1: (7, 11)} and m.full_kv_bytes == 0
    assert m.index_bytes == 2 * (6 + 9 + 7 + 11) * (4 + 8)
    partial = KVDecision((KVBudget(0, 6, 4, head=0),), group_size=GROUP)
    with applied_kv(partial, model) as run:
        generate(model, ids, mask, 4)
    m = run.finish()
    assert m.kept_tokens == {0: (6, 23), 1: (23, 23)}
    assert m.planned_kv_bytes == 2 * 6 * kv_token_bytes(16, 4, 4, GROUP)
    assert m.full_kv_bytes == 2 * 3 * 23 * kv_token_bytes(16, None, 4, GROUP)


@torch.no_grad()
def test_quantized_tokens_round_trip_within_the_bound() -> None:
    """The keys and values a 4-bit cache holds dequantize to within the format's bound of DynamicCache's."""
    model = build("gpt2-tiny")
    ids, mask = prompt(length=14)
    ref = DynamicCache()
    model(ids, attention_mask=mask, past_key_values=ref)
    for bits in (8, 4, 2):
        with applied_kv(per_layer(32, bits), model) as run:
            cache = run.new_cache()
            model(ids, attention_mask=mask, past_key_values=cache)
        for layer in range(2):
            g = cache.layers[layer].groups[0]
            for side, want in (("k", ref.layers[layer].keys), ("v", ref.layers[layer].values)):
                q = QuantizedKV(*(g.kv[side + s][:, :, :14] for s in "csz"), bits, GROUP)
                err = (dequantize_kv(q) - want).abs()
                assert bool((err <= error_bound(q)).all())
                assert float(err.max()) > 0


def test_sinks_and_the_recent_window_are_never_evicted() -> None:
    """After every forward each head holds the first 3 tokens after the padding and the last 4 seen."""
    model = build("gpt2-tiny")
    ids, mask = prompt(length=16)
    decision = per_layer(9, 4, sink_tokens=3, recent_tokens=4, window=4)
    checked = []
    with applied_kv(decision, model) as run:
        cache = run.new_cache()

        def check(*_: Any) -> None:
            for layer in cache.layers:
                seen = layer.get_seq_length()
                for pos in layer.kept_positions():
                    for row, start in ((0, 3), (1, 0)):
                        kept = set(pos[row].tolist())
                        assert set(range(start, start + 3)) <= kept and set(range(seen - 4, seen)) <= kept
                        assert pos[row].tolist() == sorted(kept) and len(kept) == 9
            checked.append(seen)

        hook = model.register_forward_hook(check)
        model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                       past_key_values=cache)  # fmt: skip
        hook.remove()
    assert checked == list(range(16, 28))


def test_left_padding_is_evicted_first() -> None:
    model = build("gpt2-tiny")
    ids, mask = prompt(length=16)
    with applied_kv(per_layer(8), model) as run:
        cache = run.new_cache()
        model(ids, attention_mask=mask, past_key_values=cache)
    for layer in cache.layers:
        assert all(int(pos[0].min()) >= 3 for pos in layer.kept_positions())


def test_a_recent_only_budget_is_the_sliding_window_cache_bit_for_bit() -> None:
    """Positions stay right: Mistral with a sliding window of 8 keeps the last 7 tokens in transformers'
    own DynamicSlidingWindowLayer; a budget of 7 recent tokens evicts the same ones, and rotary positions,
    masks and outputs agree exactly."""
    cfg = transformers.MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, attn_implementation="eager",
    )  # fmt: skip
    model = build_from_config(transformers.MistralForCausalLM, cfg, "cpu", torch.float32)
    ids, mask = prompt(length=20)
    ref = generate(model, ids, mask, 10)
    assert isinstance(ref.past_key_values.layers[0], transformers.cache_utils.DynamicSlidingWindowLayer)
    with applied_kv(per_layer(7, recent_tokens=7), model) as run:
        out = generate(model, ids, mask, 10)
    assert same(out, ref) and run.finish().evicted_tokens > 0


def test_equal_per_head_budgets_are_the_per_layer_budget() -> None:
    """The ragged per-head path (padded keys, per-head masks) is bitwise what one group of all heads does."""
    model = build("llama-tiny")
    ids, mask = prompt(length=18)
    with applied_kv(per_layer(10, recent_tokens=2, sink_tokens=1), model):
        layer_out = generate(model, ids, mask, 8)
    heads = tuple(KVBudget(layer, 10, head=h) for layer in range(2) for h in range(2))
    with applied_kv(KVDecision(heads, sink_tokens=1, recent_tokens=2, group_size=GROUP), model):
        head_out = generate(model, ids, mask, 8)
    assert same(layer_out, head_out)


def test_per_head_budgets_hold_and_head_zero_keeps_nothing() -> None:
    model = build("llama-tiny", "sdpa")
    ids, mask = prompt(length=18)
    budgets = (
        KVBudget(0, 0, head=0),
        KVBudget(0, 12, 2, head=1),
        KVBudget(1, 5, 8, head=0),
        KVBudget(1, 9, head=1),
    )
    with applied_kv(KVDecision(budgets, group_size=GROUP), model) as run:
        out = generate(model, ids, mask, 8)
    m = run.finish()
    assert m.kept_tokens == m.max_kept_tokens == {0: (0, 12), 1: (5, 9)}
    assert all(bool(torch.isfinite(x).all()) for x in out.logits)
    assert m.peak_kv_bytes == m.planned_kv_bytes


def test_hand_written_loop_prefill_then_teacher_forced_steps() -> None:
    """The benchmark's perplexity loop: a full budget gives DynamicCache's logits; a small one keeps its
    budget while positions count every token seen."""
    model = build("llama-tiny")
    ids = prompt(batch=1, length=24)[0]

    def loop(cache: Any) -> list[torch.Tensor]:
        logits = [model(ids[:, :16], past_key_values=cache).logits[:, -1]]
        for t in range(16, 24):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
        return logits

    ref = loop(DynamicCache())
    with applied_kv(per_layer(24), model) as run:
        full = loop(run.new_cache())
        small_cache = run.new_cache()
        small = loop(small_cache)
    assert all(torch.equal(a, b) for a, b in zip(full, ref, strict=True))
    with applied_kv(per_layer(6, 4, recent_tokens=2), model) as run2:
        cache = run2.new_cache()
        small = loop(cache)
    assert cache.get_seq_length() == 24 and [lay.held() for lay in cache.layers] == [[6, 6], [6, 6]]
    assert all(bool(torch.isfinite(x).all()) for x in small) and not torch.equal(small[-1], ref[-1])
    assert small_cache.get_seq_length() == 24


def test_beam_search_reorders_the_cache() -> None:
    model = build("gpt2-tiny")
    ids = prompt(batch=1)[0]
    ref = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
    with applied_kv(per_layer(16), model) as run:
        out = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(out, ref) and run.finish().batch == 2


# ---------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("decision", "error", "message"),
    [
        (KVDecision((KVBudget(2, 8),), group_size=GROUP), PlanMismatch, "layer 2; the model has layers 0..1"),
        (KVDecision((KVBudget(0, 8, head=2),), group_size=GROUP), PlanMismatch, "key/value heads 0..1"),
        (KVDecision((KVBudget(0, 8, 4),), group_size=32), InvalidInput, "do not pack a head of 16"),
        (KVDecision((KVBudget(0, 8, 3),), group_size=GROUP), InvalidInput, "3-bit tokens"),
        (KVDecision((KVBudget(0, 8), KVBudget(0, 9)), group_size=GROUP), InvalidInput, "layer 0 twice"),
        (KVDecision((KVBudget(0, 8), KVBudget(0, 9, head=1)), group_size=GROUP), InvalidInput, "one kind"),
        (KVDecision((KVBudget(0, -1),), group_size=GROUP), InvalidInput, "budgets are >= 0"),
        (KVDecision((KVBudget(0, 5),), sink_tokens=4, recent_tokens=2, group_size=GROUP), InvalidInput,
         "fewer than the 4 sink and 2 recent"),
        (KVDecision((KVBudget(0, 5),), window=0, group_size=GROUP), InvalidInput, "window"),
    ],
)  # fmt: skip
def test_decisions_the_model_cannot_follow_are_refused(
    decision: KVDecision, error: type, message: str
) -> None:
    model = build("llama-tiny")
    with pytest.raises(error, match=message):
        with applied_kv(decision, model):
            pass
    assert model.config._attn_implementation == "eager"


def test_calls_the_cache_cannot_serve_are_refused() -> None:
    model = build("gpt2-tiny")
    ids = prompt(batch=1)[0]
    with applied_kv(per_layer(8), model) as run:
        with pytest.raises(InvalidInput, match="use_cache=False"):
            model.generate(ids, max_new_tokens=2, use_cache=False)
        with pytest.raises(InvalidInput, match="given a DynamicCache"):
            model.generate(ids, max_new_tokens=2, past_key_values=DynamicCache())
        cache = run.new_cache()
        model(ids, past_key_values=cache)
        with pytest.raises(PlanMismatch, match="holds 1 sequences; a forward gives 2"):
            model(torch.cat([ids, ids])[:, :1], past_key_values=cache)
        with pytest.raises(InvalidInput, match="cannot be rolled back"):
            cache.crop(-1)
        fresh = run.new_cache()
        fresh.update(torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16), 0)
        with pytest.raises(PlanMismatch, match="did not run through memplan's attention"):
            fresh.update(torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16), 0)
    assert "generate" not in vars(model)


def test_unsupported_models_are_refused() -> None:
    model = build("gpt2-tiny")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(InvalidInput, match="'flex_attention' attention"):
        with applied_kv(per_layer(8), model):
            pass
    with pytest.raises(InvalidInput, match="no decoder config"):
        with applied_kv(per_layer(8), torch.nn.Linear(2, 2)):
            pass


def test_restored_after_an_error_in_the_block() -> None:
    model = build("gpt2-tiny")
    with pytest.raises(RuntimeError, match="inside"):
        with applied_kv(per_layer(8), model):
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "eager" and "generate" not in vars(model)
