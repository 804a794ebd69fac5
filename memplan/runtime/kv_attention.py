"""Hooks on a Hugging Face model's attention: every attention call of the model goes through functions
memplan gives, which see the query, key and value of each layer and may change the call, then run the
model's own implementation.

transformers dispatches attention by name (`config._attn_implementation`) through its
`AttentionInterface`: the model's attention module calls `fn(module, query, key, value, attention_mask,
scaling=..., dropout=..., **kwargs)` with `module.layer_idx` its layer, after `past_key_values.update`
returned the keys and values to attend to (`[batch, kv_heads, tokens, head_dim]`; query
`[batch, heads, queries, head_dim]`). `wrapped_attention(model, wrapper)` registers one dispatcher under
`memplan_<original>` (`memplan_eager`, `memplan_sdpa`), together with the original's mask function (a name
without one gets no mask at all from transformers' mask code: causal attention would silently become
bidirectional), switches the model to it, and on exit switches back, even on error. The dispatcher runs
the wrappers of the model the module belongs to, outermost context first, around the original
implementation (`eager`: the model's own `eager_attention_forward`; otherwise transformers' registered
function). Contexts nest; each model has its own wrappers, so two models may be wrapped at once.

`observed_attention(model, observer)` is the read-only case: `observer(layer_idx, module, query, key,
value, attention_mask, scaling)` is called before the original runs (calibration records attention
statistics with it; `attention_probs` gives the softmax probabilities a set of queries pays the keys).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memplan.errors import InvalidInput

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""An attention implementation: `fn(module, query, key, value, attention_mask, **kwargs) -> (output,
weights or None)`."""

Wrapper = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""`wrapper(inner, module, query, key, value, attention_mask, **kwargs)`: runs one attention call, usually
by calling `inner(module, query, key, value, attention_mask, **kwargs)` (the next wrapper, or the model's
original implementation) with what it chooses, and returns what the implementation returns."""

Observer = Callable[
    [int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], None
]
"""`observer(layer_idx, module, query, key, value, attention_mask, scaling)`, called before the attention."""

PREFIX = "memplan_"


@dataclass
class _Wrapped:
    """One model's wrapping: the implementation it had and the active wrappers, outermost first."""

    original: str
    wrappers: list[Wrapper] = field(default_factory=list)


_BY_MODULE: dict[int, _Wrapped] = {}
"""id of every submodule of a wrapped model -> its model's wrapping."""


def original_implementation(module: nn.Module, name: str) -> AttentionFn:
    """The attention function the implementation `name` runs for `module` (`eager`: its modeling file's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise InvalidInput(
                f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}: "
                "memplan hooks attention of models that dispatch it through transformers' AttentionInterface"
            )
        return fn  # type: ignore[no-any-return]
    return ALL_ATTENTION_FUNCTIONS[name]  # type: ignore[no-any-return]


def _dispatch(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function registered as `memplan_<original>`: the module's model's wrappers around the original."""
    state = _BY_MODULE.get(id(module))
    if state is None:  # a model left on the name without a context (e.g. a copy made inside one)
        config = getattr(module, "config", None)
        name = config._attn_implementation.removeprefix(PREFIX) if config is not None else "eager"
        return original_implementation(module, name)(module, query, key, value, attention_mask, **kwargs)
    fn: AttentionFn = original_implementation(module, state.original)
    for wrapper in reversed(state.wrappers):
        fn = _bind(wrapper, fn)
    return fn(module, query, key, value, attention_mask, **kwargs)


def _bind(wrapper: Wrapper, inner: AttentionFn) -> AttentionFn:
    def call(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return wrapper(inner, *args, **kwargs)

    return call


def _register(original: str) -> str:
    """Register the dispatcher (and `original`'s mask function) as `memplan_<original>`; its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if original not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise InvalidInput(
            f"attention implementation {original!r} has no mask function in transformers: memplan hooks the "
            f"implementations that have one ({', '.join(sorted(ALL_MASK_ATTENTION_FUNCTIONS))})"
        )
    name = PREFIX + original
    AttentionInterface.register(name, _dispatch)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


@contextmanager
def wrapped_attention(model: nn.Module, wrapper: Wrapper) -> Iterator[None]:
    """Run every attention call of `model` through `wrapper` (see the module docstring) inside the block."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise InvalidInput(
            f"{type(model).__name__} is not a Hugging Face model: memplan hooks attention through "
            "transformers' AttentionInterface"
        )
    state = _BY_MODULE.get(id(model))
    outermost = state is None
    if state is None:
        original = config._attn_implementation or "eager"
        name = _register(original)
        model.set_attn_implementation(name)
        if config._attn_implementation != name:
            model.set_attn_implementation(original)
            raise InvalidInput(
                f"{type(model).__name__} cannot switch its attention implementation (it does not dispatch "
                "attention through transformers' AttentionInterface), so memplan cannot hook it"
            )
        state = _Wrapped(original)
        for m in model.modules():
            _BY_MODULE[id(m)] = state
    state.wrappers.append(wrapper)
    try:
        yield
    finally:
        state.wrappers.remove(wrapper)
        if outermost:
            for m in model.modules():
                if _BY_MODULE.get(id(m)) is state:
                    del _BY_MODULE[id(m)]
            model.set_attn_implementation(state.original)


def resolved_scaling(query: torch.Tensor, kwargs: dict[str, Any]) -> float:
    """The softmax scaling of this call: the one the module passes, else 1 / sqrt(head_dim) as the
    implementations default to."""
    scaling = kwargs.get("scaling")
    return float(query.shape[-1] ** -0.5 if scaling is None else scaling)


@contextmanager
def observed_attention(model: nn.Module, observer: Observer) -> Iterator[None]:
    """Call `observer(layer_idx, module, query, key, value, attention_mask, scaling)` before each attention
    call of `model` inside the block; the attention itself runs unchanged."""

    def observe(
        inner: AttentionFn,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = getattr(module, "layer_idx", None)
        observer(-1 if layer is None else int(layer), module, query, key, value, attention_mask,
                 resolved_scaling(query, kwargs))  # fmt: skip
        return inner(module, query, key, value, attention_mask, **kwargs)

    with wrapped_attention(model, observe):
        yield


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    last: int | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities, fp32 `[batch, kv_heads, heads / kv_heads, queries, keys]`, that the
    `last` queries (all when None) pay every key: per key/value head, its query group on the third dim.
    `attention_mask` as the implementations take it: None (causal, queries at the end of the keys), bool
    (True: attend) or additive float, `[batch, 1 or heads, queries, >= keys]`."""
    b, heads, q_len, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[-2]
    rows = q_len if last is None else min(last, q_len)
    q = query[:, :, q_len - rows :].float().reshape(b, kv_heads, heads // kv_heads, rows, dim)
    logits = torch.matmul(q, key.float().unsqueeze(2).transpose(-1, -2)) * scaling  # [b, kvh, g, rows, n]
    if attention_mask is None:
        qpos = torch.arange(n - rows, n, device=key.device)[:, None]
        logits = logits.masked_fill(torch.arange(n, device=key.device)[None, :] > qpos, float("-inf"))
    else:
        mask = attention_mask[:, :, q_len - rows :, :n]
        if mask.shape[1] == heads:
            mask = mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, rows, n)
        else:
            mask = mask[:, None]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)
