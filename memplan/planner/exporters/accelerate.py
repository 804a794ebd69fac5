"""A generation plan as an accelerate `device_map` plus `max_memory` (JSON), with what accelerate cannot
express.

accelerate's `dispatch_model(model, device_map, offload_dir=...)` puts each module (or tensor: keys may
name parameters) on a device: a GPU index, `"cpu"` or `"disk"`, and `max_memory` bounds each device for
`infer_auto_device_map`. A plan's tiers map as device -> GPU 0 (`"cpu"` on a CPU-only machine), host and
CXL -> `"cpu"`, SSD -> `"disk"`; the map names the largest module whose tensors all share a device. What
it cannot say goes into `"memplan_notes"`: when copies are prefetched (accelerate copies a module's weights
when its forward starts, synchronously), where the KV cache lives (accelerate leaves it where it is
computed), a CXL tier distinct from host memory, and the SSD file layout.
"""

from __future__ import annotations

import json
from typing import Any

from memplan.errors import InvalidInput
from memplan.ir.graph import Role
from memplan.plans.plan import Plan


def accelerate_config(plan: Plan) -> str:
    """The device map, memory limits and notes as JSON text (see the module docstring)."""
    return json.dumps(config_dict(plan), indent=2) + "\n"


def config_dict(plan: Plan) -> dict[str, Any]:
    if plan.workload.gen < 1:
        raise InvalidInput(
            "accelerate export takes a generation plan (memplan plan ... --mode infer --gen N)"
        )
    cpu = plan.hardware.device_kind == "cpu"
    device: int | str = "cpu" if cpu else 0
    target = {"device": device, "host": "cpu", "cxl": "cpu", "ssd": "disk"}
    placed = (
        {p.value_id: p.tier for p in plan.decisions.placement.tensors} if plan.decisions.placement else {}
    )
    where: dict[str, int | str] = {}
    by_id = {v.id: v for v in plan.tensors}
    for v in plan.tensors:
        if v.role in (Role.PARAMETER, Role.BUFFER) and v.alias_of is None:
            where[v.name] = target[placed.get(v.id, "device")]
    for op in plan.ops:  # a module reading a tied weight under another module's name (an LM head)
        for vid in op.inputs:
            v = by_id[vid]
            owned = any(n == op.module_path or n.startswith(op.module_path + ".") for n in where)
            if v.role == Role.PARAMETER and op.module_path and not owned:
                where[op.module_path] = target[placed.get(v.id, "device")]
    max_memory: dict[str, str] = {str(device): str(plan.budget_bytes["device"])}
    if not cpu:
        host = sum(plan.budget_bytes.get(t, 0) for t in ("host", "cxl"))
        if host:
            max_memory["cpu"] = str(host)
    notes = [
        "accelerate copies an offloaded module's weights when its forward starts and waits for them; the "
        "plan "
        "prefetches each copy one unit ahead on a background thread (not expressible)",
        "the KV cache stays where accelerate computes it; the plan's KV placement is not expressible",
    ]
    kv_off = [p for p in placed if _role(plan, p) == Role.KV_CACHE and placed[p] != "device"]
    if kv_off:
        notes.append(f"{len(kv_off)} KV caches the plan keeps off the device are on the device here")
    if "cxl" in placed.values():
        notes.append("CXL memory is not a device accelerate knows: its tensors are mapped to 'cpu'")
    if cpu:
        notes.append(
            "a CPU-only machine: the plan's device tier is CPU memory under its budget, mapped to 'cpu'"
        )
    if "ssd" in placed.values():
        notes.append(
            "'disk' tensors go to accelerate's offload folder, one file per tensor read through the page "
            "cache; the plan's single O_DIRECT file laid out by the allocate pass is not expressible"
        )
    return {
        "device_map": _collapse(where),
        "max_memory": max_memory,
        "offload_folder": "offload" if "disk" in where.values() else None,
        "memplan_notes": notes,
    }


def _role(plan: Plan, vid: int) -> Role:
    return next(v.role for v in plan.tensors if v.id == vid)


def _collapse(where: dict[str, int | str]) -> dict[str, int | str]:
    """Name the largest modules whose tensors all share a device (a key covers every name below it)."""
    out: dict[str, int | str] = {}
    names = sorted(where)

    def devices(prefix: str) -> set[int | str]:
        return {d for n, d in where.items() if n == prefix or n.startswith(prefix + ".")}

    for name in names:
        if any(name == k or name.startswith(k + ".") for k in out):
            continue
        parts = name.split(".")
        key = name
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if len(devices(prefix)) == 1:
                key = prefix
                break
        out[key] = where[name]
    return out
