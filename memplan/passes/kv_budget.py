"""The `kv_budget` pass: how many tokens each layer (or key/value head) of a generation's KV cache keeps,
and at how many bits, under a total KV byte budget.

The budget is bytes for the whole batch, a share of the full cache, or tokens per layer and sequence
(`parse_kv_budget`: "2GiB", "20%", "96 tokens"); the full cache is every layer's keys and values for the
whole context (prompt + generated tokens) at the cache's dtype. The allocation rules are in `kv_methods`:
the published ones keep tokens at the cache's dtype; `memplan` (the default) picks one (tokens, bits) rung
per unit from a ladder by the exact multiple-choice ILP of `solvers/multiple_choice` (HiGHS, time limit),
costing the attention-output error calibration measured, then spends what the ladder's steps leave over.
The measurement (`KVCalibration`: PrefixKV's cumulative priority curves, entropy, sink and recent shares,
the error table) needs the model and text, which a pass never touches: `memplan.plan` measures it
(`planner/kv_calibration.py`) and hands it over in the options. The sinks and the recent window are always
kept, so no unit goes below their tokens; a budget below that at the fewest bits the ladder allows is
refused with that minimum. The result is the plan's `KVDecision`; the effective graph then prices each
layer's KV cache at its budgets' bytes, so placement and allocate see the compressed cache.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Literal

from memplan.errors import InfeasibleBudget, InvalidInput
from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.passes.base import PassOutput, PassSpec
from memplan.passes.baseline import rebased
from memplan.passes.kv_methods import (
    apportion,
    fill,
    interpolated_cost,
    joint_problem,
    ladder,
    prefix_ratios,
    pyramid_budgets,
    round_to_total,
    zigzag_weights,
)
from memplan.plans.decisions import (
    KV_BITS,
    KV_INDEX_BYTES,
    KVBudget,
    KVCalibration,
    KVDecision,
    kv_token_bytes,
)
from memplan.plans.plan import PassReport, Plan, SolverReport
from memplan.solvers.multiple_choice import solve_multiple_choice
from memplan.units import format_size, parse_size

NAME = "kv_budget"
Method = Literal["memplan", "uniform", "pyramidkv", "prefixkv", "zigzagkv"]
METHODS: tuple[Method, ...] = ("memplan", "uniform", "pyramidkv", "prefixkv", "zigzagkv")


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """A model's KV cache: layers, key/value heads per layer, head dim, bytes of the cache dtype."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int


@dataclass(frozen=True, slots=True)
class KVBudgetSpec:
    """A KV budget as given: `bytes` (whole batch), `ratio` of the full cache, or `tokens` per layer and
    sequence."""

    kind: Literal["bytes", "ratio", "tokens"]
    value: float

    def bytes_for(self, full_bytes: int, context: int) -> int:
        """The budget in bytes, for a full cache of `full_bytes` over `context` tokens."""
        if self.kind == "bytes":
            return int(self.value)
        share = self.value if self.kind == "ratio" else self.value / context
        return int(share * full_bytes)


def parse_kv_budget(text: str | int | float) -> KVBudgetSpec:
    """`2GiB` (bytes), `20%` (of the full cache), `96 tokens` / `96tok` (per layer and sequence)."""
    if isinstance(text, float):
        return _ratio(text, str(text))
    if isinstance(text, int):
        return KVBudgetSpec("bytes", parse_size(text))
    s = text.strip()
    if s.endswith("%"):
        try:
            return _ratio(float(s[:-1]) / 100, text)
        except ValueError:
            pass
    elif m := re.fullmatch(r"(\d+)\s*(tokens?|tok)", s):
        if int(m.group(1)) < 1:
            raise InvalidInput(f"KV budget {text!r}: keep at least 1 token per layer")
        return KVBudgetSpec("tokens", int(m.group(1)))
    else:
        try:
            return KVBudgetSpec("bytes", parse_size(s))
        except InvalidInput:
            pass
    raise InvalidInput(
        f"KV budget {text!r}: give bytes (2GiB), a share of the full cache (20%) or tokens (96 tokens)"
    )


def _ratio(value: float, text: str) -> KVBudgetSpec:
    if not 0 < value <= 1:
        raise InvalidInput(f"KV budget {text!r}: a share of the full cache must be in (0%, 100%]")
    return KVBudgetSpec("ratio", value)


