"""Generation through the CLI: plan with --prompt/--gen, run (same tokens, measured vs predicted), export
an accelerate device map that accelerate itself accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.planner.cli import main
from memplan.zoo import catalog


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "plan.json"
    rc = main(["plan", "zoo:gpt2-tiny", "--mode", "infer", "--budget", "700KiB", "--batch", "2", "--prompt",
               "16", "--gen", "8", "-o", str(path)])  # fmt: skip
    assert rc == 0
    return path


def test_plan_and_run(plan_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = json.loads(plan_file.read_text())
    assert doc["workload"]["gen"] == 8 and doc["decisions"]["placement"]["tensors"]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def main():\n    return 0\n")
    assert main(["run", str(plan_file), "--prompt-file", str(prompt)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "identical to the plain model's" in out and "within the budget" in out and "decode" in out


def test_export_accelerate(plan_file: Path, tmp_path: Path) -> None:
    from accelerate.utils import check_device_map

    out = tmp_path / "device_map.json"
    assert main(["export", str(plan_file), "--to", "accelerate", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["device_map"].values()) == {"cpu", "disk"}
    assert doc["offload_folder"] and doc["max_memory"] == {"cpu": str(700 * 1024)}
    assert any("prefetch" in n for n in doc["memplan_notes"])
    model = catalog.get("gpt2-tiny").build(device="meta")
    check_device_map(model, doc["device_map"])  # accelerate accepts it: every parameter is mapped


def test_bad_generation_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "p.json")
    assert main(["plan", "zoo:gpt2-tiny", "--mode", "train", "--gen", "4", "-o", out]) == 2
    assert "gen (4) plans a generation" in " ".join(capsys.readouterr().err.split())
    assert main(["plan", "zoo:resnet50", "--mode", "infer", "--gen", "4", "-o", out]) == 2
    assert "not a language model" in " ".join(capsys.readouterr().err.split())
    rc = main(["plan", "zoo:gpt2-tiny", "--mode", "infer", "--budget", "64KiB", "--batch", "2", "--prompt",
               "16", "--gen", "8", "-o", out])  # fmt: skip
    assert rc == 3 and "least any placement needs" in " ".join(capsys.readouterr().err.split())
