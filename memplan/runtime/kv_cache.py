"""A KV cache that follows a `KVDecision`: per layer (or per key/value head) at most `tokens` tokens, kept
in buffers sized by the budget and stored at the planned bits, so evicted tokens really free memory.

    with applied_kv(decision, model) as run:
        out = model.generate(input_ids, max_new_tokens=64)       # a fresh compressed cache per call
        cache = run.new_cache()                                   # or forwards of one's own
        logits = model(context, past_key_values=cache).logits
    print(run.finish())                                           # KVMeasurement

**Storage.** A budget's heads (all key/value heads of the layer, or the one head it names) form a group
whose buffers are allocated once, at the first forward, for `tokens` tokens of every sequence of the
batch: `[batch, heads, tokens, head_dim]` K and V in the cache's dtype (bits None), or, at 8/4/2 bits,
packed codes `[batch, heads, tokens, head_dim * bits / 8]` uint8 with fp16 scales and zero points
`[batch, heads, tokens, head_dim / group_size]` for K and for V (`memplan.kernels.kv_quant`): exactly
`tokens * kv_token_bytes(...)` per head and sequence. Heads of a layer without a budget (a layer with none,
or heads a per-head layer leaves out) keep every token at the cache's dtype, growing as transformers'
`DynamicLayer` does. Each kept token also has an fp32 score and an int64 position (bookkeeping,
`KVMeasurement.index_bytes`, not KV bytes). The buffers are allocated under the run's live-storage tracker,
which measures the KV bytes held (`peak_kv_bytes`).

**A forward.** `update` (called by the model's attention module) returns the kept tokens (dequantized) with
the new ones appended, `[batch, kv_heads, kept + new, head_dim]` (per-head budgets: padded to the most any
head keeps, the padding masked); memplan's attention wrapper (`kv_attention.wrapped_attention`) then
gives the model's attention implementation the mask for exactly those tokens (transformers' mask for all
positions seen, `get_mask_sizes` = (seen + new, 0), gathered at the kept tokens' positions, so padding and
causality stay right), scores the tokens from the queries, runs the attention, and commits: if kept + new
exceeds the budget, the lowest-scored tokens are evicted and the rest (in position order) written back,
new ones quantized. The cache never holds more than its budget after a forward; `get_seq_length` counts
tokens seen (as transformers' sliding-window layers do), so positions stay right.

**Scores.** A token's score is the attention it has received, summed over the query group of its
key/value head (GQA) and accumulated over forwards: at a forward of several queries (the prefill) from the
last `window` queries only (SnapKV's observation window; no pooling), at a decode step from the one query
(H2O's accumulated attention). The first `sink_tokens` tokens of each sequence (after its left padding) and
the last `recent_tokens` seen are never evicted; left padding goes first.

**Exactness.** While a layer has evicted nothing, its keys are the tokens in order and the mask is
transformers' own, so a budget that never evicts at bits None gives bitwise the outputs of `DynamicCache`.

Not built: `crop` (assisted decoding, which rolls a cache back), flash / flex attention implementations
(eager and sdpa only), encoder-decoder models.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from memplan.errors import InvalidInput, PlanMismatch, internal_assert
from memplan.kernels.kv_quant import QuantizedKV, check_kv_format, dequantize_kv, quantize_kv
from memplan.plans.decisions import KV_BITS, KVBudget, KVDecision, kv_token_bytes
from memplan.runtime.calls import patched_method
from memplan.runtime.kv_attention import AttentionFn, attention_probs, resolved_scaling, wrapped_attention
from memplan.runtime.tracker import LiveStorageTracker

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True, slots=True)
class ModelKV:
    """What the model's KV cache looks like: layers, key/value heads per layer, head dim."""

    layers: int
    kv_heads: int
    head_dim: int


