"""KV caches a generation plan keeps off the device: each layer's keys and values live in a tier buffer
sized for the whole generation, come back to the device just before the layer runs, and leave right
after it, so the device holds one or two layers' caches at a time instead of all of them.

The cache is transformers' `DynamicCache` that `model.generate` passes to every forward: layer `L`'s
`keys` / `values` are `[batch, heads, tokens, dim]` tensors that its attention extends with `torch.cat`.
After the layer runs, only the tokens it added are copied to the tier buffer (the prompt after the
prefill, one token per decode forward), and the device tensors are replaced by meta placeholders of the
same shape (made outside any dispatch mode: they hold no memory, and `get_seq_length` still reads their
shape). `issue` starts reading a layer's tokens back into fresh device tensors on a worker thread
(allocated by the caller's thread, so the live-storage tracker counts them from then); `bind` waits and
puts them back into the cache. The tier buffers are plain CPU tensors: on a CPU-only machine host memory is
process memory, and CXL is emulated with it (the runtime says so).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from memplan.errors import PlanMismatch


@dataclass
class _Layer:
    """One layer's tier buffers and how many tokens they hold."""

    keys: torch.Tensor
    values: torch.Tensor
    tokens: int = 0


@dataclass
class KVStats:
    """Bytes moved each way, the union of the copies' spans, and the caller's waits."""

    bytes_read: int = 0
    bytes_written: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    tier_bytes: dict[str, int] = field(default_factory=dict)


