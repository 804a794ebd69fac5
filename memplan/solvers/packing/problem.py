"""Data model of static memory allocation (arena packing): `Buffer`, `Problem`, `Solution`.

Follows MiniMalloc's contract (Moffitt, "MiniMalloc: A Lightweight Memory Allocator for Hardware-Accelerated
Machine Learning", ASPLOS 2023): every buffer has a size and a lifespan over integer time steps, and needs
an offset in one arena so that buffers live at the same time never share a byte. Lifespans are half-open,
`[lower, upper)`. Unlike MiniMalloc a buffer may have several disjoint lifespans (a tensor swapped out and
back in keeps one offset for all of its residencies).

    offset ▲
           │        ┌──────┐
           │  ┌─────┤  b2  │      b1 and b2 overlap in time, so they are stacked;
           │  │ b1  ├──────┴─┐    b3 starts after b1 ends and may reuse its bytes.
           │  │     │   b3   │
           └──┴─────┴────────┴──► time
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from memplan.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Buffer:
    """One buffer: `size_bytes` bytes live on each half-open `[lower, upper)` of `lifespans`.

    Lifespans are sorted, non-empty and disjoint (touching ends are merged by `make_buffer`).
    `alignment_bytes` is the buffer's own alignment; its offset must be a multiple of it and of the
    problem's alignment.
    """

    id: str
    lifespans: tuple[tuple[int, int], ...]
    size_bytes: int
    alignment_bytes: int = 1

    @property
    def lower(self) -> int:
        """Start of the first lifespan."""
        return self.lifespans[0][0]

    @property
    def upper(self) -> int:
        """End of the last lifespan."""
        return self.lifespans[-1][1]

    @property
    def area(self) -> int:
        """Bytes times time steps: the buffer's share of the packing's area."""
        return self.size_bytes * sum(hi - lo for lo, hi in self.lifespans)


@dataclass(frozen=True, slots=True)
class Problem:
    """Buffers to place in one arena. `capacity_bytes=None` means: minimise the arena's height.

    `alignment_bytes` applies to every buffer (a tier's alignment); a buffer's effective alignment is the
    least common multiple of it and the buffer's own.
    """

    buffers: tuple[Buffer, ...]
    capacity_bytes: int | None = None
    alignment_bytes: int = 1

    def alignment_of(self, index: int) -> int:
        """Effective alignment of buffer `index`."""
        return math.lcm(self.alignment_bytes, self.buffers[index].alignment_bytes)


class Status(str, Enum):  # noqa: UP042
    """What a solver could establish about a problem."""

    OPTIMAL = "optimal"
    """A packing whose height equals a proven lower bound (or every lower height was proven infeasible)."""
    FEASIBLE = "feasible"
    """A packing within the capacity (or of the reported height), not proven optimal."""
    INFEASIBLE = "infeasible"
    """Proven: no packing fits the capacity."""
    TIMEOUT = "timeout-without-solution"
    """No packing within the capacity was found before the time limit, and none was proven impossible."""


@dataclass(frozen=True, slots=True)
class Solution:
    """A solver's answer. `offsets_bytes[i]` is the offset of `problem.buffers[i]`; None when no packing.

    `height_bytes` is the arena size the packing needs (max of offset + size); `lower_bound_bytes` is a
    proven lower bound on any packing's height (at least the max load); `solver` names the portfolio
    member that produced the packing.
    """

    offsets_bytes: tuple[int, ...] | None
    height_bytes: int | None
    status: Status
    lower_bound_bytes: int
    time_s: float
    solver: str = ""
    nodes: int = 0

    @property
    def gap(self) -> float | None:
        """Relative gap of the height to the lower bound (0.0 when optimal); None without a packing."""
        if self.height_bytes is None:
            return None
        if self.lower_bound_bytes == 0:
            return 0.0
        return (self.height_bytes - self.lower_bound_bytes) / self.lower_bound_bytes


def make_buffer(
    id: str,
    lifespans: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    size_bytes: int,
    alignment_bytes: int = 1,
) -> Buffer:
    """A checked `Buffer`: sorts and merges touching lifespans; rejects empty or overlapping ones.

    Raises `InvalidInput` naming the buffer when a lifespan is empty, lifespans overlap, the size is
    negative or the alignment is not positive.
    """
    if size_bytes < 0:
        raise InvalidInput(f"buffer {id!r}: size {size_bytes} is negative; sizes are bytes >= 0")
    if alignment_bytes < 1:
        raise InvalidInput(f"buffer {id!r}: alignment {alignment_bytes} must be a positive integer")
    spans = sorted((int(lo), int(hi)) for lo, hi in lifespans)
    if not spans:
        raise InvalidInput(f"buffer {id!r} has no lifespan")
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if hi <= lo:
            raise InvalidInput(f"buffer {id!r}: lifespan [{lo}, {hi}) is empty; need lower < upper")
        if merged and lo < merged[-1][1]:
            raise InvalidInput(f"buffer {id!r}: lifespans {merged[-1]} and {(lo, hi)} overlap")
        if merged and lo == merged[-1][1]:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return Buffer(str(id), tuple(merged), int(size_bytes), int(alignment_bytes))


def height_of(problem: Problem, offsets: tuple[int, ...] | list[int]) -> int:
    """Arena height of a packing: the highest byte any buffer reaches (0 for no buffers)."""
    return max((o + b.size_bytes for o, b in zip(offsets, problem.buffers, strict=True)), default=0)
