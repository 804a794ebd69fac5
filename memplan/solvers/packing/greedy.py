"""Best-fit greedy packing under several buffer orderings, keeping the lowest (XLA / TFLite style).

Each ordering places buffers one at a time; a buffer goes into the smallest gap, among the buffers already
placed that overlap it in time, that holds it (best fit), or on top of them when no gap does. This is
TFLite's "greedy by size" and XLA's `GlobalDecreasingSizeBestFitHeap` when ordered by size; other
orderings (area, lifespan length, start time, section load) win on other shapes, so `best_greedy` runs
several and keeps the lowest packing.

    offset ▲   placed buffers overlapping b in time, sorted by offset:
           │   ████  top      ← b goes here if no gap fits
           │   ░░░░  gap 2    ← best fit: the smallest gap >= size(b)
           │   ████
           │   ░░░░  gap 1
           └── ████

Scale: overlapping buffers are found through an index of lifespans sorted by (length class, start), so a
query reads only lifespans that start within twice its class length before the query; each query is a
handful of numpy calls, about 50 µs, and 100,000 buffers take a few seconds per ordering.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memplan.solvers.packing.problem import Problem
from memplan.solvers.packing.sweep import Sweep, sweep

SQUEAKY_PATIENCE = 6
"""Rounds without a lower packing after which `squeaky` stops."""

ORDERINGS: tuple[str, ...] = ("load", "size", "area", "length", "start")
"""Names of the orderings `best_greedy` tries: largest section load crossed, size, area, lifespan length
(all descending, ties by size) and start time (ascending, ties by size descending)."""


@dataclass(frozen=True, slots=True)
class GreedyResult:
    """One greedy packing: offsets per buffer (problem order), its height and the ordering's name."""

    offsets_bytes: tuple[int, ...]
    height_bytes: int
    ordering: str


@dataclass(frozen=True, slots=True, eq=False)
class _Index:
    """Lifespan pieces (in section coordinates) sorted by (length class, start), for overlap queries."""

    key: np.ndarray  # class * stride + start, sorted
    lo: np.ndarray  # piece start section, in key order
    hi: np.ndarray  # piece end section (exclusive)
    owner: np.ndarray  # buffer index of each piece
    stride: int
    classes: np.ndarray  # distinct length classes present
    reach: np.ndarray  # 2 ** (class + 1): no piece of the class is that long


def _build_index(sw: Sweep) -> _Index:
    lo, hi, owner = sw.piece_lo, sw.piece_hi, sw.piece_owner
    cls = np.floor(np.log2(hi - lo)).astype(np.int64)
    stride = int(sw.n_sections) * 4 + 8
    key = cls * stride + lo
    order = np.argsort(key, kind="stable")
    classes = np.unique(cls)
    return _Index(key[order], lo[order], hi[order], owner[order], stride, classes, 2 ** (classes + 1))


def _overlapping(ix: _Index, lo: int, hi: int) -> np.ndarray:
    """Buffers (with repeats) owning a piece that overlaps sections `[lo, hi)`."""
    left = np.searchsorted(ix.key, ix.classes * ix.stride + (lo - ix.reach), side="right")
    right = np.searchsorted(ix.key, ix.classes * ix.stride + hi, side="left")
    counts = right - left
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.repeat(left - np.cumsum(counts) + counts, counts) + np.arange(total)
    hit = ix.hi[pos] > lo
    return ix.owner[pos[hit]]