class KVOffload:
    """The placed KV caches of one generation: value id -> (layer, tier)."""

    def __init__(self, placed: dict[int, tuple[int, str]], max_tokens: int) -> None:
        self.placed = placed
        self.max_tokens = max_tokens
        self.cache: Any = None
        self.layers: dict[int, _Layer] = {}
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, Future[None]]] = {}
        self.stats = KVStats()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memplan-kv")
        self._lock = threading.Lock()
        self._busy_until = 0.0

    def set_cache(self, cache: Any) -> None:
        if cache is not None and not hasattr(cache, "layers"):
            raise PlanMismatch(
                f"the plan keeps KV caches off the device, which needs transformers' DynamicCache; this "
                f"generation passes a {type(cache).__name__}"
            )
        self.cache = cache

    def _layer_cache(self, layer: int) -> Any:
        if self.cache is None or layer >= len(self.cache.layers):
            raise PlanMismatch(f"no KV cache for layer {layer} in this call: generate with use_cache=True")
        return self.cache.layers[layer]

    def issue(self, vid: int) -> None:
        """Start reading layer `vid`'s tokens back into fresh device tensors (no-op before its prefill)."""
        layer, _ = self.placed[vid]
        held = self.layers.get(layer)
        if held is None or held.tokens == 0:
            return
        k = torch.empty_like(held.keys[:, :, : held.tokens])
        v = torch.empty_like(held.values[:, :, : held.tokens])
        self.pending[vid] = (k, v, self._pool.submit(self._read, held, k, v))

    def _read(self, held: _Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        t0 = time.perf_counter()
        k.copy_(held.keys[:, :, : held.tokens])
        v.copy_(held.values[:, :, : held.tokens])
        self._account(t0, read=k.nbytes + v.nbytes)

    def bind(self, vid: int) -> None:
        """Wait for layer `vid`'s read and put its keys and values back into the cache."""
        if vid not in self.pending:
            return
        k, v, future = self.pending.pop(vid)
        t0 = time.perf_counter()
        future.result()
        self.stats.wait_s += time.perf_counter() - t0
        lay = self._layer_cache(self.placed[vid][0])
        lay.keys, lay.values = k, v

    def store(self, vid: int) -> None:
        """After the layer ran: copy the tokens it added to the tier and drop the device tensors."""
        layer, tier = self.placed[vid]
        lay = self._layer_cache(layer)
        keys, values = lay.keys, lay.values
        if not isinstance(keys, torch.Tensor) or keys.device.type == "meta":
            return
        held = self.layers.get(layer)
        if held is None:
            with _disable_current_modes():
                shape = (*keys.shape[:2], self.max_tokens, keys.shape[-1])
                held = _Layer(
                    torch.empty(shape, dtype=keys.dtype),
                    torch.empty((*values.shape[:2], self.max_tokens, values.shape[-1]), dtype=values.dtype),
                )
            self.layers[layer] = held
            self.stats.tier_bytes[tier] = (
                self.stats.tier_bytes.get(tier, 0) + held.keys.nbytes + held.values.nbytes
            )
        new = keys.shape[-2]
        if new > self.max_tokens:
            raise PlanMismatch(
                f"layer {layer}'s KV cache reached {new} tokens; the plan holds {self.max_tokens}"
            )
        t0 = time.perf_counter()
        with _disable_current_modes():
            held.keys[:, :, held.tokens : new].copy_(keys[:, :, held.tokens : new])
            held.values[:, :, held.tokens : new].copy_(values[:, :, held.tokens : new])
            added = (new - held.tokens) * (keys[:, :, :1].nbytes + values[:, :, :1].nbytes)
            held.tokens = new
            lay.keys = torch.empty(keys.shape, dtype=keys.dtype, device="meta")
            lay.values = torch.empty(values.shape, dtype=values.dtype, device="meta")
        self._account(t0, written=added)

    def _account(self, t0: float, read: int = 0, written: int = 0) -> None:
        t1 = time.perf_counter()
        with self._lock:
            self.stats.bytes_read += read
            self.stats.bytes_written += written
            self.stats.busy_s += t1 - max(t0, self._busy_until)
            self._busy_until = max(self._busy_until, t1)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.layers.clear()
        self.pending.clear()


_INDEX = ("score", "pos")


class CompressedKVOffload(KVOffload):
    """The same for the compressed caches of `memplan.runtime.kv_cache` (a plan with KV budgets): after the
    layer runs, every buffer of its budget groups (codes or keys and values, scales, zero points, scores,
    positions) is copied whole to its tier buffer (evictions rewrite them anywhere) and left on the meta
    device; `issue` reads them back into device tensors allocated under the KV run's tracker, `bind` puts
    them back into the groups."""

    def __init__(self, placed: dict[int, tuple[int, str]], max_tokens: int) -> None:
        super().__init__(placed, max_tokens)
        self.tracker: Any = None
        """The KV run's live-storage tracker: buffers read back count as KV bytes while on the device."""
        self.held: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.back: dict[int, tuple[list[dict[str, torch.Tensor]], Future[None]]] = {}

    def set_cache(self, cache: Any) -> None:
        if cache is not None and not all(hasattr(lay, "groups") for lay in getattr(cache, "layers", [None])):
            raise PlanMismatch(
                f"the plan budgets the KV cache; this generation passes a {type(cache).__name__}, not the "
                "compressed cache memplan.applied gives model.generate"
            )
        self.cache = cache

    @staticmethod
    def _tensors(group: Any) -> dict[str, torch.Tensor]:
        out = dict(group.kv)
        if group.score is not None:
            out["score"], out["pos"] = group.score, group.pos
        return out

    @staticmethod
    def _put(group: Any, tensors: dict[str, torch.Tensor]) -> None:
        group.kv = {k: v for k, v in tensors.items() if k not in ("score", "pos")}
        if "score" in tensors:
            group.score, group.pos = tensors["score"], tensors["pos"]

    def issue(self, vid: int) -> None:
        layer, _ = self.placed[vid]
        held = self.held.get(layer)
        if held is None:
            return
        assert self.tracker is not None
        with self.tracker:  # the KV bytes; scores and positions are bookkeeping, as kv_cache counts them
            dev = [{k: torch.empty_like(t) for k, t in g.items() if k not in _INDEX} for g in held]
        for d, g in zip(dev, held, strict=True):
            d.update({k: torch.empty_like(g[k]) for k in _INDEX if k in g})
        self.back[vid] = (dev, self._pool.submit(self._read_groups, held, dev))

    def _read_groups(self, held: list[dict[str, torch.Tensor]], dev: list[dict[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        for h, d in zip(held, dev, strict=True):
            for k, t in h.items():
                d[k].copy_(t)
        self._account(t0, read=sum(t.nbytes for g in held for t in g.values()))

    def bind(self, vid: int) -> None:
        if vid not in self.back:
            return
        dev, future = self.back.pop(vid)
        t0 = time.perf_counter()
        future.result()
        self.stats.wait_s += time.perf_counter() - t0
        for g, tensors in zip(self._layer_cache(self.placed[vid][0]).groups, dev, strict=True):
            self._put(g, tensors)

    def store(self, vid: int) -> None:
        layer, tier = self.placed[vid]
        lay = self._layer_cache(layer)
        current = [self._tensors(g) for g in lay.groups]
        if not current or any(t.device.type == "meta" for g in current for t in g.values()):
            return
        t0 = time.perf_counter()
        with _disable_current_modes():
            held = self.held.get(layer)
            if held is None or any(h[k].shape != t.shape for h, g in zip(held, current, strict=True)
                                   for k, t in g.items()):  # fmt: skip
                before = sum(t.nbytes for g in held for t in g.values()) if held else 0
                held = [{k: torch.empty(t.shape, dtype=t.dtype) for k, t in g.items()} for g in current]
                self.held[layer] = held
                after = sum(t.nbytes for g in held for t in g.values())
                self.stats.tier_bytes[tier] = self.stats.tier_bytes.get(tier, 0) + after - before
            for h, g in zip(held, current, strict=True):
                for k, t in g.items():
                    h[k].copy_(t)
            for g, tensors in zip(lay.groups, current, strict=True):
                meta = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
                self._put(g, meta)

        self._account(t0, written=sum(t.nbytes for g in current for t in g.values()))

    def close(self) -> None:
        super().close()
        self.held.clear()
        self.back.clear()
