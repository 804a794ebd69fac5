"""How the kv_budget pass shares a KV byte budget among layers (and heads): the published allocation rules
and memplan's own, as functions of the calibration statistics. Knows nothing of torch.

- `uniform`: every layer keeps the same number of tokens (SnapKV with one budget for all).
- `pyramidkv`: PyramidKV's closed form as kvpress computes it (`pyramid_budgets`): a linear ramp from the
  first layer to the last whose mean is the target ratio, with kvpress's fallback to uniform.
- `prefixkv`: PrefixKV's global threshold. Every layer keeps the fewest tokens whose share of its
  observation window's attention (its cumulative priority curve) reaches one threshold `p`, and `p` is
  found by binary search so that the mean kept ratio equals the target (`prefix_ratios`).
- `zigzagkv`: ZigZagKV's layer uncertainty, read as: the tokens a layer needs to hold `mass` (0.9) of its
  attention, per layer, and budgets in proportion to that need (`zigzag_weights`).
- `memplan`: one multiple-choice problem (`joint_problem`): each layer or head picks a (tokens kept,
  bits) pair from a ladder, costing the relative error calibration measured in its attention output, under
  the byte budget; then `fill` spends what the ladder's steps leave over, a token at a time.

Every method ends in whole tokens whose sum hits its target exactly (`round_to_total`), between the
protected tokens (sinks plus the recent window) and the context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memplan.errors import InvalidInput
from memplan.solvers.multiple_choice import Choice, ChoiceProblem, Layer, Usage

BISECTION_STEPS = 100
"""Halvings of the threshold (PrefixKV) or the multiplier (apportioning): below float resolution."""


def pyramid_budgets(q_len: int, compression_ratio: float, layers: int, window_size: int = 64,
                    beta: int = 20) -> list[int]:  # fmt: skip
    """PyramidKV's tokens per layer for a context of `q_len` (kvpress's `PyramidKVPress.get_layer_budget`,
    the formula of KVCache-Factory's pyramidkv_utils): the same numbers, layer by layer."""
    if beta < 1:
        raise InvalidInput(f"pyramidkv beta {beta}: must be at least 1")
    max_capacity = window_size + q_len * (1 - compression_ratio)
    min_num = (max_capacity - window_size) / beta
    max_num = (max_capacity - window_size) * 2 - min_num
    if max_num >= q_len - window_size:
        max_num = q_len - window_size
        min_num = (max_capacity - window_size) * 2 - max_num
    if not (q_len >= max_num >= min_num >= window_size):
        return [max(1, round(q_len * (1 - compression_ratio)))] * layers
    steps = (max_num - min_num) / (layers - 1) if layers > 1 else 0.0
    return [round(max_num - i * steps) for i in range(layers)]


def inverse_curve(ratios: Sequence[float], mass: Sequence[float], target: float) -> float:
    """The least kept ratio whose attention share reaches `target`, on the piecewise-linear curve through
    (0, 0) and (ratios[i], mass[i])."""
    xs, ys = [0.0, *ratios], [0.0, *_monotone(mass)]
    if target <= 0:
        return 0.0
    for i in range(1, len(xs)):
        if ys[i] >= target:
            if ys[i] == ys[i - 1]:
                return xs[i - 1]
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (target - ys[i - 1]) / (ys[i] - ys[i - 1])
    return xs[-1]


def _monotone(values: Sequence[float]) -> list[float]:
    """A running maximum: a sampled cumulative curve that noise made dip is read as flat there."""
    out, top = [], 0.0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def prefix_ratios(
    curves: Sequence[Sequence[float]], ratios: Sequence[float], target: float
) -> tuple[list[float], float]:
    """PrefixKV's per-layer kept ratios at the global threshold whose mean ratio is `target`, and that
    threshold (binary search on the threshold; the mean ratio grows with it)."""

    def mean_at(p: float) -> float:
        return sum(inverse_curve(ratios, c, p) for c in curves) / len(curves)

    lo, hi = 0.0, 1.0
    if mean_at(hi) <= target:
        return [inverse_curve(ratios, c, hi) for c in curves], hi
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    # the mean is continuous in p, so lo and hi bracket the target; spread what is left over linearly
    at_lo, at_hi = (
        [inverse_curve(ratios, c, lo) for c in curves],
        [inverse_curve(ratios, c, hi) for c in curves],
    )
    m_lo, m_hi = sum(at_lo) / len(curves), sum(at_hi) / len(curves)
    w = 0.0 if m_hi == m_lo else (target - m_lo) / (m_hi - m_lo)
    return [a + w * (b - a) for a, b in zip(at_lo, at_hi, strict=True)], (lo + hi) / 2


def zigzag_weights(curves: Sequence[Sequence[float]], ratios: Sequence[float], mass: float) -> list[float]:
    """Each layer's need under ZigZagKV's reading: the kept ratio that holds `mass` of its attention."""
    return [max(inverse_curve(ratios, c, mass), 1e-9) for c in curves]