@dataclass
class KVMeasurement:
    """What an `applied_kv` block did. Token counts are per sequence (one row of the batch)."""

    peak_kv_bytes: int = 0
    """The most K/V bytes (payload, scales, zeros) live at once, measured by the live-storage tracker."""
    planned_kv_bytes: int = 0
    """Sum over budgets of tokens * kv_token_bytes * batch (x kv heads for a per-layer budget), at the
    batch and dtype the caches ran with."""
    full_kv_bytes: int = 0
    """The most the heads without a budget held at once (the cache's dtype, every token seen); the
    tracker's peak includes them, and the copy a growing cache makes (old and new storage) at each step."""
    index_bytes: int = 0
    """Bookkeeping of the kept tokens (fp32 score, int64 position each), the most held at once."""
    kept_tokens: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """layer -> tokens each key/value head held after the last forward."""
    max_kept_tokens: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """layer -> the most tokens each key/value head held after any forward."""
    seen_tokens: int = 0
    """Tokens the last cache saw (prompt + generated)."""
    evicted_tokens: int = 0
    """Tokens evicted over the run, counted per key/value head and sequence."""
    batch: int = 0
    caches: int = 0
    forwards: int = 0
    cache_s: float = 0.0
    """Time in the cache and its attention wrapper beyond the attention itself (dequantize, score, evict)."""
    wall_s: float = 0.0


def model_kv(model: nn.Module) -> ModelKV:
    """Layers, key/value heads and head dim of a Hugging Face causal LM's KV cache, from its config."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None else None
    try:
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    except (AttributeError, TypeError) as e:
        raise InvalidInput(
            f"{type(model).__name__} has no decoder config with layers, heads and hidden size: applied_kv "
            "runs Hugging Face causal language models"
        ) from e
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidInput(
            f"{type(model).__name__} is an encoder-decoder model; applied_kv runs decoder-only LMs"
        )
    return ModelKV(layers, kv_heads, head_dim)


def check_decision(decision: KVDecision, kv: ModelKV) -> None:
    """PlanMismatch for budgets naming layers or heads the model lacks; InvalidInput for budgets no cache
    can follow (formats that do not pack the head, duplicates, budgets below the protected tokens)."""
    if decision.sink_tokens < 0 or decision.recent_tokens < 0 or decision.window < 1:
        raise InvalidInput(
            f"kv: sink_tokens ({decision.sink_tokens}) and recent_tokens ({decision.recent_tokens}) must be "
            f">= 0 and window ({decision.window}) >= 1"
        )
    seen: set[tuple[int, int | None]] = set()
    per_layer = {b.layer for b in decision.budgets if b.head is None}
    protected = decision.sink_tokens + decision.recent_tokens
    for b in decision.budgets:
        where = f"layer {b.layer}" + ("" if b.head is None else f" head {b.head}")
        if not 0 <= b.layer < kv.layers:
            raise PlanMismatch(f"kv: the decision budgets {where}; the model has layers 0..{kv.layers - 1}")
        if b.head is not None and not 0 <= b.head < kv.kv_heads:
            raise PlanMismatch(
                f"kv: the decision budgets {where}; the model's layers have key/value heads "
                f"0..{kv.kv_heads - 1}"
            )
        if (b.layer, b.head) in seen:
            raise InvalidInput(f"kv: the decision budgets {where} twice")
        seen.add((b.layer, b.head))
        if b.head is not None and b.layer in per_layer:
            raise InvalidInput(
                f"kv: layer {b.layer} has a per-layer budget and per-head budgets; give one kind"
            )
        if b.tokens < 0:
            raise InvalidInput(f"kv: {where} has a budget of {b.tokens} tokens; budgets are >= 0")
        if 0 < b.tokens < protected:
            raise InvalidInput(
                f"kv: {where} keeps {b.tokens} tokens, fewer than the {decision.sink_tokens} sink and "
                f"{decision.recent_tokens} recent tokens never evicted: give it at least {protected} (or 0)"
            )
        if b.bits is not None:
            if b.bits not in KV_BITS:
                raise InvalidInput(
                    f"kv: {where} stores {b.bits}-bit tokens; KV bits are None or {list(KV_BITS)}"
                )
            check_kv_format(kv.head_dim, b.bits, decision.group_size)


def planned_bytes(decision: KVDecision, kv: ModelKV, batch: int, dtype_bytes: int) -> int:
    """The KV bytes the decision's budgets hold for `batch` sequences at `dtype_bytes` (bits None)."""
    total = 0
    for b in decision.budgets:
        heads = kv.kv_heads if b.head is None else 1
        total += (
            b.tokens * kv_token_bytes(kv.head_dim, b.bits, dtype_bytes, decision.group_size) * batch * heads
        )
    return total