@dataclass(frozen=True, slots=True)
class KVBudgetOptions:
    """`budget`: see `parse_kv_budget` (None: the pass is skipped). `bits`: the ladder's widths for the
    `memplan` method (None: the cache dtype). `per_head`: budgets per key/value head (`memplan` only).
    `pyramid_window` / `beta`: PyramidKV's (kvpress's defaults); `zigzag_mass`: the attention share a
    layer's need is measured at. `geometry` and `calibration` come from `memplan.plan`."""

    budget: str | int | float | None = None
    method: Method = "memplan"
    bits: tuple[int | None, ...] = (None, *KV_BITS)
    per_head: bool = False
    sink_tokens: int = 4
    recent_tokens: int = 16
    window: int = 8
    group_size: int = 32
    pyramid_window: int = 64
    beta: int = 20
    zigzag_mass: float = 0.9
    time_limit_s: float = 10.0
    geometry: KVGeometry | None = None
    calibration: KVCalibration | None = None


@dataclass(frozen=True, slots=True)
class _Setting:
    """What every method works from: geometry, batch, context, floor (protected tokens), budget."""

    geo: KVGeometry
    batch: int
    context: int
    floor: int
    budget_bytes: int
    full_bytes: int
    group_size: int
    """The options' group size, or the largest divisor of the head dim below it."""

    def token_bytes(self, bits: int | None, heads: int) -> int:
        """Bytes of one token of a unit of `heads` key/value heads, for the whole batch."""
        per = kv_token_bytes(self.geo.head_dim, bits, self.geo.dtype_bytes, self.group_size)
        return per * heads * self.batch


def run(graph: Graph, hardware: Hardware, plan: Plan, options: KVBudgetOptions | None = None) -> PassOutput:
    """Budget the generation's KV cache (see the module docstring)."""
    opts = options or KVBudgetOptions()
    t0 = time.perf_counter()
    if opts.budget is None:
        note = "nothing budgeted: no KV budget given (--kv-budget)"
        return PassOutput(plan, PassReport(NAME, 0.0, SolverReport("none", "trivial"), (note,)))
    _check(opts)
    setting = _setting(plan, opts)
    if setting.budget_bytes >= setting.full_bytes:
        budgets = _uniform_full(setting, opts)
        report, notes = (
            SolverReport("closed-form", "trivial"),
            ["the budget holds the whole cache: nothing evicted"],
        )
    elif opts.method == "memplan":
        budgets, report, notes = _joint(setting, opts)
    else:
        budgets, report, notes = _token_method(setting, opts)
    record = KVDecision(
        tuple(budgets), min(opts.sink_tokens, setting.context), opts.recent_tokens, opts.window,
        setting.group_size,
        opts.method, setting.context, setting.budget_bytes, opts.calibration,
    )  # fmt: skip
    new_plan = rebased(plan.with_(decisions=plan.decisions.with_(kv=record)))
    notes = [*notes, _summary(record, setting)]
    return PassOutput(new_plan, PassReport(NAME, time.perf_counter() - t0, report, tuple(notes)))


def _check(opts: KVBudgetOptions) -> None:
    check_options(opts)
    if opts.geometry is None:
        raise InvalidInput(
            "the kv_budget pass needs the model's KV geometry (layers, heads, head dim): plan with "
            "memplan.plan, or give KVBudgetOptions(geometry=...)"
        )
    if opts.method in ("memplan", "prefixkv", "zigzagkv") and opts.calibration is None:
        raise InvalidInput(
            f"the {opts.method} KV budgets need the attention statistics of calibration: plan with "
            "memplan.plan (it measures them), or give KVBudgetOptions(calibration=...) from "
            "memplan.planner.kv_calibration.calibrate_kv"
        )


def check_options(opts: KVBudgetOptions) -> None:
    """Refuse malformed options (InvalidInput) before anything is measured for them."""
    if opts.budget is not None:
        parse_kv_budget(opts.budget)
    if opts.method not in METHODS:
        raise InvalidInput(f"unknown KV budget method {opts.method!r}; use one of {', '.join(METHODS)}")
    if opts.per_head and opts.method != "memplan":
        raise InvalidInput(f"per-head KV budgets are planned by the memplan method only, not {opts.method}")
    for b in opts.bits:
        if b is not None and b not in KV_BITS:
            raise InvalidInput(f"KV bits {b}: use {', '.join(map(str, KV_BITS))} or None (the cache dtype)")
    if min(opts.sink_tokens, opts.recent_tokens) < 0 or opts.window < 1 or opts.group_size < 1:
        raise InvalidInput("KV sink and recent tokens must be >= 0, the window and the group size >= 1")
    if not opts.time_limit_s > 0:
        raise InvalidInput(f"kv_budget time limit {opts.time_limit_s}: must be a positive number of seconds")


