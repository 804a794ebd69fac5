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

import numpy as np

from memplan.solvers.packing.problem import Problem


@dataclass(frozen=True, slots=True, eq=False)
class Sweep:
    """Sections of a problem. `covers[i]` lists the section indices buffer i covers (sorted, int64);
    `first[i]`/`last[i]` bound them (`last` exclusive); `load[s]` is the total size covering section s."""

    events: np.ndarray
    covers: tuple[np.ndarray, ...]
    first: np.ndarray
    last: np.ndarray
    load: np.ndarray

    @property
    def n_sections(self) -> int:
        return int(len(self.load))


def sweep(problem: Problem) -> Sweep:
    """Sections and loads of `problem` in O(n log n + total covered sections)."""
    los = [lo for b in problem.buffers for lo, _ in b.lifespans]
    his = [hi for b in problem.buffers for _, hi in b.lifespans]
    events = np.unique(np.asarray(los + his, dtype=np.int64))
    lo_idx = np.searchsorted(events, np.asarray(los, dtype=np.int64))
    hi_idx = np.searchsorted(events, np.asarray(his, dtype=np.int64))
    n_sec = max(len(events) - 1, 0)
    covers: list[np.ndarray] = []
    diff = np.zeros(n_sec + 1, dtype=np.int64)
    k = 0
    for b in problem.buffers:
        parts = []
        for _ in b.lifespans:
            parts.append(np.arange(lo_idx[k], hi_idx[k], dtype=np.int64))
            diff[lo_idx[k]] += b.size_bytes
            diff[hi_idx[k]] -= b.size_bytes
            k += 1
        covers.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
    first = np.asarray([c[0] for c in covers], dtype=np.int64)
    last = np.asarray([c[-1] + 1 for c in covers], dtype=np.int64)
    load = np.cumsum(diff[:-1]) if n_sec else np.zeros(0, dtype=np.int64)
    return Sweep(events, tuple(covers), first, last, load)


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
    sec = np.concatenate(sw.covers)
    owner = np.repeat(np.arange(len(size)), [len(c) for c in sw.covers])
    need = np.zeros(sw.n_sections, dtype=np.int64)
    np.add.at(need, sec, rounded[owner])
    slack = np.zeros(sw.n_sections, dtype=np.int64)
    np.maximum.at(slack, sec, (rounded - size)[owner])
    return int((need - slack).max())


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
