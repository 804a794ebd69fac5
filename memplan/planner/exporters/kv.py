"""A plan's KV budgets as the per-layer ratios PrefixKV and kvpress take.

Both tools compress the prompt once, at the end of the prefill, and then let the generated tokens in
without evicting: a ratio is the share of the prompt's tokens a layer drops. memplan's budget caps a
layer's cache at every step, so a layer with a cap of `t` tokens after a prompt of `P` and `G` generated
tokens keeps `t - G` of the prompt (at least none) and its ratio is `1 - (t - G) / P`: the cache then
reaches exactly `t` tokens at the last step, as memplan's would.

- `--to prefixkv`: PrefixKV's JSON list of per-layer eviction ratios.
- `--to kvpress`: `PerLayerCompressionPress(press, compression_ratios=[...])`'s ratios, with the scorer
  memplan's runtime uses (`SnapKVPress`, the observation window), as JSON with the Python that builds it.

Neither format has bits per layer, budgets per head, or sink tokens that are never evicted: a plan with
quantized or per-head budgets is refused (plan with `--kv-method` pyramidkv, prefixkv, zigzagkv or uniform,
or `--kv-bits full`); kvpress's notes say what else differs.
"""

from __future__ import annotations

import json
from typing import Any

from memplan.errors import InvalidInput
from memplan.plans.decisions import KVDecision
from memplan.plans.plan import Plan


def prefix_ratios_of(plan: Plan, fmt: str) -> list[float]:
    """The share of the prompt each layer drops (module docstring); InvalidInput when the format cannot
    express the plan."""
    kv = _kv(plan, fmt)
    w = plan.workload
    prompt, gen = w.seq or 1, w.gen
    by_layer = sorted(kv.budgets, key=lambda b: b.layer)
    return [round(min(max(1 - (b.tokens - gen) / prompt, 0.0), 1.0), 6) for b in by_layer]


def _kv(plan: Plan, fmt: str) -> KVDecision:
    kv = plan.decisions.kv
    if kv is None:
        raise InvalidInput(
            f"plan of {plan.model.name} has no KV budgets: the {fmt} export needs a generation plan with "
            "--kv-budget (memplan plan MODEL --mode infer --gen N --kv-budget 20%)"
        )
    cannot = []
    if any(b.bits is not None for b in kv.budgets):
        widths = sorted({str(b.bits) for b in kv.budgets if b.bits})
        cannot.append(f"bits per layer ({', '.join(widths)})")
    if any(b.head is not None for b in kv.budgets):
        cannot.append("budgets per head")
    if cannot:
        raise InvalidInput(
            f"{fmt} takes one token ratio per layer and cannot express this plan's {' and '.join(cannot)}: "
            "plan with --kv-method pyramidkv, prefixkv, zigzagkv or uniform (or --kv-bits full) to export it"
        )
    return kv


def prefixkv_config(plan: Plan) -> str:
    """PrefixKV's per-layer eviction ratios, a JSON list."""
    return json.dumps(prefix_ratios_of(plan, "prefixkv")) + "\n"


def kvpress_config(plan: Plan) -> str:
    """kvpress's per-layer compression ratios, the press that takes them, and what differs."""
    ratios = prefix_ratios_of(plan, "kvpress")
    kv = plan.decisions.kv
    assert kv is not None
    out: dict[str, Any] = {
        "press": "PerLayerCompressionPress",
        "scorer": {"press": "SnapKVPress", "window_size": kv.window},
        "compression_ratios": ratios,
        "python": (
            "from kvpress import PerLayerCompressionPress, SnapKVPress\n"
            f"press = PerLayerCompressionPress(SnapKVPress(window_size={kv.window}), "
            f"compression_ratios={ratios})"
        ),
        "memplan_notes": [
            f"ratios are shares of the {plan.workload.seq}-token prompt dropped at the end of the prefill; "
            f"with {plan.workload.gen} generated tokens each layer ends at its planned cap",
            f"kvpress does not protect sink tokens (memplan keeps the first {kv.sink_tokens}) and scores "
            f"only at the prefill (memplan keeps scoring during decode and holds the cap at every step)",
            "kvpress's PerLayerCompressionPress is experimental and needs flash attention (its docstring)",
        ],
    }
    return json.dumps(out, indent=2) + "\n"