def _setting(plan: Plan, opts: KVBudgetOptions) -> _Setting:
    geo = opts.geometry
    assert geo is not None
    w = plan.workload
    if w.gen < 1:
        raise InvalidInput("the kv_budget pass plans a generation: plan with mode infer and gen N")
    context = (w.seq or 1) + w.gen
    full_tok = kv_token_bytes(geo.head_dim, None, geo.dtype_bytes, 1)
    full = geo.layers * geo.kv_heads * context * full_tok * w.batch
    spec = parse_kv_budget(opts.budget) if opts.budget is not None else KVBudgetSpec("ratio", 1.0)
    floor = min(opts.sink_tokens + opts.recent_tokens, context)
    group = fitted_group(opts.group_size, geo.head_dim)
    return _Setting(geo, w.batch, context, floor, spec.bytes_for(full, context), full, group)


def fitted_group(group_size: int, head_dim: int) -> int:
    """The quantization group a head of `head_dim` gets: the largest divisor of it up to `group_size`."""
    return max(g for g in range(1, min(group_size, head_dim) + 1) if head_dim % g == 0)


def _budget(s: _Setting, layer: int, tokens: int, bits: int | None, head: int | None) -> KVBudget:
    """A budget with its bytes, its bookkeeping and its layer's transient (see `KVBudget`)."""
    heads = s.geo.kv_heads if head is None else 1
    size, index = tokens * s.token_bytes(bits, heads), tokens * heads * s.batch * KV_INDEX_BYTES
    return KVBudget(layer, tokens, bits, head, size, index, 2 * tokens * s.token_bytes(None, heads))


def _uniform_full(s: _Setting, opts: KVBudgetOptions) -> list[KVBudget]:
    return [_budget(s, layer, s.context, None, None) for layer in range(s.geo.layers)]


