"""The `memplan` command line: every subcommand once, and the exit codes of its error paths."""

import json

import pytest

from memplan.planner.cli import main


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "plan.json"
    rc = main(
        [
            "plan",
            "zoo:gpt2-tiny",
            "--mode",
            "train",
            "--budget",
            "64MiB",
            "--batch",
            "2",
            "--seq",
            "16",
            "-o",
            str(path),
        ]
    )
    assert rc == 0
    return path


def test_plan_verify_show_export_run(plan_file, tmp_path, capsys):
    assert json.loads(plan_file.read_text())["workload"]["mode"] == "train"
    assert main(["verify", str(plan_file)]) == 0
    assert "passes every check" in capsys.readouterr().out
    png = tmp_path / "t.png"
    assert main(["show", str(plan_file), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = tmp_path / "trace.json"
    assert main(["export", str(plan_file), "--to", "chrome-trace", "-o", str(trace)]) == 0
    assert "traceEvents" in json.loads(trace.read_text())
    assert main(["run", str(plan_file)]) == 0
    assert "within the budget" in capsys.readouterr().out


def test_verify_fails_on_a_broken_plan(plan_file, tmp_path, capsys):
    d = json.loads(plan_file.read_text())
    d["budget_bytes"]["device"] = 1024
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    assert main(["verify", str(bad)]) == 1
    assert "over-capacity" in capsys.readouterr().out


def test_infeasible_exit_code(tmp_path, capsys):
    rc = main(
        ["plan", "zoo:gpt2-tiny", "--mode", "infer", "--budget", "1KiB", "-o", str(tmp_path / "p.json")]
    )
    assert rc == 3
    assert "infeasible" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "zoo:gpt2-tiny", "--budget", "12XB"], "cannot read size"),
        (["plan", "zoo:nope"], "unknown zoo model"),
        (["show", "/nonexistent/plan.json"], "no plan file"),
        (["verify", "/nonexistent/plan.json"], "no plan file"),
        (["plan", "zoo:gpt2-tiny", "--budget", "cxl=1GiB"], "budget for tier 'cxl', which cpu lacks"),
        (["plan", "zoo:gpt2-tiny", "--budget", "1GiB", "--budget", "device=2GiB"], "--budget given twice"),
        (["plan", "zoo:gpt2-tiny", "--budget", "ssd=0"], "the ssd budget must be a positive size"),
        (["plan", "zoo:gpt2-tiny", "--passes", "remat_swap,kv_budgets"], "unknown pass 'kv_budgets'"),
    ],
)
def test_user_errors_exit_2_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_export_format(plan_file, tmp_path, capsys):
    assert main(["export", str(plan_file), "--to", "pdf", "-o", str(tmp_path / "x")]) == 2
    assert "unknown export format" in capsys.readouterr().err


def test_zoo_lists_models(capsys):
    assert main(["zoo"]) == 0
    assert "zoo:llama2-70b" in capsys.readouterr().out


def test_run_inside_the_arena(tmp_path, capsys):
    path = tmp_path / "infer.json"
    assert (
        main(["plan", "zoo:gpt2-tiny", "--mode", "infer", "--batch", "2", "--seq", "16", "-o", str(path)])
        == 0
    )
    assert main(["run", str(path), "--arena"]) == 0
    assert "arena run OK" in capsys.readouterr().out


def test_budgets_per_tier(tmp_path, capsys):
    path = tmp_path / "tiers.json"
    argv = ["plan", "zoo:gpt2-tiny", "--mode", "train", "--batch", "2", "--seq", "16", "-o", str(path)]
    assert main([*argv, "--budget", "64MiB", "--budget", "ssd=1GiB"]) == 0
    budgets = json.loads(path.read_text())["budget_bytes"]
    assert budgets == {"device": 64 * 2**20, "ssd": 2**30}
    assert "device peak" in capsys.readouterr().err
    assert main([*argv, "--budget", "64MiB", "--passes", "allocate"]) == 0
    assert [p["name"] for p in json.loads(path.read_text())["passes"]] == ["baseline", "allocate"]
