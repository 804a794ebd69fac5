"""`memplan alloc`: solve, write, validate, and every user error, through a fresh argparse parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from memplan.errors import InvalidInput
from memplan.planner.commands import alloc
from memplan.solvers.packing.csv_format import read

DATA = Path(__file__).resolve().parents[1] / "data" / "minimalloc"
SMALL = "id,lower,upper,size\na,5,6,4\nb,3,6,3\nc,0,1,4\nd,1,4,2\ne,0,4,3\n"  # optimum 8, greedy 10


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    alloc.register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["alloc", *argv])
    return int(args.func(args))


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "p.csv"
    path.write_text(SMALL)
    return path


def test_solves_and_writes_offsets(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert run([str(small), "-o", str(out), "--timeout", "5"]) == 0
    problem, offsets = read(out)
    assert offsets is not None and len(offsets) == 5
    assert max(o + b.size_bytes for o, b in zip(offsets, problem.buffers, strict=True)) == 8
    assert run([str(out), "--validate"]) == 0


def test_capacity_with_units_and_stdout(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([str(small), "--capacity", "8B"]) == 0
    assert capsys.readouterr().out.startswith("id,lower,upper,size,offset\n")


def test_infeasible_capacity_exit_code(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([str(small), "--capacity", "7"]) == alloc.EXIT_INFEASIBLE
    assert "infeasible" in capsys.readouterr().err


def test_no_packing_in_time_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run([str(DATA / "J.1048576.csv"), "--capacity", "1048576", "--timeout", "0.05"]) == alloc.EXIT_TIMEOUT
    )
    assert "no packing found in 0.05 s" in capsys.readouterr().err


def test_validate_reports_overlap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,lower,upper,size,offset\na,0,2,4,0\nb,1,3,4,2\n")
    assert run([str(bad), "--validate"]) == alloc.EXIT_INVALID
    assert "overlap" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--capacity", "lots"], "cannot read size"),
        (["--capacity", "0"], "must be a positive number"),
        (["--timeout", "0"], "--timeout 0"),
        (["--validate"], "needs an offset column"),
    ],
)
def test_user_errors(small: Path, argv: list[str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        run([str(small), *argv])


def test_malformed_row_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,lower,upper,size\na,0,2,4\nb,3,3,4\n")
    with pytest.raises(InvalidInput, match=r"bad.csv:3: .*empty lifespan"):
        run([str(bad)])
