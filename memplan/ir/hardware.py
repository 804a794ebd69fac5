"""The `Hardware` model: memory tiers with capacity, bandwidth and latency, and the compute device's speed.

Presets are JSON files in `memplan/ir/presets/`; `load_hardware` takes a preset name or a path and
validates it. Bandwidths are bytes per second in the direction named: `read_bw` moves data from the tier to
the device, `write_bw` from the device to the tier. On a machine without a GPU the device tier is the CPU's
RAM under the plan's budget (preset `cpu`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema

from memplan.errors import InvalidInput

TierName = Literal["device", "host", "cxl", "ssd"]
TIER_ORDER: tuple[TierName, ...] = ("device", "host", "cxl", "ssd")


@dataclass(frozen=True, slots=True)
class Tier:
    """One memory tier. Capacity in bytes; bandwidths in bytes/s (read: tier to device; write: device to
    tier)."""

    name: TierName
    capacity_bytes: int
    read_bw: float
    write_bw: float
    latency_s: float
    numa_node: int | None = None
    """For CXL memory exposed as a NUMA node: the node to allocate on."""
    path: str | None = None
    """For the SSD tier: the directory its files go in (None: a temporary directory)."""
    compute_share: float | None = None
    """Share of a transfer's time by which it slows compute down (its copies and checksums take compute
    cores; measured by `memplan calibrate`). None: 1 on a cpu device, 0.01 on a GPU, whose copy engines
    move the bytes while the SMs compute."""


@dataclass(frozen=True, slots=True)
class Hardware:
    """A machine: its compute device and its memory tiers (the device's own memory is the tier `device`)."""

    name: str
    device_kind: Literal["cpu", "cuda"]
    flops: float
    """Sustained FLOP/s of the compute device for dense matmul in the working dtype."""
    mem_bw: float
    """Bytes/s between the compute units and the device tier."""
    tiers: tuple[Tier, ...]
    emulated: tuple[str, ...] = ()
    """Tiers backed by something else than they claim (e.g. CXL emulated with host memory)."""

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        have = ", ".join(t.name for t in self.tiers)
        raise InvalidInput(f"hardware {self.name!r} has no tier {name!r} (it has: {have})")

    def has_tier(self, name: str) -> bool:
        return any(t.name == name for t in self.tiers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TIER_SCHEMA = {
    "type": "object",
    "required": ["name", "capacity_bytes", "read_bw", "write_bw", "latency_s"],
    "additionalProperties": False,
    "properties": {
        "name": {"enum": list(TIER_ORDER)},
        "capacity_bytes": {"oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]},
        "read_bw": {"type": "number", "exclusiveMinimum": 0},
        "write_bw": {"type": "number", "exclusiveMinimum": 0},
        "latency_s": {"type": "number", "minimum": 0},
        "numa_node": {"type": ["integer", "null"], "minimum": 0},
        "path": {"type": ["string", "null"]},
        "compute_share": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    },
}

HARDWARE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "device_kind", "flops", "mem_bw", "tiers"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "device_kind": {"enum": ["cpu", "cuda"]},
        "flops": {"type": "number", "exclusiveMinimum": 0},
        "mem_bw": {"type": "number", "exclusiveMinimum": 0},
        "tiers": {"type": "array", "minItems": 1, "items": _TIER_SCHEMA},
        "emulated": {"type": "array", "items": {"enum": list(TIER_ORDER)}},
    },
}


def preset_names() -> list[str]:
    """Names of the hardware presets shipped with memplan."""
    files = resources.files("memplan.ir").joinpath("presets").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def load_hardware(name_or_path: str | os.PathLike[str]) -> Hardware:
    """A preset by name (`cpu`, `a100-80gb`...) or a JSON file describing any other machine."""
    text = str(name_or_path)
    if text in preset_names():
        raw = resources.files("memplan.ir").joinpath("presets").joinpath(f"{text}.json").read_text()
        return hardware_from_dict(json.loads(raw), source=f"preset {text!r}")
    path = Path(text)
    if not path.exists():
        raise InvalidInput(
            f"unknown hardware {text!r}: not a preset ({', '.join(preset_names())}) and no such file"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInput(f"hardware file {path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    return hardware_from_dict(data, source=f"file {path}")


def hardware_from_dict(data: dict[str, Any], source: str = "hardware description") -> Hardware:
    """Validate a hardware description against the schema and build the `Hardware` it describes."""
    try:
        jsonschema.validate(data, HARDWARE_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise InvalidInput(f"{source}: invalid at {where}: {e.message}") from e
    names = [t["name"] for t in data["tiers"]]
    if "device" not in names:
        raise InvalidInput(f"{source}: needs a tier named 'device' (the compute device's own memory)")
    if len(set(names)) != len(names):
        raise InvalidInput(f"{source}: tier names must be unique, got {names}")
    tiers = tuple(
        Tier(
            name=t["name"],
            capacity_bytes=_machine_ram() if t["capacity_bytes"] == "auto" else int(t["capacity_bytes"]),
            read_bw=float(t["read_bw"]),
            write_bw=float(t["write_bw"]),
            latency_s=float(t["latency_s"]),
            numa_node=t.get("numa_node"),
            path=t.get("path"),
            compute_share=t.get("compute_share"),
        )
        for t in sorted(data["tiers"], key=lambda t: TIER_ORDER.index(t["name"]))
    )
    return Hardware(
        name=data["name"],
        device_kind=data["device_kind"],
        flops=float(data["flops"]),
        mem_bw=float(data["mem_bw"]),
        tiers=tiers,
        emulated=tuple(data.get("emulated", ())),
    )


def _machine_ram() -> int:
    """Physical memory of this machine in bytes (capacity of the `cpu` preset's device tier)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
