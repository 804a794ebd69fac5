"""The attention statistics the kv_budget pass allocates by (`KVCalibration`), measured on a causal LM.

Each calibration sequence is `prompt + follow` tokens. One forward runs with an observer on every
attention call (`memplan.runtime.kv_attention.observed_attention`), which sees the queries, keys and values
after the model's own projections and rotary embeddings. Per key/value head (a GQA head's query heads
together), from the causal softmax of those:

- scores: the attention the last `window` prompt queries pay each prompt token (SnapKV's observation
  window, the runtime's rule); `mass[i]`: the share of that attention the top `ratios[i]` of the prompt's
  tokens hold (PrefixKV's cumulative priority); `entropy`, `sink_mass`, `recent_mass` of the same queries;
- `errors[i][j]`: the cache as the runtime would keep it after the prompt, the sinks, the recent window
  and the best-scored others up to `ratios[i]` of the prompt, every entry stored at `bits[j]`
  (`memplan.kernels.kv_quant`), against the full cache: the relative squared error of the attention output
  of the `follow` queries after the prompt (which also see one another, as decode steps do).

A layer's statistics (`head` None) are its heads' means. Everything is averaged over sequences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from memplan.errors import InvalidInput
from memplan.passes.kv_budget import KVBudgetOptions, KVGeometry, fitted_group
from memplan.plans.decisions import KVCalibration, KVHeadStats

RATIOS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0)
"""Kept shares of the prompt the statistics are sampled at (the kv_budget ladder's token steps)."""


@dataclass(frozen=True, slots=True)
class KVCalibrationSettings:
    """Which statistics to take: sampled ratios and bit widths, protected tokens and window (as the plan
    will use them), the quantization group, and how many tokens follow each prompt."""

    ratios: tuple[float, ...] = RATIOS
    bits: tuple[int | None, ...] = (None, 8, 4, 2)
    sink_tokens: int = 4
    recent_tokens: int = 16
    window: int = 8
    group_size: int = 32
    follow: int = 16


def kv_geometry(config: Any, dtype: torch.dtype) -> KVGeometry:
    """The KV cache's shape from a Hugging Face config (GPT-2's n_layer / n_head names included)."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise InvalidInput(f"{type(config).__name__}: cannot read the layers, heads and width of its cache")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return KVGeometry(int(layers), int(kv_heads), int(head_dim), torch.empty((), dtype=dtype).element_size())


def calibrate_kv(
    model: nn.Module, sequences: Sequence[torch.Tensor], settings: KVCalibrationSettings | None = None
) -> KVCalibration:
    """Statistics of `model` (a Hugging Face causal LM) on `sequences` ([batch, prompt + follow] ids each)."""
    from memplan.runtime.kv_attention import observed_attention

    s = settings or KVCalibrationSettings()
    if not sequences:
        raise InvalidInput("KV calibration needs at least one sequence")
    length = sequences[0].shape[-1]
    prompt = length - s.follow
    if prompt < max(s.window, s.sink_tokens + s.recent_tokens, 2) or s.follow < 1:
        raise InvalidInput(
            f"KV calibration sequences of {length} tokens leave a prompt of {prompt} after {s.follow} follow "
            f"tokens: need more than the window ({s.window}) and the sink + recent tokens "
            f"({s.sink_tokens + s.recent_tokens})"
        )
    sums: dict[int, _Sums] = {}

    def observe(layer: int, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, scaling: float | None) -> None:  # fmt: skip
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        stats = _head_stats(q.float(), k.float(), v.float(), scale, prompt, s)
        sums.setdefault(layer, _Sums(layer)).add(stats)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), observed_attention(model, observe):
            for ids in sequences:
                if ids.shape[-1] != length:
                    raise InvalidInput("KV calibration sequences must all have the same length")
                model(ids, use_cache=False)
    finally:
        model.train(was_training)
    if not sums:
        raise InvalidInput(f"{type(model).__name__}: no attention call was observed; is it a causal LM?")
    heads = []
    for layer in sorted(sums):
        per_head = sums[layer].means()
        heads.append(_mean_of(layer, per_head))
        heads.extend(per_head)
    kv_heads = len(sums[min(sums)].means())
    geo = kv_geometry(model.config, next(model.parameters()).dtype)
    return KVCalibration(
        tuple(s.ratios), tuple(s.bits), tuple(heads), len(sums), kv_heads, geo.head_dim, geo.dtype_bytes,
        prompt, s.follow, len(sequences),
    )  # fmt: skip


@dataclass
class _Sums:
    """Running sums of one layer's statistics over calibration batches, each with a leading head dim."""

    layer: int
    total: dict[str, torch.Tensor] | None = None
    count: int = 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        self.total = stats if self.total is None else {k: v + stats[k] for k, v in self.total.items()}
        self.count += 1

    def means(self) -> list[KVHeadStats]:
        assert self.total is not None
        m = {k: v / self.count for k, v in self.total.items()}
        return [
            KVHeadStats(
                self.layer,
                j,
                tuple(m["mass"][j].tolist()),
                float(m["entropy"][j]),
                float(m["sink"][j]),
                float(m["recent"][j]),
                tuple(tuple(r) for r in m["errors"][j].tolist()),
            )  # fmt: skip
            for j in range(m["mass"].shape[0])
        ]


def _mean_of(layer: int, heads: list[KVHeadStats]) -> KVHeadStats:
    """A layer's statistics: the mean over its heads."""
    n = len(heads)
    mass = tuple(sum(h.mass[i] for h in heads) / n for i in range(len(heads[0].mass)))
    errors = tuple(
        tuple(sum(h.errors[i][j] for h in heads) / n for j in range(len(heads[0].errors[0])))
        for i in range(len(heads[0].errors))
    )
    return KVHeadStats(
        layer, None, mass, sum(h.entropy for h in heads) / n, sum(h.sink_mass for h in heads) / n,
        sum(h.recent_mass for h in heads) / n, errors,
    )  # fmt: skip


def _head_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, prompt: int, s: KVCalibrationSettings
) -> dict[str, torch.Tensor]:
    """Per key/value head of one attention call, what `_Sums` averages (see the module docstring).
    q: [batch, heads, n, d]; k, v: [batch, kv_heads, n, d]."""
    from memplan.runtime.kv_attention import attention_probs

    b, h, n, _ = q.shape
    kvh = k.shape[1]
    group = h // kvh
    kx, vx = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = (q @ kx.transpose(-1, -2)) * scale
    # the last `window` prompt queries over the prompt's keys: [b, kvh, group, w, prompt]
    window = attention_probs(q[:, :, :prompt], k[:, :, :prompt], None, scale, last=s.window)
    scores = window.sum(dim=(2, 3))  # [b, kvh, prompt]
    share = scores / scores.sum(-1, keepdim=True)
    ordered = share.sort(-1, descending=True).values.cumsum(-1)
    at = [min(max(math.ceil(r * prompt), 1), prompt) - 1 for r in s.ratios]
    mass = ordered[..., at].mean(0)  # [kvh, ratios]
    entropy = -(window * window.clamp_min(1e-30).log()).sum(-1).mean((0, 2, 3))
    sink = share[..., : s.sink_tokens].sum(-1).mean(0)
    recent = share[..., prompt - s.recent_tokens :].sum(-1).mean(0) if s.recent_tokens else sink * 0
    errors = _errors(logits, kx, vx, q, scores, scale, prompt, s, group)  # [kvh, ratios, bits]
    return {"mass": mass, "entropy": entropy, "sink": sink, "recent": recent, "errors": errors}


