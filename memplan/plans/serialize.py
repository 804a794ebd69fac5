"""The plan's JSON form: to and from dicts, validation against `plan.schema.json`, atomic save, safe load.

A file that is not JSON, fails the schema, or has another schema version is refused with a `PlanMismatch`
that says what is wrong; nothing is ever half-written (temp file in the same directory, then rename).
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from memplan.errors import PlanMismatch
from memplan.files import atomic_write_text
from memplan.ir.analysis import Interval
from memplan.ir.graph import Op, Role, Value
from memplan.ir.hardware import hardware_from_dict
from memplan.plans.decisions import (
    AllocateDecision,
    Arena,
    BitsDecision,
    BlockRemat,
    CandidateCost,
    Decisions,
    DeviceCopy,
    KVBudget,
    KVCalibration,
    KVDecision,
    KVHeadStats,
    OrderDecision,
    PlacementDecision,
    RematDecision,
    TensorBits,
    TensorCandidates,
    TensorPlacement,
    TensorRemat,
    TierPacking,
)
from memplan.plans.plan import (
    SCHEMA_VERSION,
    Event,
    ModelInfo,
    PassReport,
    Plan,
    Predictions,
    SolverReport,
    Workload,
    jsonable,
)


@cache
def plan_schema() -> dict[str, Any]:
    """The JSON Schema every plan file must satisfy."""
    return json.loads(resources.files("memplan.plans").joinpath("plan.schema.json").read_text())


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    d = jsonable(plan)
    d["hardware"] = jsonable(plan.hardware)
    return d


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Validate and write the plan as JSON, atomically."""
    d = plan_to_dict(plan)
    validate_plan_dict(d, source="plan being saved")
    atomic_write_text(path, json.dumps(d, separators=(",", ":")) + "\n")


