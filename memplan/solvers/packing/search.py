"""Exact packing search: depth-first branch and bound over canonical solutions (MiniMalloc's ideas).

Our own implementation, in numpy, of the techniques of Moffitt, "MiniMalloc" (ASPLOS 2023):

- **Canonical solutions.** Every packing can be pushed down until each buffer rests at 0 or on top of a
  buffer overlapping it in time; its offset is then its *min offset*: the highest top, aligned, of the
  placed buffers it overlaps. Such a packing can be built bottom-up, in non-decreasing (offset, preorder
  rank) order, so the search only ever places a buffer at its current min offset, and only in that order.
- **Dominance.** A buffer is not placed at an offset at or above the min-offset top of another unplaced
  buffer: that buffer would fit entirely below, a hole no canonical packing leaves.
- **Cross-section inference.** In every section, the unplaced buffers must stack above the section's
  floor (the top of its placed buffers, or the lowest min offset of its unplaced ones, and never below the
  current placement offset): floor + unplaced total > capacity prunes the node.
- **Symmetry.** Buffers with identical lifespans and sizes are placed in index order.
- **Dynamic decomposition.** When no unplaced buffer crosses a section boundary, both sides are solved
  independently (a failure on one side never re-searches the other).
- **Round robin.** Several static preorders (W: lifespan width, A: area, T: largest section total, each
  descending) run under a node limit that doubles every round, so one unlucky order cannot stall.

Invariant (why pruning is sound): every canonical packing reachable from a node satisfies, in every
section, offset >= floor and total unplaced size <= capacity - floor, so a node failing either has no
completion. The search is complete: "infeasible" is a proof.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from enum import Enum

import numpy as np

from memplan.solvers.packing.problem import Problem
from memplan.solvers.packing.sweep import overlap_lists, sweep


@dataclass(frozen=True, slots=True)
class SearchParams:
    """Switches for every technique (all on by default), for ablations."""

    canonical_only: bool = True
    dominance: bool = True
    section_inference: bool = True
    unallocated_floor: bool = True
    symmetry: bool = True
    dynamic_decomposition: bool = True
    preorderings: tuple[str, ...] = ("WAT", "TAW", "TWA")


class Outcome(str, Enum):
    FOUND = "found"
    INFEASIBLE = "infeasible"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Offsets (problem order) when found, the outcome, and the nodes explored over all rounds."""

    offsets_bytes: tuple[int, ...] | None
    outcome: Outcome
    nodes: int


_FAR = np.int64(2**60)  # "no unplaced buffer here" in min-offset reductions


class _Abort(Exception):
    """The node budget of this round is spent."""


class _Timeout(Exception):
    """The wall-clock deadline passed."""


@dataclass(frozen=True, slots=True, eq=False)
class _Static:
    """Everything about the problem that search never changes (global buffer and section indices)."""

    size: np.ndarray
    align: np.ndarray
    covers: tuple[np.ndarray, ...]
    overlaps: tuple[np.ndarray, ...]
    first: np.ndarray
    last: np.ndarray
    sec_buf: np.ndarray  # buffer indices grouped by section
    sec_ptr: np.ndarray  # section s owns sec_buf[sec_ptr[s]:sec_ptr[s+1]]
    sym_prev: np.ndarray  # previous identical buffer, or n (always "placed")
    crossing: np.ndarray  # buffers crossing each inner section boundary s|s+1
    load: np.ndarray
    keys: dict[str, np.ndarray]  # preorder letter -> descending key per buffer


def _static(problem: Problem) -> _Static:
    sw = sweep(problem)
    n = len(problem.buffers)
    size = np.asarray([b.size_bytes for b in problem.buffers], dtype=np.int64)
    pairs_s = np.concatenate(sw.covers) if n else np.zeros(0, dtype=np.int64)
    pairs_b = np.repeat(np.arange(n), [len(c) for c in sw.covers])
    order = np.argsort(pairs_s, kind="stable")
    sec_ptr = np.searchsorted(pairs_s[order], np.arange(sw.n_sections + 1))
    crossing = np.zeros(sw.n_sections + 1, dtype=np.int64)
    np.add.at(crossing, sw.first, 1)
    np.add.at(crossing, sw.last - 1, -1)
    width = sw.events[sw.last] - sw.events[sw.first]
    total = np.asarray([sw.load[c].max() for c in sw.covers], dtype=np.int64)
    keys = {"W": width, "A": np.asarray([b.area for b in problem.buffers], dtype=np.int64), "T": total}
    return _Static(size, np.asarray([problem.alignment_of(i) for i in range(n)], dtype=np.int64),
                   sw.covers, tuple(overlap_lists(sw, list(range(n)))), sw.first, sw.last,
                   pairs_b[order], sec_ptr, _sym_prev(problem), np.cumsum(crossing)[:-1], sw.load, keys)


