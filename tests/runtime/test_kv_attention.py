"""The attention hooks: observers see every layer's query/key/value, outputs stay bitwise the same, the
model's own implementation (and its causal mask) comes back on exit, even on error."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.runtime.kv_attention import attention_probs, observed_attention, wrapped_attention
from memplan.zoo import catalog


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def generate(model: torch.nn.Module, ids: torch.Tensor):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)  # fmt: skip


@pytest.mark.parametrize(("name", "impl"), [("gpt2-tiny", "eager"), ("llama-tiny", "sdpa")])
def test_observer_sees_every_layer_and_changes_nothing(name: str, impl: str, ids: torch.Tensor) -> None:
    model = catalog.get(name).build()
    model.set_attn_implementation(impl)
    ref = generate(model, ids)
    calls: list[tuple[int, tuple[int, ...], tuple[int, ...], float]] = []

    def observer(layer, module, query, key, value, mask, scaling):
        assert module.layer_idx == layer and value.shape == key.shape
        probs = attention_probs(query, key, mask, scaling, last=2)
        assert torch.allclose(probs.sum(-1), torch.ones(()))
        calls.append((layer, tuple(query.shape), tuple(key.shape), scaling))

    with observed_attention(model, observer):
        assert model.config._attn_implementation == "memplan_" + impl
        out = generate(model, ids)
    assert model.config._attn_implementation == impl
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
    kv_heads = getattr(model.config, "num_key_value_heads", 4)
    assert [c[0] for c in calls] == [0, 1] * 4
    assert calls[0][1:3] == ((2, 4, 10, 16), (2, kv_heads, 10, 16)) and calls[-1][2] == (2, kv_heads, 13, 16)
    assert calls[0][3] == pytest.approx(16**-0.5)


def test_eager_keeps_its_causal_mask() -> None:
    """A name without a mask function gets no mask from transformers: the prefill would see the future."""
    model = catalog.get("gpt2-tiny").build()
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    masks = []
    with observed_attention(model, lambda *a: masks.append(a[5])):
        assert torch.equal(model(x).logits, ref)
    assert masks[0] is not None and masks[0].shape == (1, 1, 8, 8)


def test_restored_on_error_and_nested() -> None:
    model = catalog.get("gpt2-tiny").build()
    seen: list[str] = []

    def outer(inner, module, *args, **kwargs):
        seen.append("outer")
        return inner(module, *args, **kwargs)

    with pytest.raises(RuntimeError, match="boom"):
        with wrapped_attention(model, outer):
            with observed_attention(model, lambda *a: seen.append("inner")):
                model(torch.zeros(1, 3, dtype=torch.long))
                raise RuntimeError("boom")
    assert seen == ["outer", "inner"] * 2
    assert model.config._attn_implementation == "eager"
    model(torch.zeros(1, 3, dtype=torch.long))
    assert len(seen) == 4


def test_attention_probs_against_a_direct_softmax() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen)
    probs = attention_probs(q, k, None, 0.3, last=3)  # causal: the 3 queries at positions 4..6
    logits = torch.einsum("bhqd,bhkd->bhqk", q[:, :, 2:], k.repeat_interleave(2, 1)) * 0.3
    logits = logits.masked_fill(torch.arange(7)[None, :] > torch.arange(4, 7)[:, None], float("-inf"))
    assert torch.allclose(probs.reshape(2, 4, 3, 7), logits.softmax(-1), atol=1e-6)
    bool_mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    bool_mask[..., 0] = False
    assert float(attention_probs(q, k, bool_mask, 0.3)[..., 0].abs().max()) == 0.0


def test_a_module_that_is_not_a_hugging_face_model_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not a Hugging Face model"):
        with observed_attention(torch.nn.Linear(2, 2), lambda *a: None):
            pass
