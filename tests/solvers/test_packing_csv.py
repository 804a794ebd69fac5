"""MiniMalloc CSV: round trip, and every error path with its line number."""

from __future__ import annotations

from pathlib import Path

import pytest

from memplan.errors import InvalidInput
from memplan.solvers.packing import Problem, make_buffer
from memplan.solvers.packing.csv_format import parse, read, render

GOOD = "id,lower,upper,size\nb0,0,10,4096\nb1,5,15,1024\n"


def test_parse_reads_buffers_and_no_offsets() -> None:
    problem, offsets = parse(GOOD, capacity_bytes=8192)
    assert offsets is None
    assert problem.capacity_bytes == 8192
    assert [(b.id, b.lifespans, b.size_bytes) for b in problem.buffers] == [
        ("b0", ((0, 10),), 4096), ("b1", ((5, 15),), 1024)]


def test_round_trip_with_offsets_and_alignment() -> None:
    problem = Problem((make_buffer("a", [(0, 3)], 10, 8), make_buffer("b", [(1, 4)], 7)))
    text = render(problem, [0, 16])
    assert text.splitlines()[0] == "id,lower,upper,size,alignment,offset"
    again, offsets = parse(text)
    assert again.buffers == problem.buffers
    assert offsets == [0, 16]


def test_columns_in_any_order_and_blank_lines() -> None:
    problem, offsets = parse("size,offset,upper,lower,id\n\n8,0,2,1,x\n")
    assert problem.buffers[0] == make_buffer("x", [(1, 2)], 8)
    assert offsets == [0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("id,lower,size\n", ":1: bad header .*missing upper"),
        ("id,lower,upper,size,colour\n", ":1: bad header .*unknown colour"),
        ("id,lower,upper,size\nb0,0,10\n", ":2: expected 4 fields"),
        ("id,lower,upper,size\nb0,0,10,4\nb1,0,x,4\n", ":3: upper 'x' is not an integer"),
        ("id,lower,upper,size\nb0,0,10,-4\n", ":2: buffer 'b0' has negative size -4"),
        ("id,lower,upper,size\nb0,10,10,4\n", r":2: buffer 'b0' has an empty lifespan \[10, 10\)"),
        ("id,lower,upper,size\nb0,0,1,4\nb0,2,3,4\n", ":3: duplicate id 'b0'"),
        ("id,lower,upper,size,alignment\nb0,0,1,4,0\n", ":2: buffer 'b0' has alignment 0"),
        ("id,lower,upper,size\n,0,1,4\n", ":2: empty id"),
    ],
)
def test_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse(text, "p.csv")


def test_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        read(tmp_path / "nope.csv")


def test_render_refuses_several_lifespans() -> None:
    problem = Problem((make_buffer("a", [(0, 1), (2, 3)], 4),))
    with pytest.raises(InvalidInput, match="2 lifespans"):
        render(problem)