def apportion(weights: Sequence[float], total: float, lo: float, hi: float) -> list[float]:
    """Shares proportional to `weights`, each clipped to [lo, hi], summing to `total` (water-filling:
    bisection on the multiplier); InvalidInput when `total` is outside [n lo, n hi]."""
    n = len(weights)
    if not n * lo - 1e-9 <= total <= n * hi + 1e-9:
        raise InvalidInput(f"kv: {total:.6g} tokens cannot be shared by {n} layers within [{lo}, {hi}] each")

    def at(scale: float) -> list[float]:
        return [min(max(scale * w, lo), hi) for w in weights]

    a, b = 0.0, 1.0
    while sum(at(b)) < total and b < 1e300:
        b *= 2
    for _ in range(BISECTION_STEPS):
        mid = (a + b) / 2
        if sum(at(mid)) < total:
            a = mid
        else:
            b = mid
    return at(b)


def round_to_total(values: Sequence[float], total: int, lo: int, hi: int) -> list[int]:
    """Whole numbers within [lo, hi], each within one of `values`, summing to `total` (largest remainder)."""
    base = [min(max(math.floor(v), lo), hi) for v in values]
    short = total - sum(base)
    order = sorted(range(len(values)), key=lambda i: -(values[i] - math.floor(values[i])))
    while short:
        step = 1 if short > 0 else -1
        moved = False
        for i in order if step > 0 else reversed(order):
            if short and lo <= base[i] + step <= hi:
                base[i] += step
                short -= step
                moved = True
        if not moved:
            raise InvalidInput(f"kv: {total} tokens cannot be shared within [{lo}, {hi}] per layer")
    return base


@dataclass(frozen=True, slots=True)
class Rung:
    """One step of the ladder: `tokens` kept at `bits` (None: the cache dtype), its bytes and its cost."""

    tokens: int
    bits: int | None
    size_bytes: int
    cost: float


def ladder(
    ratios: Sequence[float], bits: Sequence[int | None], errors: Sequence[Sequence[float]], context: int,
    floor: int, token_bytes: Callable[[int | None], int], allowed_bits: Sequence[int | None],
) -> list[Rung]:  # fmt: skip
    """A unit's rungs: each calibrated ratio (at least `floor`, at most `context` tokens) at each allowed
    bit width, the cheapest of any that keep the same tokens at the same bits."""
    best: dict[tuple[int, int | None], Rung] = {}
    for i, r in enumerate(ratios):
        tokens = min(max(round(r * context), floor), context)
        for j, b in enumerate(bits):
            if b not in allowed_bits:
                continue
            rung = Rung(tokens, b, tokens * token_bytes(b), errors[i][j])
            key = (tokens, b)
            if key not in best or rung.cost < best[key].cost:
                best[key] = rung
    return sorted(best.values(), key=lambda g: (g.size_bytes, g.cost))


def rung_label(rung: Rung) -> str:
    return f"{rung.tokens}@{rung.bits or 'full'}"


def joint_problem(
    names: Sequence[str], ladders: Sequence[Sequence[Rung]], budget_bytes: int
) -> ChoiceProblem:
    """memplan's multiple-choice problem: one rung per unit, summed cost, bytes within the budget."""
    layers = tuple(
        Layer(name, tuple(Choice(rung_label(g), g.cost, float(g.size_bytes)) for g in rungs))
        for name, rungs in zip(names, ladders, strict=True)
    )
    return ChoiceProblem(layers, (), Usage(size=float(budget_bytes)))


def interpolated_cost(rungs: Sequence[Rung], tokens: int, bits: int | None) -> float:
    """A unit's cost at `tokens` between two calibrated rungs of the same bits (linear in tokens)."""
    same = sorted((g for g in rungs if g.bits == bits), key=lambda g: g.tokens)
    below = [g for g in same if g.tokens <= tokens]
    above = [g for g in same if g.tokens >= tokens]
    if not below:
        return same[0].cost
    if not above:
        return same[-1].cost
    a, b = below[-1], above[0]
    if a.tokens == b.tokens:
        return a.cost
    return a.cost + (b.cost - a.cost) * (tokens - a.tokens) / (b.tokens - a.tokens)


def fill(
    rungs: Sequence[Sequence[Rung]], chosen: Sequence[Rung], spare_bytes: int, context: int
) -> list[int]:
    """Tokens per unit after spending `spare_bytes` on more tokens at the chosen bits, where each extra
    token lowers the interpolated cost most per byte, until no unit can take another token."""
    tokens = [g.tokens for g in chosen]
    per = [g.size_bytes // g.tokens if g.tokens else 0 for g in chosen]
    while True:
        best, best_gain = None, 0.0
        for u, g in enumerate(chosen):
            if tokens[u] >= context or not 0 < per[u] <= spare_bytes:
                continue
            gain = interpolated_cost(rungs[u], tokens[u], g.bits) - interpolated_cost(
                rungs[u], tokens[u] + 1, g.bits
            )
            gain /= per[u]
            if best is None or gain > best_gain:
                best, best_gain = u, gain
        if best is None:
            return tokens
        g = chosen[best]
        nxt = min(
            (r.tokens for r in rungs[best] if r.bits == g.bits and r.tokens > tokens[best]), default=context
        )
        take = min(nxt - tokens[best], spare_bytes // per[best], context - tokens[best])
        tokens[best] += max(take, 1)
        spare_bytes -= max(take, 1) * per[best]
