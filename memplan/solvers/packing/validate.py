"""Independent checker of a packing: every buffer placed, aligned, inside the capacity, no two overlapping.

After MiniMalloc's `validator`: it trusts nothing from the solver and reports the first failure of each
kind precisely. Overlap is checked with a sweep over time: at each lifespan start, the new buffer's byte
range is compared with the ranges of the buffers live at that moment (O(n log n + pairs live together)).
Zero-size buffers hold no bytes and overlap nothing.

Exactness: the first clash in time order is always found, because until then the live ranges are disjoint
and sorted, so the scan around the insertion point sees every neighbour that intersects. A packing is
reported valid only if it is; after a first clash, further pairs may go unreported.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import Enum

from memplan.solvers.packing.problem import Problem


class Failure(str, Enum):  # noqa: UP042
    MISSING = "missing"
    """The packing has no offset for some buffer (or one too many)."""
    ALIGNMENT = "alignment"
    """An offset is not a multiple of the buffer's alignment."""
    OUT_OF_BOUNDS = "out-of-bounds"
    """A buffer starts below 0 or ends above the capacity."""
    OVERLAP = "overlap"
    """Two buffers live at the same time share bytes."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One failure: its kind, the buffer ids involved and a sentence saying what is wrong."""

    kind: Failure
    buffers: tuple[str, ...]
    message: str


def validate(problem: Problem, offsets: tuple[int, ...] | list[int] | None) -> list[Violation]:
    """All violations of `offsets` for `problem` (empty when the packing is valid)."""
    n = len(problem.buffers)
    if offsets is None or len(offsets) != n:
        got = "none" if offsets is None else str(len(offsets))
        return [Violation(Failure.MISSING, (), f"expected {n} offsets, got {got}")]
    out: list[Violation] = []
    for i, (b, o) in enumerate(zip(problem.buffers, offsets, strict=True)):
        align = problem.alignment_of(i)
        if o % align:
            out.append(
                Violation(
                    Failure.ALIGNMENT, (b.id,), f"buffer {b.id}: offset {o} is not a multiple of {align}"
                )
            )
        cap = problem.capacity_bytes
        if o < 0 or (cap is not None and o + b.size_bytes > cap):
            out.append(
                Violation(
                    Failure.OUT_OF_BOUNDS,
                    (b.id,),
                    f"buffer {b.id}: bytes [{o}, {o + b.size_bytes}) outside [0, {cap})",
                )
            )
    return out + _overlaps(problem, list(offsets))


def _overlaps(problem: Problem, offsets: list[int]) -> list[Violation]:
    """Overlapping pairs, found by sweeping lifespan starts and ends in time order (ends first at a tie)."""
    events: list[tuple[int, int, int]] = []
    for i, b in enumerate(problem.buffers):
        if b.size_bytes == 0:
            continue
        for lo, hi in b.lifespans:
            events.append((lo, 1, i))
            events.append((hi, 0, i))
    events.sort()
    live: list[tuple[int, int]] = []  # (offset, buffer index), sorted by offset
    out: list[Violation] = []
    for _, is_start, i in events:
        key = (offsets[i], i)
        if not is_start:
            live.pop(bisect.bisect_left(live, key))
            continue
        pos = bisect.bisect_left(live, key)
        for j in _clashes(problem, offsets, live, pos, i):
            a, c = problem.buffers[i], problem.buffers[j]
            out.append(
                Violation(
                    Failure.OVERLAP,
                    (c.id, a.id),
                    f"buffers {c.id} [{offsets[j]}, {offsets[j] + c.size_bytes}) and "
                    f"{a.id} [{offsets[i]}, {offsets[i] + a.size_bytes}) are live together "
                    "and overlap",
                )
            )
        live.insert(pos, key)
    return out


def _clashes(
    problem: Problem, offsets: list[int], live: list[tuple[int, int]], pos: int, i: int
) -> list[int]:
    """Live buffers whose byte ranges intersect buffer i's, given i's insertion position `pos`."""
    lo, hi = offsets[i], offsets[i] + problem.buffers[i].size_bytes
    hits = []
    k = pos
    while k < len(live) and live[k][0] < hi:
        hits.append(live[k][1])
        k += 1
    k = pos - 1
    while k >= 0:  # buffers starting below may reach into [lo, hi); in a clean live set, tops are sorted
        j = live[k][1]
        if offsets[j] + problem.buffers[j].size_bytes <= lo:
            break
        hits.append(j)
        k -= 1
    return hits