def _errors(
    logits: torch.Tensor, kx: torch.Tensor, vx: torch.Tensor, q: torch.Tensor, scores: torch.Tensor,
    scale: float, prompt: int, s: KVCalibrationSettings, group: int,
) -> torch.Tensor:  # fmt: skip
    """errors[kv head, ratio, bits] of the follow queries' attention output (module docstring)."""
    from memplan.kernels.kv_quant import dequantize_kv, quantize_kv

    b, h, n, d = q.shape
    follow = slice(prompt, n)
    full = logits[:, :, follow].masked_fill(~_causal_rows(prompt, n), -math.inf).softmax(-1) @ vx
    denom = full.pow(2).sum((0, 2, 3)).view(-1, group).sum(1)  # [kvh]
    protected = torch.zeros(prompt, dtype=torch.bool)
    protected[: s.sink_tokens] = True
    if s.recent_tokens:
        protected[prompt - s.recent_tokens :] = True
    ranked = scores.masked_fill(protected, math.inf).argsort(-1, descending=True)  # [b, kvh, prompt]
    out = torch.zeros(scores.shape[1], len(s.ratios), len(s.bits))
    for j, bits in enumerate(s.bits):
        if bits is None:
            kq, vq = kx, vx
        else:
            kq, vq = (dequantize_kv(quantize_kv(x, bits, s.group_size), torch.float32) for x in (kx, vx))
        lq = (q[:, :, follow] @ kq.transpose(-1, -2)) * scale  # [b, h, f, n]
        for i, r in enumerate(s.ratios):
            keep = min(max(round(r * prompt), int(protected.sum())), prompt)
            kept = torch.zeros(b, scores.shape[1], n, dtype=torch.bool)
            kept.scatter_(2, ranked[..., :keep], True)
            kept[..., prompt:] = True
            allowed = kept.repeat_interleave(group, 1)[:, :, None, :] & _causal_rows(prompt, n)
            approx = lq.masked_fill(~allowed, -math.inf).softmax(-1) @ vq
            err = (approx - full).pow(2).sum((0, 2, 3)).view(-1, group).sum(1)
            out[:, i, j] = err / denom.clamp_min(1e-30)
    return out