def _best_gap(offs: np.ndarray, tops: np.ndarray, size: int, align: int) -> int:
    """Lowest offset of the smallest gap between occupied `[offs, tops)` that holds `size` bytes."""
    if len(offs) == 0:
        return 0
    order = np.argsort(offs, kind="stable")
    offs, tops = offs[order], tops[order]
    below = np.concatenate(([0], np.maximum.accumulate(tops)[:-1]))
    start = -(-below // align) * align
    room = offs - start
    fits = np.flatnonzero(room >= size)
    if len(fits) == 0:
        top = int(tops.max())
        return -(-top // align) * align
    k = fits[np.argmin(room[fits])]
    return int(start[k])


@dataclass(frozen=True, slots=True, eq=False)
class Placer:
    """What best fit needs of one problem, built once for many placements (`place_with`)."""

    problem: Problem
    sw: Sweep
    index: _Index
    piece_of: list[list[int]]
    sizes: np.ndarray


def placer(problem: Problem, sw: Sweep | None = None) -> Placer:
    """The overlap index and sizes of `problem`, for repeated best-fit placements."""
    sw = sw if sw is not None else sweep(problem)
    sizes = np.asarray([b.size_bytes for b in problem.buffers], dtype=np.int64)
    ix = _build_index(sw)
    return Placer(problem, sw, ix, _pieces_by_buffer(ix, len(problem.buffers)), sizes)


def place(problem: Problem, order: np.ndarray, sw: Sweep | None = None, ordering: str = "") -> GreedyResult:
    """Best-fit placement of the buffers of `problem` in `order` (buffer indices). Ignores the capacity.

    Invariant: when buffer b is placed, every placed buffer overlapping b in time lies wholly below or
    wholly above [offset(b), offset(b) + size(b)), so the packing never overlaps.
    """
    if not problem.buffers:
        return GreedyResult((), 0, ordering)
    return place_with(placer(problem, sw), order, ordering)


def place_with(pl: Placer, order: np.ndarray, ordering: str = "") -> GreedyResult:
    """`place` on a prebuilt `Placer`."""
    problem, ix, piece_of, sizes = pl.problem, pl.index, pl.piece_of, pl.sizes
    n = len(problem.buffers)
    offsets = np.zeros(n, dtype=np.int64)
    placed = np.zeros(n, dtype=bool)
    if n == 0:
        return GreedyResult((), 0, ordering)
    for i in order.tolist():
        if sizes[i] == 0:
            placed[i] = True
            continue
        others = np.concatenate([_overlapping(ix, int(ix.lo[p]), int(ix.hi[p])) for p in piece_of[i]])
        others = others[placed[others]]
        offsets[i] = _best_gap(
            offsets[others], offsets[others] + sizes[others], int(sizes[i]), problem.alignment_of(i)
        )
        placed[i] = True
    height = int((offsets + sizes).max())
    return GreedyResult(tuple(int(o) for o in offsets), height, ordering)


def _pieces_by_buffer(ix: _Index, n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for p, b in enumerate(ix.owner.tolist()):
        out[b].append(p)
    return out


def ordering(problem: Problem, name: str, sw: Sweep) -> np.ndarray:
    """Buffer indices in the named order (see `ORDERINGS`)."""
    size = np.asarray([b.size_bytes for b in problem.buffers], dtype=np.int64)
    keys: dict[str, Callable[[], tuple[np.ndarray, ...]]] = {
        "size": lambda: (-size,),
        "area": lambda: (-np.asarray([b.area for b in problem.buffers], dtype=np.int64), -size),
        "load": lambda: (-sw.peak_load(), -size),
        "length": lambda: (-(sw.events[sw.last] - sw.events[sw.first]), -size),
        "start": lambda: (sw.first, -size),
    }
    if name not in keys:
        raise ValueError(f"unknown greedy ordering {name!r}; known: {', '.join(ORDERINGS)}")
    return np.lexsort(tuple(reversed(keys[name]())))


def squeaky(
    pl: Placer, start: GreedyResult, order: np.ndarray, target: int, deadline: float
) -> GreedyResult:
    """Iterated best fit ("squeaky wheel"): the buffers that ended above `target` go first next time
    (in their previous relative order), until the packing reaches `target`, stops improving for a few
    rounds, or the next round would end after `deadline`. Returns the lowest packing seen."""
    best, res, stale = start, start, 0
    while res.height_bytes > target and stale < SQUEAKY_PATIENCE:
        t = time.perf_counter()
        tops = np.asarray(res.offsets_bytes, dtype=np.int64) + pl.sizes
        bad = tops[order] > target
        order = np.concatenate([order[bad], order[~bad]])
        res = place_with(pl, order, f"{start.ordering}+squeaky")
        stale = 0 if res.height_bytes < best.height_bytes else stale + 1
        best = res if res.height_bytes < best.height_bytes else best
        if time.perf_counter() + (time.perf_counter() - t) > deadline:
            break
    return best


def best_greedy(problem: Problem, orderings: tuple[str, ...] = ORDERINGS) -> GreedyResult:
    """Run best fit under each ordering and keep the lowest packing (ties: the earlier ordering)."""
    sw = sweep(problem)
    best: GreedyResult | None = None
    for name in orderings:
        res = place(problem, ordering(problem, name, sw), sw, name)
        if best is None or res.height_bytes < best.height_bytes:
            best = res
    if best is None:
        raise ValueError("best_greedy needs at least one ordering")
    return best
