"""A plan's bits decision as the `quantization_config` block of a Hugging Face compressed-tensors checkpoint
(JSON), with what the format cannot express.

compressed-tensors (the format llm-compressor writes and vLLM and transformers read) describes a
quantized model in its `config.json` by `config_groups`: each group is one scheme (`weights`: `num_bits`,
`type`, `symmetric`, `strategy` `channel` or `group`, `group_size`...) and the modules it `targets`. A plan
gives one group per distinct format, targeting its modules by full name; the modules whose weights the
pass could quantize but kept float are in `ignore`. Activations stay float (`input_activations` null:
weight-only, what vLLM calls WNA16).

What `memplan_notes` says it cannot express: the packed checkpoint itself (this is the config block; the
weights must be compressed by compressed-tensors from the float model, which recomputes scales: its
symmetric grid is [-2^(b-1), 2^(b-1) - 1], memplan's [-(2^(b-1) - 1), 2^(b-1) - 1]), fp16/bf16 storage (not
a quantization scheme: those modules are ignored and should be cast), GPT-2's `Conv1D` modules (loaders
expect `nn.Linear`), scale dtypes (the loader chooses), and bit widths loaders do not run (vLLM's
weight-only kernels take 4 and 8 bits).
"""

from __future__ import annotations

import json
from typing import Any

from memplan.planner.exporters.common import StoredWeight, stored_weights
from memplan.plans.plan import Plan

FLOAT_FORMATS = frozenset({"fp32", "fp16", "bf16"})


def compressed_tensors_config(plan: Plan) -> str:
    """`{"quantization_config": {...}, "memplan_notes": [...]}` as JSON text (see the module docstring)."""
    return json.dumps(config_dict(plan), indent=2) + "\n"


def config_dict(plan: Plan) -> dict[str, Any]:
    weights, kept = stored_weights(plan, "compressed-tensors")
    ints = [w for w in weights if w.bits.format not in FLOAT_FORMATS]
    casts = [w.module for w in weights if w.bits.format in FLOAT_FORMATS]
    schemes: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for w in ints:
        scheme = _weights(w)
        schemes.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(w.module)
    groups = {
        f"group_{i}": {
            "targets": modules,
            "weights": scheme,
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
        for i, (scheme, modules) in enumerate(schemes.values())
    }
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted([*kept, *casts]),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    return {"quantization_config": config, "memplan_notes": _notes(weights, casts)}


def _weights(w: StoredWeight) -> dict[str, Any]:
    b = w.bits
    per_group = b.scale_layout == "per-group"
    return {
        "num_bits": b.bits,
        "type": "int",
        "symmetric": b.symmetric,
        "strategy": "group" if per_group else "channel",
        "group_size": b.group_size if per_group else None,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _notes(weights: list[StoredWeight], casts: list[str]) -> list[str]:
    notes = [
        "this is the config block only: compress the float weights with compressed-tensors, which computes "
        "its own scales (its symmetric grid is [-2^(b-1), 2^(b-1) - 1], memplan's [-(2^(b-1) - 1), "
        "2^(b-1) - 1]) and picks the scale dtype",
    ]
    if casts:
        notes.append(
            f"{len(casts)} modules store fp16/bf16 weights: not a scheme, so ignored here; cast them"
        )
    conv1d = [w.module for w in weights if w.bits.transposed]
    if conv1d:
        notes.append(
            f"{len(conv1d)} target modules are GPT-2 Conv1D (weight [in, out]): loaders expect nn.Linear"
        )
    odd = sorted({w.bits.bits for w in weights if w.bits.format not in FLOAT_FORMATS} - {4, 8})
    if odd:
        notes.append(
            f"{', '.join(map(str, odd))}-bit groups: vLLM's weight-only kernels take 4 and 8 bits; other "
            "loaders may refuse them"
        )
    return notes
