"""A plan's bits decision as a torchao `FqnToConfig` (JSON), with what torchao cannot express.

torchao's `quantize_(model, FqnToConfig({fqn: config, ...}))` (torchao 0.15+; `filter_fn` must be None)
quantizes each module its fully qualified name names with that config (None: left as it is). The JSON is
`torchao.core.config.config_to_dict`'s form of
that object (`{"_type", "_version", "_data"}`, nested), so `config_from_dict` rebuilds it; `python` holds
the same as code, which does not depend on the `_version` numbers (those of torchao 0.15: a different
torchao refuses a mismatch in `config_from_dict`). Formats map as

    int8, per channel, symmetric      Int8WeightOnlyConfig()
    other integer formats             IntxWeightOnlyConfig(weight_dtype=torch.intN, granularity=PerAxis(0)
                                      or PerGroup(g), mapping_type=SYMMETRIC or ASYMMETRIC,
                                      scale_dtype=the plan's scale dtype)
    fp16, bf16                        not a torchao config: listed under `casts` (`module.to(dtype)`)

What `memplan_notes` says it cannot express: torchao picks its own scales and zero points (its symmetric
grid is [-2^(b-1), 2^(b-1) - 1], memplan's the restricted [-(2^(b-1) - 1), 2^(b-1) - 1]), its handlers
take `nn.Linear` only (GPT-2's `Conv1D`, stored [in, out], must become an `nn.Linear` first), the fast
int4 path (`Int4WeightOnlyConfig`, tinygemm) keeps its zero points in the float domain, and fp16/bf16
weight storage is a cast, not a config.
"""

from __future__ import annotations

import json
from typing import Any

from memplan.planner.exporters.common import StoredWeight, stored_weights
from memplan.plans.decisions import TensorBits
from memplan.plans.plan import Plan

VERSIONS = {
    "FqnToConfig": 1,
    "Int8WeightOnlyConfig": 1,
    "IntxWeightOnlyConfig": 2,
    "PerAxis": 1,
    "PerGroup": 1,
}
"""`_version` of each class in torchao 0.15's `config_to_dict` output."""
CAST = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def torchao_config(plan: Plan) -> str:
    """The config, its Python form and the notes as JSON text (see the module docstring)."""
    return json.dumps(config_dict(plan), indent=2) + "\n"


def config_dict(plan: Plan) -> dict[str, Any]:
    weights, kept = stored_weights(plan, "torchao")
    configs = {w.module: _config(w.bits) for w in weights if w.bits.format not in CAST}
    casts = {w.module: CAST[w.bits.format] for w in weights if w.bits.format in CAST}
    return {
        "fqn_to_config": _node("FqnToConfig", {"fqn_to_config": {**configs, **{m: None for m in kept}}}),
        "casts": casts,
        "python": _python(weights, kept),
        "memplan_notes": _notes(weights, kept),
    }


def _node(kind: str, data: Any) -> dict[str, Any]:
    return {"_type": kind, "_version": VERSIONS.get(kind, 1), "_data": data}


def _config(b: TensorBits) -> dict[str, Any]:
    if b.format == "int8" and b.symmetric and b.scale_layout == "per-channel":
        return _node("Int8WeightOnlyConfig", {})
    granularity = (
        _node("PerAxis", {"axis": 0})
        if b.scale_layout == "per-channel"
        else _node("PerGroup", {"group_size": b.group_size})
    )
    return _node("IntxWeightOnlyConfig", {
        "weight_dtype": {"_type": "torch.dtype", "_data": b.format},
        "granularity": granularity,
        "mapping_type": {"_type": "MappingType", "_data": "SYMMETRIC" if b.symmetric else "ASYMMETRIC"},
        "scale_dtype": {"_type": "torch.dtype", "_data": b.scale_dtype},
    })  # fmt: skip


def _code(b: TensorBits) -> str:
    if b.format == "int8" and b.symmetric and b.scale_layout == "per-channel":
        return "Int8WeightOnlyConfig()"
    granularity = "PerAxis(0)" if b.scale_layout == "per-channel" else f"PerGroup({b.group_size})"
    mapping = "SYMMETRIC" if b.symmetric else "ASYMMETRIC"
    return (
        f"IntxWeightOnlyConfig(weight_dtype=torch.{b.format}, granularity={granularity}, "
        f"mapping_type=MappingType.{mapping}, scale_dtype=torch.{b.scale_dtype})"
    )


def _python(weights: list[StoredWeight], kept: list[str]) -> str:
    lines = [
        "import torch",
        "from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_",
        "from torchao.quantization.granularity import PerAxis, PerGroup",
        "from torchao.quantization.quant_primitives import MappingType",
        "",
        "config = FqnToConfig({",
    ]
    lines += [f"    {w.module!r}: {_code(w.bits)}," for w in weights if w.bits.format not in CAST]
    lines += [f"    {m!r}: None," for m in kept]
    lines += ["})", "quantize_(model, config, filter_fn=None)"]
    lines += [f"model.get_submodule({w.module!r}).to(torch.{CAST[w.bits.format]})" for w in weights
              if w.bits.format in CAST]  # fmt: skip
    return "\n".join(lines) + "\n"


def _notes(weights: list[StoredWeight], kept: list[str]) -> list[str]:
    notes = [
        "torchao computes its own scales and zero points from the float weights: its symmetric grid is "
        "[-2^(b-1), 2^(b-1) - 1] where memplan's is [-(2^(b-1) - 1), 2^(b-1) - 1], so values differ slightly "
        "from memplan's runtime",
        f"{len(kept)} quantizable modules keep their float weights (None in the map)",
    ]
    conv1d = [w.module for w in weights if w.bits.transposed]
    if conv1d:
        notes.append(
            f"{len(conv1d)} modules are GPT-2 Conv1D (weight stored [in, out]): torchao's handlers take "
            "nn.Linear only; replace them by nn.Linear with the transposed weight before quantize_"
        )
    int4 = [w.module for w in weights if w.bits.format == "int4" and not w.bits.symmetric]
    if int4:
        notes.append(
            f"{len(int4)} int4 asymmetric modules use IntxWeightOnlyConfig; Int4WeightOnlyConfig(group_size="
            "g) runs faster kernels (tinygemm) but keeps its zero points in the float domain (another grid)"
        )
    casts = [w.module for w in weights if w.bits.format in CAST]
    if casts:
        notes.append(f"{len(casts)} modules store fp16/bf16 weights: no torchao config; cast them (`casts`)")
    return notes