def validate_plan_dict(d: Any, source: str) -> None:
    """Raise `PlanMismatch` unless `d` is a plan of this schema version that satisfies the schema."""
    if not isinstance(d, dict):
        raise PlanMismatch(
            f"{source}: not a memplan plan (top level is {type(d).__name__}, expected an object)"
        )
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PlanMismatch(
            f"{source}: plan schema version {version!r}, this memplan reads version {SCHEMA_VERSION}; "
            "re-create the plan with `memplan plan`"
        )
    try:
        jsonschema.validate(d, plan_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise PlanMismatch(f"{source}: invalid plan at {where}: {e.message[:300]}") from e


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read, validate and rebuild a plan; a missing, corrupted or foreign file gets a clear error."""
    p = Path(path)
    if not p.exists():
        raise PlanMismatch(f"no plan file at {p}; create one with `memplan plan MODEL -o {p}`")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanMismatch(
            f"{p}: corrupted plan file, not valid JSON ({e}); re-create it with `memplan plan`"
        ) from e
    validate_plan_dict(d, source=str(p))
    return plan_from_dict(d)


def plan_from_dict(d: dict[str, Any]) -> Plan:
    """Rebuild a `Plan` from its validated JSON form."""
    pred = d["predictions"]
    return Plan(
        model=ModelInfo(**d["model"]),
        hardware=hardware_from_dict(_hardware_dict(d["hardware"]), source="plan's hardware"),
        workload=Workload(**d["workload"]),
        budget_bytes=dict(d["budget_bytes"]),
        tensors=tuple(_value(t) for t in d["tensors"]),
        ops=tuple(_op(o) for o in d["ops"]),
        outputs=tuple(d["outputs"]),
        residency=tuple(Interval(**r) for r in d["residency"]),
        events=tuple(Event(**e) for e in d["events"]),
        predictions=Predictions(**pred),
        offsets={tier: {int(k): v for k, v in m.items()} for tier, m in d["offsets"].items()},
        decisions=decisions_from_dict(d["decisions"]),
        passes=tuple(
            PassReport(p["name"], p["time_s"], SolverReport(**p["solver"]), tuple(p["notes"]))
            for p in d["passes"]
        ),
        warnings=tuple(d["warnings"]),
        memplan_version=d["memplan_version"],
        created=d["created"],
        schema_version=d["schema_version"],
    )


def decisions_from_dict(d: dict[str, Any]) -> Decisions:
    """Rebuild the typed decision records from their validated JSON form."""
    order, bits, kv, remat, placement, alloc = (
        d[k] for k in ("order", "bits", "kv", "remat", "placement", "allocate")
    )
    return Decisions(
        order=OrderDecision(tuple(order["op_ids"])) if order else None,
        bits=_bits(bits) if bits else None,
        kv=_kv(kv) if kv else None,
        remat=_remat(remat) if remat else None,
        placement=PlacementDecision(tuple(_placed(t) for t in placement["tensors"])) if placement else None,
        allocate=AllocateDecision(
            tuple(Arena(**a) for a in alloc["arenas"]), tuple(TierPacking(**p) for p in alloc["packings"])
        )
        if alloc
        else None,
    )


def _kv(d: dict[str, Any]) -> KVDecision:
    budgets = tuple(KVBudget(**b) for b in d["budgets"])
    cal = d["calibration"]
    calibration = (
        KVCalibration(
            tuple(cal["ratios"]), tuple(cal["bits"]),
            tuple(KVHeadStats(h["layer"], h["head"], tuple(h["mass"]), h["entropy"], h["sink_mass"],
                              h["recent_mass"], tuple(tuple(r) for r in h["errors"])) for h in cal["heads"]),
            cal["layers"], cal["kv_heads"], cal["head_dim"], cal["dtype_bytes"], cal["prompt"], cal["follow"],
            cal["samples"],
        )
        if cal
        else None
    )  # fmt: skip
    return KVDecision(
        budgets, d["sink_tokens"], d["recent_tokens"], d["window"], d["group_size"], d["method"],
        d["context"], d["budget_bytes"], calibration,
    )  # fmt: skip


def _bits(d: dict[str, Any]) -> BitsDecision:
    candidates = tuple(
        TensorCandidates(
            t["value_id"], t["curvature"], t["estimator"],
            tuple(CandidateCost(c["label"], TensorBits(**c["bits"]), c["cost"], c["stored_bytes"])
                  for c in t["candidates"]),
        )
        for t in d["candidates"]
    )  # fmt: skip
    tensors = tuple(TensorBits(**t) for t in d["tensors"])
    return BitsDecision(tensors, candidates, tuple(tuple(g) for g in d["ties"]), d["sensitivity"])


def _placed(t: dict[str, Any]) -> TensorPlacement:
    return TensorPlacement(**{**t, "copies": tuple(DeviceCopy(**c) for c in t["copies"])})


def _remat(d: dict[str, Any]) -> RematDecision:
    lists = ("recompute_ops", "recompute_transient", "view_ops")
    tensors = tuple(
        TensorRemat(**{k: tuple(v) if k in lists else v for k, v in t.items()}) for t in d["tensors"]
    )
    blocks = tuple(
        BlockRemat(**{k: tuple(v) if isinstance(v, list) else v for k, v in b.items()}) for b in d["blocks"]
    )
    return RematDecision(d["tier"], tensors, blocks)


def _hardware_dict(h: dict[str, Any]) -> dict[str, Any]:
    tiers = [{k: v for k, v in t.items() if v is not None or k in ("numa_node", "path")} for t in h["tiers"]]
    return {
        "name": h["name"],
        "device_kind": h["device_kind"],
        "flops": h["flops"],
        "mem_bw": h["mem_bw"],
        "tiers": tiers,
        "emulated": list(h.get("emulated", [])),
    }


def _value(t: dict[str, Any]) -> Value:
    return Value(
        t["id"],
        t["name"],
        t["size_bytes"],
        t["dtype"],
        tuple(t["shape"]),
        Role(t["role"]),
        t["alias_of"],
        t["module_path"],
        t["layer"],
    )


def _op(o: dict[str, Any]) -> Op:
    return Op(
        o["id"],
        o["name"],
        o["target"],
        tuple(o["inputs"]),
        tuple(o["outputs"]),
        o["flops"],
        o["bytes_read"],
        o["bytes_written"],
        o["module_path"],
        o["layer"],
        o["cost_known"],
    )
