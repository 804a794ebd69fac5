"""The independent checker reports each failure kind precisely, and the data model rejects bad buffers."""

from __future__ import annotations

import pytest

from memplan.errors import InvalidInput
from memplan.solvers.packing import Failure, Problem, make_buffer, validate

PROBLEM = Problem(
    (make_buffer("a", [(0, 4)], 8), make_buffer("b", [(2, 6)], 8), make_buffer("c", [(4, 8)], 8)),
    capacity_bytes=16, alignment_bytes=4,
)


def kinds(offsets: list[int] | None) -> list[Failure]:
    return [v.kind for v in validate(PROBLEM, offsets)]


def test_valid_packing_has_no_violation() -> None:
    assert validate(PROBLEM, [0, 8, 0]) == []  # c reuses a's bytes: a ends when c starts


@pytest.mark.parametrize(
    ("offsets", "expected"),
    [
        (None, [Failure.MISSING]),
        ([0, 8], [Failure.MISSING]),
        ([0, 6, 0], [Failure.ALIGNMENT, Failure.OVERLAP, Failure.OVERLAP]),
        ([0, 12, 0], [Failure.OUT_OF_BOUNDS]),
        ([-4, 8, 0], [Failure.OUT_OF_BOUNDS]),
        ([0, 4, 0], [Failure.OVERLAP, Failure.OVERLAP]),
        ([0, 0, 8], [Failure.OVERLAP]),
    ],
)
def test_each_failure_kind(offsets: list[int] | None, expected: list[Failure]) -> None:
    assert kinds(offsets) == expected


def test_overlap_names_both_buffers() -> None:
    (v,) = validate(PROBLEM, [0, 0, 8])
    assert set(v.buffers) == {"a", "b"} and "overlap" in v.message and "[0, 8)" in v.message


def test_several_lifespans_and_zero_size() -> None:
    p = Problem(
        (make_buffer("x", [(0, 2), (6, 8)], 8), make_buffer("y", [(2, 6)], 8), make_buffer("z", [(0, 8)], 0))
    )
    assert validate(p, [0, 0, 0]) == []  # y lives in x's gap; z holds no bytes
    w = Problem((*p.buffers, make_buffer("w", [(7, 9)], 8)))
    (v,) = validate(w, [0, 0, 0, 4])  # w meets x's second lifespan
    assert v.kind is Failure.OVERLAP and set(v.buffers) == {"x", "w"}


@pytest.mark.parametrize(
    ("spans", "size", "align", "message"),
    [
        ([(3, 3)], 4, 1, "empty"),
        ([(0, 4), (2, 6)], 4, 1, "overlap"),
        ([(0, 1)], -1, 1, "negative"),
        ([(0, 1)], 4, 0, "alignment"),
        ([], 4, 1, "no lifespan"),
    ],
)
def test_make_buffer_rejects(spans: list[tuple[int, int]], size: int, align: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        make_buffer("q", spans, size, align)


def test_make_buffer_merges_touching_lifespans() -> None:
    assert make_buffer("q", [(4, 6), (0, 4)], 1).lifespans == ((0, 6),)
