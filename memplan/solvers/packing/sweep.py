"""Sweep-line analysis of a packing problem: sections, cross-section loads, the max-load bound, partitions.

After MiniMalloc's `sweeper` (Moffitt, ASPLOS 2023). The distinct lifespan endpoints cut time into
*sections*; a buffer covers the sections its lifespans span. Buffers sharing a section overlap in time.

    time ─►   t0     t1        t2     t3
    b0        ├──────┼─────────┤            section 0 = [t0, t1): {b0}
    b1               ├─────────┼──────┤     section 1 = [t1, t2): {b0, b1}
                                            section 2 = [t2, t3): {b1}

The *load* of a section is the total size of the buffers covering it; no packing can be lower than the
largest load (the max-load lower bound). A *partition* is a maximal group of buffers whose section ranges
chain together; different partitions share no time and are packed independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from memplan.solvers.packing.problem import Problem


@dataclass(frozen=True, eq=False)
class Sweep:
    """Sections of a problem. Each lifespan is a *piece*: sections `[piece_lo, piece_hi)` of buffer
    `piece_owner` (pieces in buffer order); `first[i]`/`last[i]` bound buffer i's sections (`last`
    exclusive); `load[s]` is the total size covering section s. `covers[i]`, the section indices buffer i
    covers, is built on first use (it is O(buffers x sections) on traces of long-lived buffers)."""

    events: np.ndarray
    piece_lo: np.ndarray
    piece_hi: np.ndarray
    piece_owner: np.ndarray
    first: np.ndarray
    last: np.ndarray
    load: np.ndarray

    @property
    def n_sections(self) -> int:
        return int(len(self.load))

    @cached_property
    def covers(self) -> tuple[np.ndarray, ...]:
        """Sections covered, per buffer (sorted, int64)."""
        out: list[list[np.ndarray]] = [[] for _ in range(len(self.first))]
        for lo, hi, b in zip(self.piece_lo.tolist(), self.piece_hi.tolist(), self.piece_owner.tolist()):
            out[b].append(np.arange(lo, hi, dtype=np.int64))
        return tuple(parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in out)

    @cached_property
    def _load_table(self) -> list[np.ndarray]:
        """Sparse table of `load`: level k holds the max over 2**k sections from each start."""
        levels = [self.load]
        while 2 ** len(levels) <= len(self.load):
            prev, w = levels[-1], 2 ** (len(levels) - 1)
            levels.append(np.maximum(prev[:-w], prev[w:]))
        return levels

    def peak_load(self) -> np.ndarray:
        """Per buffer, the largest load among its sections (O(1) range maxima over a sparse table)."""
        lo, hi = self.piece_lo, self.piece_hi
        if len(lo) == 0:
            return np.zeros(0, dtype=np.int64)
        k = np.floor(np.log2(hi - lo)).astype(np.int64)
        table = self._load_table
        piece = np.empty(len(lo), dtype=np.int64)
        for level in np.unique(k).tolist():
            m = k == level
            row, w = table[level], 2**level
            piece[m] = np.maximum(row[lo[m]], row[hi[m] - w])
        out = np.zeros(len(self.first), dtype=np.int64)
        np.maximum.at(out, self.piece_owner, piece)
        return out


def sweep(problem: Problem) -> Sweep:
    """Sections, pieces and loads of `problem` in O(n log n + sections)."""
    los = [lo for b in problem.buffers for lo, _ in b.lifespans]
    his = [hi for b in problem.buffers for _, hi in b.lifespans]
    owner = np.repeat(np.arange(len(problem.buffers)), [len(b.lifespans) for b in problem.buffers])
    size = np.asarray([b.size_bytes for b in problem.buffers], dtype=np.int64)
    events = np.unique(np.asarray(los + his, dtype=np.int64))
    lo_idx = np.searchsorted(events, np.asarray(los, dtype=np.int64)).astype(np.int64)
    hi_idx = np.searchsorted(events, np.asarray(his, dtype=np.int64)).astype(np.int64)
    n_sec = max(len(events) - 1, 0)
    diff = np.zeros(n_sec + 1, dtype=np.int64)
    np.add.at(diff, lo_idx, size[owner])
    np.add.at(diff, hi_idx, -size[owner])
    first = np.full(len(size), np.iinfo(np.int64).max, dtype=np.int64)
    last = np.zeros(len(size), dtype=np.int64)
    np.minimum.at(first, owner, lo_idx)
    np.maximum.at(last, owner, hi_idx)
    load = np.cumsum(diff[:-1]) if n_sec else np.zeros(0, dtype=np.int64)
    return Sweep(events, lo_idx, hi_idx, owner, first, last, load)


def max_load(problem: Problem) -> int:
    """The max-load lower bound: the largest total size of buffers live at one time (0 if none)."""
    if not problem.buffers:
        return 0
    load = sweep(problem).load
    return int(load.max()) if len(load) else 0


def lower_bound(problem: Problem, sw: Sweep | None = None) -> int:
    """The max-load bound, tightened by alignment: with every offset a multiple of A (the problem's
    alignment), a buffer with another one above it in a section uses its size rounded up to A, so a
    section needs the rounded sizes of its buffers minus the largest rounding slack among them."""
    sw = sw if sw is not None else sweep(problem)
    a = problem.alignment_bytes
    if not problem.buffers or sw.n_sections == 0:
        return 0
    if a == 1:
        return int(sw.load.max())
    size = np.asarray([b.size_bytes for b in problem.buffers], dtype=np.int64)
    rounded = -(-size // a) * a
    lo, hi, owner = sw.piece_lo, sw.piece_hi, sw.piece_owner
    diff = np.zeros(sw.n_sections + 1, dtype=np.int64)
    np.add.at(diff, lo, rounded[owner])
    np.add.at(diff, hi, -rounded[owner])
    need = np.cumsum(diff[:-1])
    return int((need - _range_max_paint(lo, hi, (rounded - size)[owner], sw.n_sections)).max())


def _range_max_paint(lo: np.ndarray, hi: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
    """Per section, the largest `value` of the pieces `[lo, hi)` covering it (0 where none): pieces in
    descending value paint only sections not painted yet, skipping painted runs by path-halved links."""
    out = np.zeros(n, dtype=np.int64)
    nxt = list(range(n + 1))  # nxt[s]: some section >= s not painted yet (n: none)
    res = [0] * n
    for j in np.argsort(-value, kind="stable").tolist():
        v, s, end = int(value[j]), int(lo[j]), int(hi[j])
        if v <= 0:
            break
        while True:
            while nxt[s] != s:  # find the first unpainted section >= s, halving the path
                nxt[s] = nxt[nxt[s]]
                s = nxt[s]
            if s >= end:
                break
            res[s] = v
            nxt[s] = s + 1
    out[:] = res
    return out


def partitions(sw: Sweep) -> list[list[int]]:
    """Groups of buffer indices that share no time with other groups, in time order.

    A buffer with several lifespans ties together everything between its first and last section.
    """
    n = len(sw.first)
    order = np.argsort(sw.first, kind="stable")
    groups: list[list[int]] = []
    reach = -1
    for i in order.tolist():
        if sw.first[i] >= reach:
            groups.append([])
        groups[-1].append(i)
        reach = max(reach, int(sw.last[i]))
    return groups if n else []


def overlap_lists(sw: Sweep, members: list[int]) -> list[np.ndarray]:
    """For each buffer of `members` (by position), the positions of the other members it overlaps in time."""
    n_sec = sw.n_sections
    cover = np.zeros((len(members), n_sec), dtype=np.float32)
    for j, i in enumerate(members):
        cover[j, sw.covers[i]] = 1.0
    shared = cover @ cover.T > 0.5
    np.fill_diagonal(shared, False)
    return [np.flatnonzero(row) for row in shared]