# ---------------------------------------------------------------------------------------------------
# Storage


@dataclass
class _Group:
    """The key/value heads `heads` of one layer that share a budget (`tokens` None: no budget, keep all)."""

    heads: list[int]
    tokens: int | None
    bits: int | None
    count: int = 0
    """Tokens held per sequence and head (the same for every sequence and head of the group)."""
    kv: dict[str, torch.Tensor] = field(default_factory=dict)
    """The K/V buffers: `k`, `v` (bits None) or `kc`, `ks`, `kz`, `vc`, `vs`, `vz` (codes, scales, zeros)."""
    score: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    evicted_any: bool = False

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())

    def index_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.score, self.pos) if t is not None)


@dataclass
class _Pending:
    """One forward's new tokens of a layer, between `update` and the attention wrapper's commit."""

    keys: torch.Tensor
    values: torch.Tensor
    width: int
    """Slots of past tokens in the keys returned (the most any head holds; fewer: padding, masked)."""


class CompressedLayer(CacheLayerMixin):
    """One layer of a `KVCache`: its budget groups, tokens seen, and the forward in flight."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, run: KVRun, layer: int, groups: list[_Group]) -> None:
        super().__init__()
        self.run = run
        self.layer = layer
        self.groups = groups
        self.seen = 0
        self.pending: _Pending | None = None
        self.start: torch.Tensor | None = None
        """Per sequence, its first position that is not left padding (from the prefill's mask)."""
        self.batch = 0
        self.dtype: torch.dtype = torch.float32
        self.device = torch.device("cpu")

    # -- transformers' layer interface ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate every budgeted group's buffers for the batch, under the run's tracker."""
        b, h, _, d = key_states.shape
        kv = self.run.kv
        if h != kv.kv_heads or d != kv.head_dim or value_states.shape[-1] != d:
            raise PlanMismatch(
                f"kv: layer {self.layer}'s attention gives {h} heads of {d} (values of "
                f"{value_states.shape[-1]}); the model's config says {kv.kv_heads} heads of {kv.head_dim}"
            )
        self.batch, self.dtype, self.device = b, key_states.dtype, key_states.device
        with self.run.tracker:
            for g in self.groups:
                g.kv = _empty_storage(b, len(g.heads), g.tokens or 0, d, g.bits, self.run.group, self.dtype,
                                      self.device)  # fmt: skip
        for g in self.groups:
            n = g.tokens or 0
            g.score = torch.zeros(b, len(g.heads), n, device=self.device)
            g.pos = torch.zeros(b, len(g.heads), n, dtype=torch.long, device=self.device)
        self.keys = self.values = torch.empty(0, dtype=self.dtype, device=self.device)
        self.is_initialized = True
        self.run.on_allocate(self)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens (dequantized; per head padded to the most any head holds), the new ones after."""
        t0 = time.perf_counter()
        if self.pending is not None:
            raise PlanMismatch(
                f"kv: layer {self.layer}'s attention did not run through memplan's attention function (the "
                "model's attention implementation was changed inside applied_kv?)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch:
            raise PlanMismatch(
                f"kv: this cache holds {self.batch} sequences; a forward gives {key_states.shape[0]}"
            )
        width = max((g.count for g in self.groups), default=0)
        if len(self.groups) == 1 and self.groups[0].heads == list(range(self.run.kv.kv_heads)):
            past_k, past_v = self._past(self.groups[0])
        else:
            b, h, _, d = key_states.shape
            past_k = key_states.new_zeros(b, h, width, d)
            past_v = value_states.new_zeros(b, h, width, value_states.shape[-1])
            for g in self.groups:
                k, v = self._past(g)
                idx = torch.tensor(g.heads, device=self.device)
                past_k[:, idx, : g.count] = k
                past_v[:, idx, : g.count] = v
        self.pending = _Pending(key_states, value_states, width)
        self.run.pending[self.layer] = self
        keys = torch.cat([past_k, key_states], dim=-2)
        values = torch.cat([past_v, value_states], dim=-2)
        self.run.measured.cache_s += time.perf_counter() - t0
        return keys, values

    def _past(self, g: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """Group `g`'s kept tokens as `[batch, heads, count, head_dim]` in the cache's dtype."""
        n = g.count
        if g.bits is None:
            return g.kv["k"][:, :, :n], g.kv["v"][:, :, :n]
        k = QuantizedKV(
            g.kv["kc"][:, :, :n], g.kv["ks"][:, :, :n], g.kv["kz"][:, :, :n], g.bits, self.run.group
        )
        v = QuantizedKV(
            g.kv["vc"][:, :, :n], g.kv["vs"][:, :, :n], g.kv["vz"][:, :, :n], g.bits, self.run.group
        )
        return dequantize_kv(k, self.dtype), dequantize_kv(v, self.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Every position seen: the attention wrapper gathers the kept ones from transformers' mask."""
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (not held): positions of the next tokens start here."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def held(self) -> list[int]:
        """Tokens each key/value head holds now, per sequence."""
        out = [0] * self.run.kv.kv_heads
        for g in self.groups:
            for h in g.heads:
                out[h] = g.count
        return out

    def kept_positions(self) -> list[torch.Tensor]:
        """Per key/value head, the positions of the tokens it holds, `[batch, held]`, in order."""
        out: list[torch.Tensor] = [torch.empty(self.batch, 0, dtype=torch.long)] * self.run.kv.kv_heads
        for g in self.groups:
            for i, h in enumerate(g.heads):
                if g.tokens is None:
                    out[h] = torch.arange(g.count).expand(self.batch, g.count)
                else:
                    assert g.pos is not None
                    out[h] = g.pos[:, i, : g.count]
        return out

    def crop(self, tokens_to_remove: int) -> None:
        raise InvalidInput(
            "kv: a compressed KV cache cannot be rolled back (assisted decoding is not supported)"
        )

    def reset(self) -> None:
        raise InvalidInput("kv: a compressed KV cache cannot be reset; make a new one with run.new_cache()")

    def offload(self) -> None:
        raise InvalidInput(
            "kv: a compressed KV cache is not offloaded by transformers; plan its tier instead"
        )

    def prefetch(self) -> None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the sequences (beam search)."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        with self.run.tracker:
            for g in self.groups:
                g.kv = {name: fn(t) for name, t in g.kv.items()}
        for g in self.groups:
            g.score, g.pos = fn(g.score), fn(g.pos)
        if self.start is not None:
            self.start = fn(self.start)
        self.batch = next(iter(self.groups[0].kv.values())).shape[0] if self.groups else self.batch

    # -- the forward's commit ---------------------------------------------------------------------------
    def attend(
        self,
        inner: AttentionFn,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the attention over the kept + new tokens with their mask, score them, and evict."""
        pending = self.pending
        internal_assert(pending is not None, f"kv: layer {self.layer} attends without an update")
        assert pending is not None
        self.pending = None
        t0 = time.perf_counter()
        q_len = pending.keys.shape[-2]
        internal_assert(key.shape[-2] == pending.width + q_len, f"kv: layer {self.layer} got other keys")
        if self.start is None:
            self.start = _first_visible(attention_mask, self.batch, self.seen, key.device)
        mask = self._mask(attention_mask, query, pending)
        bounded = any(g.tokens is not None for g in self.groups)
        scores = None
        if bounded:
            probs = attention_probs(query, key, mask, resolved_scaling(query, kwargs), last=self.run.window)
            scores = probs.sum(dim=(2, 3))  # [batch, kv_heads, width + new]
        t1 = time.perf_counter()
        out = inner(module, query, key, value, mask, **kwargs)
        t2 = time.perf_counter()
        for g in self.groups:
            self._commit(g, pending, scores)
        self.seen += q_len
        self.run.after_commit(self)
        self.run.measured.cache_s += (t1 - t0) + (time.perf_counter() - t2)
        return out

    def _mask(
        self, attention_mask: torch.Tensor | None, query: torch.Tensor, pending: _Pending
    ) -> torch.Tensor | None:
        """The mask for the keys `update` returned: transformers' own while nothing was evicted, else its
        entries at the kept tokens' positions (padding slots masked), per query head."""
        if not any(g.evicted_any for g in self.groups) and all(g.count == pending.width for g in self.groups):
            return attention_mask
        b, heads, q_len = query.shape[0], query.shape[1], query.shape[2]
        kv_heads, width = self.run.kv.kv_heads, pending.width
        pos = torch.zeros(b, kv_heads, width, dtype=torch.long, device=query.device)
        valid = torch.zeros(b, kv_heads, width, dtype=torch.bool, device=query.device)
        for g in self.groups:
            idx = torch.tensor(g.heads, device=query.device)
            assert g.pos is not None
            if g.tokens is None:  # no budget: every token, in order
                pos[:, idx, : g.count] = torch.arange(g.count, device=query.device)
            else:
                pos[:, idx, : g.count] = g.pos[:, :, : g.count]
            valid[:, idx, : g.count] = True
        new = torch.arange(self.seen, self.seen + q_len, device=query.device).expand(b, kv_heads, q_len)
        pos = torch.cat([pos, new], dim=-1)
        valid = torch.cat([valid, valid.new_ones(b, kv_heads, q_len)], dim=-1)
        if attention_mask is None:
            qpos = torch.arange(self.seen, self.seen + q_len, device=query.device)
            mask = valid[:, :, None, :] & (pos[:, :, None, :] <= qpos[None, None, :, None])
        else:
            full = attention_mask.expand(b, kv_heads, q_len, attention_mask.shape[-1])
            mask = full.gather(-1, pos[:, :, None, :].expand(b, kv_heads, q_len, pos.shape[-1]))
            off = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
            mask = mask.masked_fill(~valid[:, :, None, :], off)
        return mask.repeat_interleave(heads // kv_heads, dim=1) if heads != kv_heads else mask

    def _commit(self, g: _Group, pending: _Pending, scores: torch.Tensor | None) -> None:
        """Add the new tokens to group `g`, evicting the lowest-scored beyond its budget."""
        idx = torch.tensor(g.heads, device=pending.keys.device)
        new_k, new_v = pending.keys[:, idx], pending.values[:, idx]
        q_len, n = new_k.shape[-2], g.count
        if g.tokens is None:  # no budget: keep everything, as DynamicLayer does
            with self.run.tracker:
                g.kv = {
                    "k": torch.cat([g.kv["k"][:, :, :n], new_k], -2),
                    "v": torch.cat([g.kv["v"][:, :, :n], new_v], -2),
                }
            g.count = n + q_len
            return
        assert scores is not None and g.score is not None and g.pos is not None
        acc = torch.cat([g.score[:, :, :n] + scores[:, idx, :n], scores[:, idx, pending.width :]], dim=-1)
        pos = torch.cat([g.pos[:, :, :n], torch.arange(self.seen, self.seen + q_len, device=acc.device)
                         .expand(*acc.shape[:2], q_len)], dim=-1)  # fmt: skip
        new = self._stored(g, new_k, new_v)
        m, budget = n + q_len, g.tokens
        if m <= budget:
            for name, t in new.items():
                g.kv[name][:, :, n:m] = t
            g.score[:, :, n:m] = acc[:, :, n:]
            g.pos[:, :, n:m] = pos[:, :, n:]
            g.count = m
            return
        keep = self._keep(acc, pos, budget, self.seen + q_len)  # [batch, heads, budget], position order
        for name, t in new.items():
            cand = torch.cat([g.kv[name][:, :, :n], t], dim=-2)
            g.kv[name][:, :, :budget] = cand.gather(2, keep[..., None].expand(*keep.shape, cand.shape[-1]))
        g.score[:, :, :budget] = acc.gather(2, keep)
        g.pos[:, :, :budget] = pos.gather(2, keep)
        g.count = budget
        g.evicted_any = True
        self.run.measured.evicted_tokens += (m - budget) * keep.shape[0] * keep.shape[1]

    def _stored(self, g: _Group, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """New tokens in the group's storage format (quantized when it has bits)."""
        if g.bits is None:
            return {"k": k, "v": v}
        qk, qv = quantize_kv(k, g.bits, self.run.group), quantize_kv(v, g.bits, self.run.group)
        return {
            "kc": qk.codes,
            "ks": qk.scales,
            "kz": qk.zeros,
            "vc": qv.codes,
            "vs": qv.scales,
            "vz": qv.zeros,
        }

    def _keep(self, acc: torch.Tensor, pos: torch.Tensor, budget: int, seen: int) -> torch.Tensor:
        """Indices of the `budget` candidates to keep per sequence and head, in position order: sinks and
        the recent window first, then the highest scores; left padding last."""
        assert self.start is not None
        start = self.start[:, None, None]
        sink = (pos >= start) & (pos < start + self.run.sink)
        recent = pos >= seen - self.run.recent
        priority = acc.masked_fill(pos < start, float("-inf")).masked_fill(sink | recent, float("inf"))
        keep = torch.topk(priority, budget, dim=-1, sorted=False).indices
        return keep.sort(dim=-1).values


def _empty_storage(
    batch: int, heads: int, tokens: int, dim: int, bits: int | None, group_size: int, dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Buffers for `tokens` tokens per sequence and head (bits None: K and V at `dtype`)."""
    shape = (batch, heads, tokens)
    if bits is None:
        return {"k": torch.zeros(*shape, dim, dtype=dtype, device=device),
                "v": torch.zeros(*shape, dim, dtype=dtype, device=device)}  # fmt: skip
    out = {}
    for side in "kv":
        out[side + "c"] = torch.zeros(*shape, dim * bits // 8, dtype=torch.uint8, device=device)
        out[side + "s"] = torch.zeros(*shape, dim // group_size, dtype=torch.float16, device=device)
        out[side + "z"] = torch.zeros_like(out[side + "s"])
    return out


def _first_visible(mask: torch.Tensor | None, batch: int, seen: int, device: torch.device) -> torch.Tensor:
    """Per sequence, the first position its last query may attend (0 without a mask): where left padding
    ends."""
    if mask is None or seen:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last = mask[:, 0, -1, :]
    visible = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    visible = visible.expand(batch, visible.shape[-1])
    return visible.long().argmax(dim=-1)


class KVCache(Cache):
    """transformers' `Cache` over one `CompressedLayer` per model layer (see the module docstring)."""

    def __init__(self, run: KVRun) -> None:
        layers = [CompressedLayer(run, layer, run.groups_of(layer)) for layer in range(run.kv.layers)]
        super().__init__(layers=layers)


# ---------------------------------------------------------------------------------------------------
# The run


class KVRun:
    """The state of one `applied_kv` block: the decision, the tracker, the caches made, the measurement."""

    def __init__(self, decision: KVDecision, model: nn.Module) -> None:
        self.decision = decision
        self.model = model
        self.kv = model_kv(model)
        check_decision(decision, self.kv)
        self.group = decision.group_size
        self.sink, self.recent, self.window = decision.sink_tokens, decision.recent_tokens, decision.window
        self.tracker = LiveStorageTracker(record_timeline=False)
        self.measured = KVMeasurement()
        self.pending: dict[int, CompressedLayer] = {}
        self._layers: weakref.WeakSet[CompressedLayer] = weakref.WeakSet()
        self._t0 = time.perf_counter()
        self._dtype_bytes = 0

    def groups_of(self, layer: int) -> list[_Group]:
        """Fresh budget groups of `layer`: one per budget, and one without a budget for the heads left."""
        budgets = [b for b in self.decision.budgets if b.layer == layer]
        per_layer = next((b for b in budgets if b.head is None), None)
        if per_layer is not None:
            return [_Group(list(range(self.kv.kv_heads)), per_layer.tokens, per_layer.bits)]
        groups = [_Group([b.head], b.tokens, b.bits) for b in sorted(budgets, key=_head_of)]
        rest = sorted(set(range(self.kv.kv_heads)) - {b.head for b in budgets})
        if rest:
            groups.append(_Group(rest, None, None))
        return groups

    def new_cache(self) -> KVCache:
        """A fresh compressed cache, for forwards with `past_key_values=` of one's own."""
        self.measured.caches += 1
        return KVCache(self)

    def on_allocate(self, layer: CompressedLayer) -> None:
        self._layers.add(layer)
        self.measured.batch = max(self.measured.batch, layer.batch)
        self._dtype_bytes = max(self._dtype_bytes, layer.dtype.itemsize)

    def after_commit(self, layer: CompressedLayer) -> None:
        """Record what the layer holds after a forward; checks every budget holds."""
        self.pending.pop(layer.layer, None)
        held = layer.held()
        for g in layer.groups:
            internal_assert(
                g.tokens is None or g.count <= g.tokens, f"kv: layer {layer.layer} over its budget"
            )
        self.measured.kept_tokens[layer.layer] = tuple(held)
        top = self.measured.max_kept_tokens.get(layer.layer, (0,) * len(held))
        self.measured.max_kept_tokens[layer.layer] = tuple(max(a, b) for a, b in zip(top, held, strict=True))
        self.measured.seen_tokens = layer.seen
        index = sum(g.index_bytes() for lay in self._layers for g in lay.groups)
        self.measured.index_bytes = max(self.measured.index_bytes, index)
        full = sum(g.kv_bytes() for lay in self._layers for g in lay.groups if g.tokens is None)
        self.measured.full_kv_bytes = max(self.measured.full_kv_bytes, full)
        if layer.layer == self.kv.layers - 1:
            self.measured.forwards += 1

    def attend(
        self,
        inner: AttentionFn,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention wrapper: a layer of one of this run's caches commits; anything else runs as is."""
        layer = self.pending.get(getattr(module, "layer_idx", -1))
        if layer is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        return layer.attend(inner, module, query, key, value, attention_mask, **kwargs)

    def finish(self) -> KVMeasurement:
        """The measurement (call after the block, or inside it for what happened so far)."""
        m = self.measured
        m.peak_kv_bytes = self.tracker.result.peak_bytes
        m.planned_kv_bytes = (
            planned_bytes(self.decision, self.kv, m.batch, self._dtype_bytes) if m.batch else 0
        )
        m.wall_s = time.perf_counter() - self._t0
        return m


def _head_of(b: KVBudget) -> int:
    return -1 if b.head is None else b.head


@contextmanager
def applied_kv(decision: KVDecision, model: nn.Module) -> Iterator[KVRun]:
    """Run `model` with caches that follow `decision` inside the block: `model.generate` gets a fresh
    `KVCache` per call, `run.new_cache()` gives one for forwards of one's own. See the module docstring."""
    run = KVRun(decision, model)
    original = getattr(model.config, "_attn_implementation", None) or "eager"
    if original not in SUPPORTED_ATTENTION:
        raise InvalidInput(
            f"kv: the model runs {original!r} attention; the compressed cache runs under "
            f"{' or '.join(SUPPORTED_ATTENTION)}: model.set_attn_implementation('sdpa') first"
        )
    with ExitStack() as stack:
        stack.enter_context(wrapped_attention(model, run.attend))
        stack.enter_context(_generate_with_cache(model, run))
        yield run
    run.finish()


@contextmanager
def _generate_with_cache(model: nn.Module, run: KVRun) -> Iterator[None]:
    """`model.generate` gets a fresh compressed cache unless it is given one of this run's."""
    original = getattr(model, "generate", None)
    if original is None:
        yield
        return

    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache") is False:
            raise InvalidInput(
                "kv: generate(use_cache=False) under applied_kv: the decision is for a KV cache"
            )
        given = kwargs.get("past_key_values")
        if given is not None and not (isinstance(given, KVCache) and given.layers[0].run is run):  # type: ignore[attr-defined]
            raise InvalidInput(
                f"kv: generate was given a {type(given).__name__}; under applied_kv pass none (a fresh "
                "compressed cache is made) or run.new_cache()"
            )
        if given is None:
            kwargs["past_key_values"] = run.new_cache()
        return original(*args, **kwargs)

    with patched_method(model, "generate", generate):
        yield
