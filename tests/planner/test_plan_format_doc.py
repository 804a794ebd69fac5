"""docs/plan-format.md documents every field of plan.schema.json, and its examples are valid plan JSON. (Its
no-memplan readers are run on real plans by tests/plans/test_foreign_reader.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema

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


def json_blocks(doc: str) -> list[Any]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, re.S)]


def test_example_is_a_plan_excerpt() -> None:
    """The first json block is a whole plan with some array items left out: every field, schema-valid."""
    blocks = json_blocks(DOC.read_text())
    assert blocks, "no json example"
    example, schema = blocks[0], plan_schema()
    assert set(example) == set(schema["required"])
    assert example["schema_version"] == schema["properties"]["schema_version"]["const"]
    jsonschema.validate(example, schema)


def test_remat_example_is_a_remat_record() -> None:
    schema = plan_schema()
    remat = json_blocks(DOC.read_text())[1]
    jsonschema.validate(remat, {"$defs": schema["$defs"], "$ref": "#/$defs/remat"})
    assert {t["decision"] for t in remat["tensors"]} == {"swap", "recompute", "split"}


def test_bits_example_is_a_bits_record() -> None:
    schema = plan_schema()
    bits = json_blocks(DOC.read_text())[2]
    jsonschema.validate(bits, {"$defs": schema["$defs"], "$ref": "#/$defs/bits"})
    chosen = bits["tensors"][0]
    assert chosen in [c["bits"] for c in bits["candidates"][0]["candidates"]]
