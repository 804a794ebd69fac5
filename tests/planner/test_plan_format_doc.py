"""docs/plan-format.md documents every field of plan.schema.json, and its no-memplan reader really works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import memplan
from memplan.plans.plan import Plan
from memplan.plans.serialize import plan_schema

DOC = Path(__file__).resolve().parents[2] / "docs" / "plan-format.md"
ENUM_KEYS = ("role", "kind", "status", "tier", "mode")


def schema_names(node: Any) -> set[str]:
    """Every property name (and required field name) anywhere in the schema, nested ones included."""
    names: set[str] = set()
    if isinstance(node, dict):
        names |= set(node.get("properties", {}))
        names |= {r for r in node.get("required", []) if isinstance(r, str)}
        for v in node.values():
            names |= schema_names(v)
    elif isinstance(node, list):
        for v in node:
            names |= schema_names(v)
    return names


def enum_values(schema: dict[str, Any]) -> set[str]:
    """The closed sets a reader must know: roles, event kinds, solver statuses, tiers, modes."""
    defs, props = schema["$defs"], schema["properties"]
    sets = [
        props["tensors"]["items"]["properties"]["role"]["enum"],
        props["events"]["items"]["properties"]["kind"]["enum"],
        defs["solver"]["properties"]["status"]["enum"],
        defs["tier"]["enum"],
        props["workload"]["properties"]["mode"]["enum"],
    ]
    return {v for s in sets for v in s}


def missing(names: set[str], doc: str) -> list[str]:
    """The names that do not appear in the doc as inline code (`name`)."""
    return sorted(n for n in names if f"`{n}`" not in doc)


def python_block(doc: str, heading: str) -> str:
    section = doc.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_walk_finds_nested_properties() -> None:
    names = schema_names(plan_schema())
    assert {"schema_version", "alias_of", "cost_known", "time_limit_s", "arena_bytes", "dst_tier"} <= names
    assert {"device_kind", "mem_bw", "tiers"} <= names  # hardware: required fields only in the schema
    assert len(names) > 60


def test_every_schema_property_is_documented() -> None:
    assert missing(schema_names(plan_schema()), DOC.read_text()) == []


def test_every_role_kind_status_and_tier_is_documented() -> None:
    assert missing(enum_values(plan_schema()), DOC.read_text()) == []


def test_a_missing_property_is_caught() -> None:
    doc = DOC.read_text().replace("`cost_known`", "cost known")
    assert missing(schema_names(plan_schema()), doc) == ["cost_known"]


def test_example_is_a_plan_excerpt() -> None:
    match = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert match, "no json example"
    example = json.loads(match.group(1))
    assert set(example) == set(plan_schema()["required"])
    assert example["schema_version"] == plan_schema()["properties"]["schema_version"]["const"]


@pytest.fixture(scope="module")
def plan() -> Plan:
    return memplan.plan("zoo:gpt2-tiny", mode="infer", budget="1GiB")


def test_reader_without_memplan(plan: Plan, tmp_path: Path) -> None:
    code = python_block(DOC.read_text(), "## Reading a plan without memplan")
    assert "memplan" not in code and len(code.strip().splitlines()) <= 20
    script, path = tmp_path / "peak.py", tmp_path / "plan.json"
    script.write_text(code)
    plan.save(str(path))
    out = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.splitlines()
    step = plan.predictions.peak_step["device"]
    assert out[0] == (
        f"device peak {plan.predictions.peak_bytes['device']} bytes at step {step} ({plan.ops[step].name})"
    )
    assert len(out) == 11
    by_name = {v.name: v for v in plan.tensors}
    sizes = [int(line.split()[0]) for line in out[1:]]
    assert sizes == sorted(sizes, reverse=True)
    for line, size in zip(out[1:], sizes, strict=True):
        assert by_name[line.split()[-1]].size_bytes == size