def _token_method(s: _Setting, opts: KVBudgetOptions) -> tuple[list[KVBudget], SolverReport, list[str]]:
    """uniform, pyramidkv, prefixkv, zigzagkv: tokens per layer at the cache dtype."""
    t0 = time.perf_counter()
    L, tb = s.geo.layers, s.token_bytes(None, s.geo.kv_heads)
    total = min(s.budget_bytes // tb, L * s.context)
    if total < L * s.floor:
        raise _too_small(s, opts, L * s.floor * tb, f"{opts.method} keeps tokens at the cache dtype")
    ratio = total / (L * s.context)
    notes: list[str] = []
    if opts.method == "pyramidkv":
        raw = pyramid_budgets(s.context, 1 - ratio, L, opts.pyramid_window, opts.beta)
        tokens = round_to_total([float(t) for t in raw], min(total, sum(raw)), s.floor, s.context)
        notes.append(
            f"PyramidKV closed form (window {opts.pyramid_window}, beta {opts.beta}): {raw}"
            + ("" if tokens == raw else f", trimmed to {tokens} to hold the floor and the budget")
        )
        status = "trivial"
    elif opts.method == "uniform":
        tokens = round_to_total([total / L] * L, total, s.floor, s.context)
        status = "trivial"
    else:
        cal = opts.calibration
        assert cal is not None
        curves = [cal.of(layer).mass for layer in range(L)]
        if opts.method == "prefixkv":
            ratios, threshold = prefix_ratios(curves, cal.ratios, ratio)
            shares = (
                apportion(ratios, total, s.floor, s.context)
                if _clipped(ratios, s)
                else [r * s.context for r in ratios]
            )
            notes.append(f"PrefixKV threshold {threshold:.6f}: every layer keeps that share of its attention")
        else:
            shares = apportion(
                zigzag_weights(curves, cal.ratios, opts.zigzag_mass), total, s.floor, s.context
            )
            notes.append(
                f"ZigZagKV: budgets in proportion to the tokens holding {opts.zigzag_mass:.0%} of a layer's "
                "attention"
            )
        tokens = round_to_total(shares, total, s.floor, s.context)
        status = "optimal" if opts.method == "prefixkv" else "trivial"
    report = SolverReport("bisection" if opts.method in ("prefixkv", "zigzagkv") else "closed-form", status,
                          time_s=time.perf_counter() - t0)  # fmt: skip
    budgets = [_budget(s, layer, t, None, None) for layer, t in enumerate(tokens)]
    cal = opts.calibration
    if cal is not None and None in cal.bits:
        notes.append(
            f"predicted attention error {_predicted(cal, budgets, s):.4g} (calibrated, summed over layers)"
        )
    return budgets, report, notes


def _clipped(ratios: list[float], s: _Setting) -> bool:
    return any(r * s.context < s.floor or r > 1 for r in ratios)


def _units(s: _Setting, opts: KVBudgetOptions) -> list[tuple[int, int | None]]:
    heads: list[int | None] = list(range(s.geo.kv_heads)) if opts.per_head else [None]
    return [(layer, h) for layer in range(s.geo.layers) for h in heads]


def _joint(s: _Setting, opts: KVBudgetOptions) -> tuple[list[KVBudget], SolverReport, list[str]]:
    """memplan's (tokens, bits) ladder per unit under the byte budget (module docstring)."""
    cal = opts.calibration
    assert cal is not None
    allowed = [b for b in opts.bits if b in cal.bits]
    if not allowed:
        raise InvalidInput(f"KV bits {opts.bits}: none of them was calibrated (calibrated: {cal.bits})")
    units = _units(s, opts)
    heads = 1 if opts.per_head else s.geo.kv_heads
    ladders = []
    for layer, head in units:
        stats = cal.of(layer, head)
        ladders.append(ladder(cal.ratios, cal.bits, stats.errors, s.context, s.floor,
                              lambda b: s.token_bytes(b, heads), allowed))  # fmt: skip
    least = sum(min(g.size_bytes for g in rungs) for rungs in ladders)
    if s.budget_bytes < least:
        fewest = min((b for b in allowed if b is not None), default=None)
        raise _too_small(s, opts, least, f"the fewest bits allowed are {fewest or 'the cache dtype'}")
    names = [f"layer{layer}" + ("" if head is None else f".head{head}") for layer, head in units]
    solution = solve_multiple_choice(joint_problem(names, ladders, s.budget_bytes), opts.time_limit_s)
    if solution.choice is None:
        raise InvalidInput(
            f"kv_budget: no choice found in {opts.time_limit_s} s; raise KVBudgetOptions.time_limit_s"
        )
    chosen = [rungs[k] for rungs, k in zip(ladders, solution.choice, strict=True)]
    spare = s.budget_bytes - sum(g.size_bytes for g in chosen)
    tokens = fill(ladders, chosen, spare, s.context)
    budgets = [
        _budget(s, layer, t, g.bits, head) for (layer, head), g, t in zip(units, chosen, tokens, strict=True)
    ]
    filled = sum(interpolated_cost(r, t, g.bits) for r, g, t in zip(ladders, chosen, tokens, strict=True))
    report = SolverReport("highs-milp", solution.status, solution.objective, solution.bound, solution.gap,
                          solution.time_s, opts.time_limit_s)  # fmt: skip
    bits = sorted({str(g.bits or "full") for g in chosen})
    notes = [
        f"{len(units)} units, ladder of {max(len(r) for r in ladders)} (tokens, bits) rungs each; bits used: "
        + ", ".join(bits),
        f"ILP objective {solution.objective or 0.0:.4g} (calibrated attention error, summed); after "
        "spending the "
        f"{format_size(spare)} the ladder's steps left over: {filled:.4g}",
    ]
    return budgets, report, notes


def _predicted(cal: KVCalibration, budgets: list[KVBudget], s: _Setting) -> float:
    """The calibrated error of token-only budgets (at the cache dtype), summed over layers."""
    total = 0.0
    for b in budgets:
        stats = cal.of(b.layer, b.head)
        rungs = ladder(cal.ratios, cal.bits, stats.errors, s.context, s.floor, lambda _: 1, [None])
        total += interpolated_cost(rungs, b.tokens, None)
    return total


def _too_small(s: _Setting, opts: KVBudgetOptions, least: int, why: str) -> InfeasibleBudget:
    units = s.geo.layers * (s.geo.kv_heads if opts.per_head else 1)
    msg = (
        f"KV budget {format_size(s.budget_bytes)} is below the least the cache can hold, "
        f"{format_size(least)}: every one of the {units} {'heads' if opts.per_head else 'layers'} keeps its "
        f"{opts.sink_tokens} sink and {opts.recent_tokens} recent tokens ({s.floor} of the {s.context}-token "
        f"context) and {why}. Raise "
        f"--kv-budget to at least {format_size(least)}, lower the sink or recent tokens, or allow fewer bits"
    )
    return InfeasibleBudget(msg, least, s.budget_bytes, [f"sink and recent tokens of {units} units"])


def _summary(record: KVDecision, s: _Setting) -> str:
    kept = sum(b.tokens for b in record.budgets if b.head is None) + sum(
        b.tokens for b in record.budgets if b.head is not None
    ) / max(s.geo.kv_heads, 1)
    return (
        f"KV cache {format_size(record.planned_bytes)} of a {format_size(s.budget_bytes)} budget "
        f"({100 * record.planned_bytes / max(s.full_bytes, 1):.1f}% of the full "
        f"{format_size(s.full_bytes)}); "
        f"{kept / s.geo.layers:.1f} of {s.context} tokens kept per layer on average ({record.method})"
    )


PASS = PassSpec(
    NAME, run, KVBudgetOptions, before=frozenset({"kv", "remat", "placement", "allocate"}),
    modes=frozenset({"generate"}),
)  # fmt: skip
