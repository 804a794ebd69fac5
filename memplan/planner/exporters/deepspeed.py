"""A training plan as the memory part of a DeepSpeed config (JSON), with what DeepSpeed cannot express.

DeepSpeed's `activation_checkpointing` block (keys from
`deepspeed/runtime/activation_checkpointing/config.py`) configures `deepspeed.checkpointing.checkpoint`,
which the model code calls per block: it is block-level, not per tensor. The settings are derived from the
plan's `remat_swap` decisions:

    partition_activations           false: a plan is for one device, no model-parallel ranks to split over
    cpu_checkpointing               true iff the plan swaps activations to host or CXL memory
    contiguous_memory_optimization  false: memplan's allocate pass owns offsets; DeepSpeed's buffers need
                                    partition_activations anyway
    number_checkpoints              number of layers with at least one recomputed saved activation
    synchronize_checkpoint_boundary false (a profiling aid)
    profile                         false

`zero_optimization.offload_param` / `offload_optimizer` (keys from `deepspeed/runtime/zero/offload_config.py`)
are written only when the plan's residency puts parameters / optimizer state off the device (host or CXL ->
"cpu", SSD -> "nvme"). No memplan pass decides that today, so for today's plans the block is absent and a
note says so. Everything DeepSpeed cannot express goes into the top-level `"memplan_notes"` list.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from memplan.ir.graph import Role
from memplan.planner.exporters.common import remat_decision
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan

HOST_TIERS = frozenset({"host", "cxl"})
OFFLOAD_DEVICE = {"host": "cpu", "cxl": "cpu", "ssd": "nvme"}
"""memplan tier -> DeepSpeed offload device."""


def deepspeed_config(plan: Plan) -> str:
    """The config as JSON text (see module docstring)."""
    return json.dumps(config_dict(plan), indent=2) + "\n"


def config_dict(plan: Plan) -> dict[str, Any]:
    """The config as a JSON-ready dict: `activation_checkpointing`, `zero_optimization` if the plan offloads
    model state, and `memplan_notes`."""
    remat = remat_decision(plan, "deepspeed")
    tensors, tier = remat.tensors, remat.tier
    swapped = [t for t in tensors if t.decision == "swap"]
    rebuilt = ("recompute", "split")
    layers = sorted({t.layer for t in tensors if t.decision in rebuilt and t.layer is not None})
    cpu = bool(swapped) and tier in HOST_TIERS
    out: dict[str, Any] = {
        "activation_checkpointing": {
            "partition_activations": False,
            "cpu_checkpointing": cpu,
            "contiguous_memory_optimization": False,
            "number_checkpoints": len(layers),
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        },
    }
    offload = _offload(plan)
    if offload:
        out["zero_optimization"] = {"stage": 3 if "offload_param" in offload else 2, **offload}
    out["memplan_notes"] = _notes(plan, tensors, layers, tier, offload)
    return out


def _offload(plan: Plan) -> dict[str, dict[str, Any]]:
    """offload_param / offload_optimizer for the roles the plan's residency keeps off the device."""
    roles = {v.id: v.role for v in plan.tensors}
    where: dict[Role, set[str]] = {Role.PARAMETER: set(), Role.OPTIMIZER_STATE: set()}
    for iv in plan.residency:
        role = roles.get(iv.value_id)
        if role in where and iv.tier in OFFLOAD_DEVICE:
            where[role].add(OFFLOAD_DEVICE[iv.tier])
    out: dict[str, dict[str, Any]] = {}
    for role, key in ((Role.PARAMETER, "offload_param"), (Role.OPTIMIZER_STATE, "offload_optimizer")):
        if where[role]:
            device = "nvme" if "nvme" in where[role] else "cpu"
            out[key] = {"device": device, "pin_memory": device == "cpu"}
    return out


def _notes(
    plan: Plan,
    tensors: tuple[TensorRemat, ...],
    layers: list[int],
    tier: str | None,
    offload: dict[str, dict[str, Any]],
) -> list[str]:
    count = Counter(t.decision for t in tensors)
    size: Counter[str] = Counter()
    for t in tensors:
        size[t.decision] += t.size_bytes
    notes = [
        f"derived from the memplan plan of {plan.model.name} (batch {plan.workload.batch}, seq "
        f"{plan.workload.seq}, device budget {plan.budget_bytes.get('device')} B): {len(tensors)} saved "
        f"activations, keep {count['keep']} ({size['keep']} B), swap {count['swap']} ({size['swap']} B), "
        f"recompute {count['recompute']} ({size['recompute']} B), split {count['split']} "
        f"({size['split']} B; DeepSpeed cannot split a tensor, its block is checkpointed).",
        "lost: per-tensor decisions. DeepSpeed checkpoints whole blocks (keeps only each block's inputs and "
        "recomputes its whole forward); the plan recomputes only chosen tensors and keeps the rest.",
        f"number_checkpoints = {len(layers)}: the layers with at least one recomputed or split tensor "
        f"({', '.join(map(str, layers)) or 'none'}); wrap exactly those blocks in "
        "deepspeed.checkpointing.checkpoint.",
    ]
    notes += _swap_notes(count["swap"], tier)
    if not offload:
        notes.append(
            "zero_optimization.offload_param / offload_optimizer omitted: the plan keeps parameters "
            "and optimizer state on the device (no memplan pass offloads model state today)."
        )
    notes.append(
        "partition_activations and contiguous_memory_optimization are false: the plan is for one "
        "device and memplan's allocate pass, not DeepSpeed, assigns offsets."
    )
    return notes


def _swap_notes(n_swapped: int, tier: str | None) -> list[str]:
    if n_swapped == 0:
        return ["cpu_checkpointing = false: the plan swaps no activation."]
    lost = (
        "lost: swap of individual activations and prefetch timing. The plan copies each swapped tensor "
        "out after its last forward use and prefetches it back just before its first backward use; "
        "DeepSpeed only moves checkpointed block inputs to CPU, with no prefetch schedule."
    )
    if tier in HOST_TIERS:
        return [f"cpu_checkpointing = true: the plan swaps {n_swapped} activations to {tier}.", lost]
    return [
        f"cpu_checkpointing = false: the plan swaps {n_swapped} activations to {tier}, which DeepSpeed "
        "activation checkpointing cannot target (it offloads to CPU memory only).",
        lost,
    ]
