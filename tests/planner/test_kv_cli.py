"""`memplan plan --kv-budget ...` and `memplan export --to prefixkv|kvpress`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.planner.cli import main
from memplan.plans.serialize import load_plan

PLAN = ["plan", "zoo:gpt2-tiny", "--mode", "infer", "--batch", "2", "--prompt", "16", "--gen", "6"]


@pytest.fixture(scope="module")
def uniform_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kv") / "plan.json"
    assert main([*PLAN, "--kv-budget", "50%", "--kv-method", "uniform", "--kv-sink", "2", "--kv-recent", "2",
                 "-o", str(out)]) == 0  # fmt: skip
    return out


def test_plan_writes_the_kv_decision(uniform_plan: Path) -> None:
    kv = load_plan(uniform_plan).decisions.kv
    assert kv is not None and kv.method == "uniform" and (kv.sink_tokens, kv.recent_tokens) == (2, 2)
    assert [b.tokens for b in kv.budgets] == [11, 11]  # half of the 22-token context, per layer


def test_export_prefixkv_and_kvpress(uniform_plan: Path, tmp_path: Path) -> None:
    assert main(["export", str(uniform_plan), "--to", "prefixkv", "-o", str(tmp_path / "p.json")]) == 0
    ratios = json.loads((tmp_path / "p.json").read_text())
    # 11 tokens at the end of 16 + 6: 5 of the prompt's 16 kept
    assert ratios == [pytest.approx(1 - 5 / 16)] * 2
    assert main(["export", str(uniform_plan), "--to", "kvpress", "-o", str(tmp_path / "k.json")]) == 0
    press = json.loads((tmp_path / "k.json").read_text())
    assert press["press"] == "PerLayerCompressionPress" and press["compression_ratios"] == ratios
    assert "PerLayerCompressionPress(SnapKVPress" in press["python"] and press["memplan_notes"]


def test_export_refuses_what_the_ratios_cannot_say(tmp_path: Path) -> None:
    plan = load_plan_without_kv(tmp_path)
    assert main(["export", str(plan), "--to", "prefixkv", "-o", str(tmp_path / "p.json")]) == 2
    assert not (tmp_path / "p.json").exists()


def load_plan_without_kv(tmp_path: Path) -> Path:
    out = tmp_path / "plain.json"
    assert main([*PLAN, "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kv-method", "uniform"], "--kv-budget"),
        (["--kv-budget", "20%", "--kv-bits", "full,5"], "KV bits 5"),
        (["--kv-budget", "20%", "--kv-bits", "x"], "--kv-bits"),
        (["--kv-budget", "lots"], "KV budget 'lots'"),
        (["--kv-budget", "1KiB", "--kv-method", "uniform"], "below the least"),
    ],
)
def test_bad_kv_flags_exit_2_or_3_with_a_message(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([*PLAN, *extra, "-o", str(tmp_path / "x.json")])
    assert code in (2, 3)
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "x.json").exists()


def test_run_a_kv_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    flags = ["--budget", "700KiB", "--kv-budget", "40%", "--kv-method", "uniform", "--kv-sink", "2"]
    assert main([*PLAN, *flags, "--kv-recent", "2", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "identical to the model as the plan changes it" in text and "KV cache: planned" in text
    assert "of the new tokens equal the float model's" in text