def _sym_prev(problem: Problem) -> np.ndarray:
    n = len(problem.buffers)
    prev = np.full(n, n, dtype=np.int64)
    seen: dict[tuple[object, ...], int] = {}
    for i, b in enumerate(problem.buffers):
        key = (b.lifespans, b.size_bytes, problem.alignment_of(i))
        if key in seen:
            prev[i] = seen[key]
        seen[key] = i
    return prev


def preorder_rank(st: _Static, heuristic: str) -> np.ndarray:
    """Rank of each buffer under a preorder such as "WAT" (descending keys, then index)."""
    n = len(st.size)
    cols = [np.arange(n)] + [-st.keys[c] for c in reversed(heuristic)]
    order = np.lexsort(tuple(cols))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


class _Dfs:
    """One round of depth-first search under one preorder, with undo-on-return state."""

    def __init__(self, st: _Static, cap: int, rank: np.ndarray, params: SearchParams,
                 node_limit: int, deadline: float) -> None:
        n = len(st.size)
        self.st, self.cap, self.rank, self.p = st, cap, rank, params
        self.nodes_left, self.deadline, self.nodes = node_limit, deadline, 0
        self.minoff = np.zeros(n, dtype=np.int64)
        self.eff = np.zeros(n, dtype=np.int64)  # min offset while unplaced, _FAR once placed
        self.placed = np.zeros(n + 1, dtype=bool)
        self.placed[n] = True
        self.offsets = np.zeros(n, dtype=np.int64)
        self.floor = np.zeros(len(st.load), dtype=np.int64)
        self.total = st.load.copy()
        self.crossing = st.crossing.copy()

    def solve(self) -> bool:
        """Place every buffer; False when the search proves it impossible."""
        n_sec = len(self.st.load)
        if int(self.total.max(initial=0)) > self.cap:
            return False
        cuts = (np.flatnonzero(self.crossing[: n_sec - 1] == 0) + 1).tolist()
        return self._split(np.arange(len(self.st.size)), [0, *cuts, n_sec])

    def solution_offsets(self) -> list[int]:
        """Offsets of the last packing found (valid after `solve` returned True)."""
        return [int(o) for o in self.offsets]

    def _split(self, members: np.ndarray, bounds: list[int]) -> bool:
        """Solve each independent section range `[bounds[k], bounds[k+1])` on its own."""
        st = self.st
        um = members[~self.placed[members]]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
            sub = um[(st.first[um] < hi) & (st.last[um] > lo)]
            if len(sub) and not self._node(sub, lo, hi, -1, -1):
                return False
        return True

    def _tick(self) -> None:
        self.nodes += 1
        self.nodes_left -= 1
        if self.nodes_left < 0:
            raise _Abort
        if self.nodes & 63 == 0 and time.perf_counter() > self.deadline:
            raise _Timeout

    def _candidates(self, um: np.ndarray, s0: int, s1: int, last_off: int, last_rank: int) -> np.ndarray | None:
        """Unplaced buffers worth placing next, best first; None when the node is already dead.

        Placing c at offset o leaves, in a section s it covers, floor o + size(c) under total(s) - size(c)
        unplaced bytes, and in any other section s (monotonic floor) at least o under total(s): both hold
        iff o + max total <= capacity, checked here for all candidates at once.
        """
        st, mo = self.st, self.minoff[um]
        tops = mo + st.size[um]
        if tops.max() > self.cap:
            return None
        ok = np.ones(len(um), dtype=bool)
        if self.p.section_inference:
            ok &= mo + int(self.total[s0:s1].max()) <= self.cap
        if self.p.dominance:
            ok &= mo < tops.min()
        if self.p.canonical_only:
            ok &= (mo > last_off) | ((mo == last_off) & (self.rank[um] > last_rank))
        if self.p.symmetry:
            ok &= self.placed[st.sym_prev[um]]
        cand = um[ok]
        return cand[np.lexsort((self.rank[cand], self.minoff[cand]))]

    def _node(self, members: np.ndarray, s0: int, s1: int, last_off: int, last_rank: int) -> bool:
        self._tick()
        um = members[~self.placed[members]]
        if len(um) == 0:
            return True
        cand = self._candidates(um, s0, s1, last_off, last_rank)
        if cand is None:
            return False
        for b in cand.tolist():
            if self._try(b, members, s0, s1):
                return True
        return False

    def _try(self, b: int, members: np.ndarray, s0: int, s1: int) -> bool:
        st = self.st
        off = int(self.minoff[b])
        top = off + int(st.size[b])
        ov = st.overlaps[b]
        ov = ov[~self.placed[ov]]
        old_mo = self.minoff[ov]
        new_mo = np.maximum(old_mo, -(-top // st.align[ov]) * st.align[ov])
        self.minoff[ov] = self.eff[ov] = new_mo
        self.eff[b] = _FAR
        cov = st.covers[b]
        old_floor = self.floor[cov]
        self.floor[cov] = top
        self.total[cov] -= st.size[b]
        self.placed[b] = True
        self.offsets[b] = off
        try:
            if not self._check(b, ov[new_mo > old_mo], s0, s1):
                return False
            if self.p.dynamic_decomposition:
                return self._decompose(b, members, s0, s1, off)
            return self._node(members, s0, s1, off, int(self.rank[b]))
        finally:
            self.placed[b] = False
            self.total[cov] += st.size[b]
            self.floor[cov] = old_floor
            self.minoff[ov] = self.eff[ov] = old_mo
            self.eff[b] = off

    def _check(self, b: int, risen: np.ndarray, s0: int, s1: int) -> bool:
        """The unallocated-floor part of cross-section inference after placing b (the floor and monotonic
        parts were settled for every candidate at once by `_candidates`). Incremental: the parent passed
        it; a section's lowest unplaced min offset can only have changed where b left (b's sections) or
        where a buffer's min offset rose (`risen`'s sections)."""
        st = self.st
        if not (self.p.section_inference and self.p.unallocated_floor):
            return True
        lo = max(min(int(st.first[risen].min(initial=st.first[b])), int(st.first[b])), s0)
        hi = min(max(int(st.last[risen].max(initial=st.last[b])), int(st.last[b])), s1)
        tot = self.total[lo:hi]
        fl = np.maximum(self.floor[lo:hi], self._unallocated_floor(lo, hi))
        return bool(((fl + tot) * (tot > 0)).max(initial=0) <= self.cap)

    def _unallocated_floor(self, s0: int, s1: int) -> np.ndarray:
        """Per section, the lowest min offset of its unplaced buffers (garbage where none: masked)."""
        st = self.st
        lo, hi = int(st.sec_ptr[s0]), int(st.sec_ptr[s1])
        vals = self.eff[st.sec_buf[lo:hi]]
        starts = np.minimum(st.sec_ptr[s0:s1] - lo, max(hi - lo - 1, 0))
        return np.minimum.reduceat(vals, starts) if hi > lo else np.zeros(s1 - s0, dtype=np.int64)

    def _decompose(self, b: int, members: np.ndarray, s0: int, s1: int, off: int) -> bool:
        """Recurse, splitting [s0, s1) wherever placing b left no unplaced buffer crossing a boundary."""
        st = self.st
        f, l = int(st.first[b]), int(st.last[b])
        self.crossing[f:l - 1] -= 1
        try:
            inner = self.crossing[max(f, s0):min(l, s1) - 1]
            cuts = (np.flatnonzero(inner == 0) + max(f, s0) + 1).tolist()
            if not cuts:
                return self._node(members, s0, s1, off, int(self.rank[b]))
            return self._split(members, [s0, *cuts, s1])
        finally:
            self.crossing[f:l - 1] += 1


def search(problem: Problem, capacity_bytes: int, timeout_s: float,
           params: SearchParams = SearchParams()) -> SearchResult:
    """Find a packing of `problem` within `capacity_bytes`, prove there is none, or time out.

    Buffers of size 0 get offset 0 and take no part. The found packing's offsets respect alignment.
    """
    deadline = time.perf_counter() + timeout_s
    keep = [i for i, b in enumerate(problem.buffers) if b.size_bytes > 0]
    sub = Problem(tuple(problem.buffers[i] for i in keep), capacity_bytes, problem.alignment_bytes)
    if not keep:
        return SearchResult(tuple(0 for _ in problem.buffers), Outcome.FOUND, 0)
    st = _static(sub)
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 8 * len(keep) + 2000))  # 3 frames per placed buffer, at most
    try:
        return _rounds(st, capacity_bytes, params, deadline, keep, len(problem.buffers))
    finally:
        sys.setrecursionlimit(old_limit)


def _rounds(st: _Static, capacity_bytes: int, params: SearchParams, deadline: float, keep: list[int],
            n: int) -> SearchResult:
    """Round robin over the preorders with a node limit doubling every round (MiniMalloc's schedule)."""
    limit, nodes = len(keep), 0
    while True:
        limit *= 2
        for heuristic in params.preorderings:
            dfs = _Dfs(st, capacity_bytes, preorder_rank(st, heuristic), params, limit, deadline)
            try:
                found = dfs.solve()
            except _Abort:
                nodes += dfs.nodes
                continue
            except _Timeout:
                return SearchResult(None, Outcome.TIMEOUT, nodes + dfs.nodes)
            nodes += dfs.nodes
            if not found:
                return SearchResult(None, Outcome.INFEASIBLE, nodes)
            return SearchResult(_expand(dfs.solution_offsets(), keep, n), Outcome.FOUND, nodes)


def _expand(offsets: list[int], keep: list[int], n: int) -> tuple[int, ...]:
    full = [0] * n
    for j, i in enumerate(keep):
        full[i] = offsets[j]
    return tuple(full)
