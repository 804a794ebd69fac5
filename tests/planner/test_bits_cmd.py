"""`memplan bits`: end to end through `memplan.planner.cli.main`, its exit codes, and one clear message for
each way a problem file can be wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.planner.cli import build_parser, main
from memplan.solvers import multiple_choice
from memplan.solvers.multiple_choice import ChoiceSolution, Usage


def two_bit(gains: list[float]) -> list[dict[str, Any]]:
    """Layers of size 1 at int4 (cost 0) and 2 at int8 (cost -gain), with BOPs and latency to match."""
    return [
        {"name": f"l{i}", "choices": [
            {"format": "int4", "cost": 0, "size": 1, "bops": 1, "latency": 1},
            {"format": "int8", "cost": -g, "size": 2, "bops": 4, "latency": 1.5},
        ]}
        for i, g in enumerate(gains)
    ]


PROBLEM: dict[str, Any] = {"layers": two_bit([1.0, 2.5, 2.0]), "ties": [[0, 2]], "limits": {"size": 4.5}}


def write(tmp_path: Path, doc: Any, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def err_of(capsys: pytest.CaptureFixture[str]) -> str:
    """Captured stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_writes_the_solution_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deeper" / "solution.json"
    assert main(["bits", str(write(tmp_path, PROBLEM)), "-o", str(out), "--time-limit", "5"]) == 0
    sol = json.loads(out.read_text())
    assert sol["status"] == "optimal" and sol["choice"] == ["int4", "int8", "int4"]
    assert sol["objective"] == sol["bound"] == -2.5 and sol["gap"] == 0.0
    assert sol["usage"] == {"size": 4.0, "bops": 6.0, "latency": 3.5} and sol["layers"] == ["l0", "l1", "l2"]
    assert 0 <= sol["time_s"] < 5
    assert [p.name for p in out.parent.iterdir()] == ["solution.json"]  # no temporary file left
    assert "optimal: 3 layers, objective -2.5" in err_of(capsys)


def test_stdout_and_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No -o: the JSON on stdout; no ties, no limits, and choices without resources are fine."""
    doc = {"layers": [{"name": "a", "choices": [{"format": "x", "cost": 2}, {"format": "y", "cost": 1}]}]}
    assert main(["bits", str(write(tmp_path, doc))]) == 0
    sol = json.loads(capsys.readouterr().out)
    assert sol["choice"] == ["y"] and sol["usage"] == {"size": 0.0, "bops": 0.0, "latency": 0.0}


def test_infeasible_limit_exits_3_with_the_minimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.json"
    doc = PROBLEM | {"limits": {"size": 2.5, "bops": 100}}
    assert main(["bits", str(write(tmp_path, doc)), "-o", str(out)]) == 3
    assert "infeasible: limits.size = 2.5 is below 3.0, the least size any choice reaches" in err_of(capsys)
    assert not out.exists()


def test_limits_infeasible_together_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layers = [{"name": "a", "choices": [{"format": "int4", "cost": 0, "size": 1, "latency": 2},
                                        {"format": "int8", "cost": 0, "size": 2, "latency": 1}]}]
    assert main(["bits", str(write(tmp_path, {"layers": layers, "limits": {"size": 1, "latency": 1}}))]) == 3
    assert "no choice meets all the limits together" in err_of(capsys)


def test_nothing_found_in_time_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sol = ChoiceSolution("timeout", None, None, None, None, None, None, Usage(0, 0, 0), 0.5, 0.5)
    monkeypatch.setattr(multiple_choice, "solve_multiple_choice", lambda problem, limit: sol)
    assert main(["bits", str(write(tmp_path, PROBLEM)), "--time-limit", "0.5"]) == 4
    assert "no choice found in 0.5 s for 3 layers; raise --time-limit" in err_of(capsys)


def test_listed_in_help() -> None:
    assert "bits" in build_parser().format_help()


def layers_with(**choice: Any) -> dict[str, Any]:
    base = {"format": "int4", "cost": 0.0, "size": 1.0}
    return {"layers": [{"name": "a", "choices": [base, base | {"format": "int8"} | choice]}]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{ not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column"),
        ([], "invalid at (top level): [] is not of type 'object'"),
        ({"limits": {}}, "invalid at (top level): 'layers' is a required property"),
        ({"layers": []}, "invalid at layers: [] should be non-empty"),
        ({"layers": [{"name": "a", "choices": []}]}, "invalid at layers/0/choices: [] should be non-empty"),
        ({"layers": [{"name": "a"}]}, "invalid at layers/0: 'choices' is a required property"),
        ({"layers": [{"name": "a", "choices": [{"format": "int4"}]}]},
         "invalid at layers/0/choices/0: 'cost' is a required property"),
        (layers_with(cost="low"), "invalid at layers/0/choices/1/cost: 'low' is not of type 'number'"),
        (layers_with(cost=True), "invalid at layers/0/choices/1/cost: True is not of type 'number'"),
        (layers_with(size=-2), "invalid at layers/0/choices/1/size: -2 is less than the minimum of 0"),
        (layers_with(sise=2), "Additional properties are not allowed ('sise' was unexpected)"),
        (layers_with(format="int4"), "layers[0] ('a'): format names repeat (['int4', 'int4'])"),
        (layers_with(cost=float("nan")), "layers[0] ('a').choices[1].cost = nan: must be a finite number"),
        (layers_with(latency=10**400), "layers[0] ('a').choices[1].latency = inf: must be a finite number >= 0"),  # noqa: E501
        (layers_with() | {"ties": [[0, 1]]}, "ties[0] = [0, 1]: a layer index is out of range (0..0)"),
        (layers_with() | {"ties": [[0]]}, "invalid at ties/0: [0] is too short"),
        (layers_with() | {"ties": [[0, -1]]}, "invalid at ties/0/1: -1 is less than the minimum of 0"),
        (layers_with() | {"limits": {"size": "1MiB"}}, "at limits/size: '1MiB' is not of type 'number'"),
        (layers_with() | {"limits": {"memory": 1}}, "('memory' was unexpected)"),
        ({"layers": [{"name": "a", "choices": [{"format": "int4", "cost": 0}]},
                     {"name": "b", "choices": [{"format": "int8", "cost": 0}]}], "ties": [[0, 1]]},
         "tied layers 0 ('a'), 1 ('b') have no format in common"),
    ],
)
def test_malformed_file_exits_2_with_one_message(
    doc: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, doc)
    assert main(["bits", str(path)]) == 2
    err = err_of(capsys)
    assert err.startswith(f"error: {path}: ") and message in err, err
    assert "Traceback" not in err and err.count("error:") == 1


def test_missing_file_and_bad_time_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bits", str(tmp_path / "none.json")]) == 2
    assert "cannot read the problem file" in err_of(capsys)
    assert main(["bits", str(write(tmp_path, PROBLEM)), "--time-limit", "0"]) == 2
    assert "--time-limit 0.0: must be a positive number of seconds" in err_of(capsys)
