"""bench/bitwidth_hawq.py's conversion on three HAWQ-V3 cases, solved in-process: the limit is the golden
file's, and memplan's objective is at most the published one (equal to the verified unique optimum)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.bitwidth_hawq import case_problem, load, published_objective, verdict
from memplan.planner.bits_file import problem_from_dict
from memplan.solvers.multiple_choice import solve_multiple_choice

DATA = load(Path(__file__).resolve().parents[1] / "data" / "hawq_v3" / "hawq_v3_ilp.json")


def case(model: str, kind: str, fraction: float) -> dict[str, Any]:
    return next(c for c in DATA["cases"] if (c["model"], c["constraint_kind"], c["limit_fraction"]) == (
        model, kind, fraction))


@pytest.mark.parametrize(
    ("model", "kind", "fraction"),
    [
        ("resnet18", "bops", 0.5),
        ("resnet50", "latency", 0.75),
        ("resnet50", "model_size", 0.25),  # the published bits leave a layer at 4 bits that fits at 8
    ],
)
def test_case_equals_or_beats_published(model: str, kind: str, fraction: float) -> None:
    c = case(model, kind, fraction)
    doc = case_problem(DATA, c)
    (limit,) = doc["limits"].values()
    assert math.isclose(limit, c["verified"]["limit_value"], rel_tol=1e-12)
    published = published_objective(DATA, c)
    assert math.isclose(published, c["verified"]["published_objective"], rel_tol=1e-12)
    sol = solve_multiple_choice(problem_from_dict(doc, f"{model} {kind} {fraction}"), 10.0)
    assert sol.status == "optimal" and sol.objective is not None and sol.formats is not None
    assert sol.objective <= published + 1e-12 * abs(published)
    assert math.isclose(sol.objective, c["verified"]["optimal_objective"], rel_tol=1e-12)
    assert [4 if f == "int4" else 8 for f in sol.formats] == c["verified"]["optimal_bits"]
    assert verdict(sol.objective, published) == ("better" if c["verified"]["differing_layers"] else "equal")
