"""The problem and solution files of `memplan bits`: JSON in, the solver's dataclasses out, and back.

A problem names each layer's choices (a storage format, its cost and the resources it takes), ties (layer
indices that must pick the same format) and optional limits on the summed resources:

    {"layers": [{"name": "conv1", "choices": [{"format": "int4", "cost": 0.0, "size": 0.5},
                                              {"format": "int8", "cost": -0.46, "size": 1.0}]}, ...],
     "ties": [[4, 6]],
     "limits": {"size": 7.98}}

A choice's size, bops and latency default to 0, `ties` to none and each limit to no limit. The structure is
checked with a JSON Schema; what a schema cannot say (a tie index out of range, tied layers without a format
in common, repeated format names) by `memplan.solvers.multiple_choice.check_problem`. Every failure is one
`InvalidInput` naming the file and where in it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema

from memplan.errors import InvalidInput
from memplan.solvers.multiple_choice import (
    RESOURCES,
    Choice,
    ChoiceProblem,
    ChoiceSolution,
    Layer,
    Usage,
    check_problem,
)

_AMOUNT = {"type": "number", "minimum": 0}
_CHOICE = {
    "type": "object",
    "required": ["format", "cost"],
    "additionalProperties": False,
    "properties": {"format": {"type": "string", "minLength": 1}, "cost": {"type": "number"}}
    | {r: _AMOUNT for r in RESOURCES},
}
PROBLEM_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["layers"],
    "additionalProperties": False,
    "properties": {
        "layers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "choices"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "choices": {"type": "array", "minItems": 1, "items": _CHOICE},
                },
            },
        },
        "ties": {
            "type": "array",
            "items": {
                "type": "array",
                "minItems": 2,
                "maxItems": 2,
                "items": {"type": "integer", "minimum": 0},
            },
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {r: _AMOUNT for r in RESOURCES},
        },
    },
}


def read_problem(path: str | Path) -> ChoiceProblem:
    """The problem in the JSON file at `path` (InvalidInput if it cannot be read or is malformed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{path}: cannot read the problem file ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    return problem_from_dict(data, source=str(path))


def problem_from_dict(data: Any, source: str = "problem") -> ChoiceProblem:
    """Validate a problem document and build the solver's `ChoiceProblem`; errors name `source`."""
    _check_schema(data, source)
    layers = tuple(Layer(layer["name"], tuple(map(_choice, layer["choices"]))) for layer in data["layers"])
    limits = data.get("limits", {})
    problem = ChoiceProblem(
        layers,
        tuple((int(a), int(b)) for a, b in data.get("ties", [])),
        Usage(*(None if limits.get(r) is None else _number(limits[r]) for r in RESOURCES)),
    )
    try:
        check_problem(problem)
    except InvalidInput as e:
        raise InvalidInput(f"{source}: {e}") from e
    return problem


def _check_schema(data: Any, source: str) -> None:
    """InvalidInput with the most relevant schema violation, and where it is (a JSON path)."""
    errors = jsonschema.Draft202012Validator(PROBLEM_SCHEMA).iter_errors(data)
    error = jsonschema.exceptions.best_match(errors)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise InvalidInput(f"{source}: invalid at {where}: {error.message}")


def _choice(doc: dict[str, Any]) -> Choice:
    return Choice(doc["format"], **{k: _number(v) for k, v in doc.items() if k != "format"})


def _number(value: float | int) -> float:
    """A JSON number as a float (integers too large for a float are refused by `check_problem` as inf)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def solution_to_dict(problem: ChoiceProblem, sol: ChoiceSolution) -> dict[str, Any]:
    """The solution document: status, objective, bound, gap, the format of each layer, usage and time."""
    return {
        "status": sol.status,
        "objective": sol.objective,
        "bound": sol.bound,
        "gap": sol.gap,
        "choice": None if sol.formats is None else list(sol.formats),
        "layers": [layer.name for layer in problem.layers],
        "usage": None if sol.usage is None else {r: getattr(sol.usage, r) for r in RESOURCES},
        "time_s": round(sol.time_s, 6),
    }