def _causal_rows(prompt: int, n: int) -> torch.Tensor:
    """[follow, n]: follow query i (position prompt + i) sees keys up to its own position."""
    return torch.ones(n, n, dtype=torch.bool).tril()[prompt:n]


CALIBRATION_SEQUENCES = 4
"""Batches of 2 sequences `with_kv_calibration` measures on."""


def with_kv_calibration(
    options: KVBudgetOptions, spec: str | nn.Module, loaded: Any, dtype: torch.dtype
) -> KVBudgetOptions:
    """`options` with the model's KV geometry and, for the methods that need them, its attention statistics
    measured on calibration text (tiny-lm's training text for the trained tiny-lm, else seeded random ids)
    of the model's context, at most 256 tokens, with the options' sinks, window and group size."""
    from memplan.planner.calibration import calibration_batches, model_and_batches
    from memplan.planner.sensitivity import SensitivitySettings

    module = loaded.module
    config = getattr(module, "config", None)
    if config is None:
        raise InvalidInput("a KV budget needs a Hugging Face causal LM (its config gives the cache's shape)")
    geo = options.geometry or kv_geometry(config, dtype)
    out = replace(options, geometry=geo)
    if options.calibration is not None or options.method not in ("memplan", "prefixkv", "zigzagkv"):
        return out
    settings = KVCalibrationSettings(
        bits=options.bits, sink_tokens=options.sink_tokens, recent_tokens=options.recent_tokens,
        window=options.window, group_size=fitted_group(options.group_size, geo.head_dim),
    )  # fmt: skip
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 256
    s = SensitivitySettings(batches=CALIBRATION_SEQUENCES, batch_size=2, seq=min(context, 256))
    model, batches = model_and_batches(spec, loaded, 1, dtype, s)
    if isinstance(spec, nn.Module):
        batches = calibration_batches(config.vocab_size, context, s, text=False)
    return replace(out, calibration=calibrate_kv(model, list(batches), settings))
