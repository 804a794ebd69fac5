"""One round of the exact packing search: depth-first over canonical packings, in plain Python.

The techniques are MiniMalloc's (Moffitt, ASPLOS 2023; see `search.py` for what each one prunes). This
module is the inner loop, written with plain lists and ints rather than numpy: a few hundred buffers make
numpy's per-call overhead dominate, and a node here touches only the buffers and sections that change.

State, kept incrementally and undone from small change records on return (as MiniMalloc does):

- `minoff[u]`: lowest aligned offset above every placed buffer overlapping u in time (the capacity once
  u is placed, a value no unplaced buffer holds), and
  `key[u] = minoff[u] * n + rank[u]`, so sorting by `key` sorts by (min offset, preorder rank) and the
  canonical rule "place in non-decreasing (offset, rank)" is `key[u] > key of the last placed buffer`;
- `total[s]`: total size of the unplaced buffers covering section s;
- `crossing[s]`: unplaced buffers spanning the boundary between sections s and s + 1;
- `hint[s]`: some buffer of section s, a guess at a witness for the section check (below). It is
  never undone: every use re-checks it, so a stale hint only costs a rescan;
- `conflict`: the section whose check failed last, looked at before placing the next candidate
  (`_doomed`), which saves the lift and its undo on about half the failing placements (MiniMalloc B).

Invariant at every node, for every section s of the node's range holding unplaced buffers: some unplaced
u in s has `minoff[u] + total[s] <= capacity` (the lowest unplaced buffer still leaves room for the rest
stacked above it), and every unplaced u has `minoff[u] + size[u] <= capacity`. Why it holds: a node's
sections change only where the placed buffer b leaves (b's sections) or where a buffer's min offset
rose (the sections of buffers overlapping b); `_check` re-establishes it exactly there, and every other
section keeps the state its parent checked. Why it is sound: min offsets and the placement offset only
rise along a branch, so a section failing it cannot be completed below the capacity.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from operator import add


class Abort(Exception):
    """The node budget of this round is spent."""


class Timeout(Exception):
    """The wall-clock deadline passed, or the caller asked to stop."""


@dataclass(frozen=True, slots=True, eq=False)
class Tables:
    """The problem as plain lists (buffer and section indices), fixed for the whole search.

    `sym_prev[u]` is the previous buffer identical to u (same lifespans, size, alignment), or n, an
    index that is always "placed"; `crossing[s]` counts buffers spanning the boundary s | s + 1.
    """

    size: list[int]
    align: list[int]
    first: list[int]  # first section covered
    last: list[int]  # one past the last section covered
    covers: list[list[int]]  # sections covered, per buffer
    overlaps: list[list[int]]  # buffers sharing a section, per buffer
    members: list[list[int]]  # buffers covering it, per section
    sym_prev: list[int]
    crossing: list[int]
    load: list[int]
    reach: list[int]  # size + the largest (size + alignment - 1) in its sections: the most a lift reaches
    single: list[bool]  # covers exactly [first, last): one lifespan


@dataclass(frozen=True, slots=True)
class Switches:
    """The techniques a round uses (see `SearchParams`)."""

    canonical_only: bool
    dominance: bool
    section_inference: bool
    unallocated_floor: bool
    symmetry: bool
    dynamic_decomposition: bool
    hatless_pruning: bool
    dynamic_preorder: bool
    dynamic_preorder_max: int


INF = 1 << 62
"""Above every offset."""


class Dfs:
    """One round under one preorder: `solve()` places every buffer or proves it cannot be done."""

    def __init__(
        self,
        tab: Tables,
        cap: int,
        rank: list[int],
        sw: Switches,
        node_limit: int,
        deadline: float,
        preorder: str = "",
        static_keys: dict[str, list[int]] | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        n = len(tab.size)
        self.tab, self.cap, self.rank, self.sw, self.n = tab, cap, list(rank), sw, n
        self.preorder, self.static_keys = preorder, static_keys or {}
        self.nodes, self.nodes_left, self.deadline, self.stop = 0, node_limit, deadline, stop
        # A placed buffer's min offset is the capacity, which no unplaced one reaches (its top would not fit):
        # one comparison skips placed buffers, and `minoff[w] + total[s] <= cap` fails for a placed witness
        # exactly when section s still holds unplaced bytes. [n]: an always-placed sentinel.
        self.minoff = [0] * n + [cap]
        self.key = list(rank)  # minoff * n + rank, while unplaced
        self.offsets = [0] * n
        self.total = list(tab.load)
        self.crossing = list(tab.crossing)
        self.hint = [m[0] if m else n for m in tab.members]
        self.unit_align = all(a == 1 for a in tab.align)
        self.conflict = -1  # the section whose witness check failed last (see `_doomed`)

    def solve(self) -> bool:
        """Place every buffer; False when the search proves it impossible."""
        n_sec = len(self.total)
        if max(self.total, default=0) > self.cap:
            return False
        cuts = [s + 1 for s in range(n_sec - 1) if self.crossing[s] == 0]
        return self._split(list(range(self.n)), [0, *cuts, n_sec])

    def _split(self, um: list[int], bounds: list[int]) -> bool:
        """Solve each independent section range `[bounds[k], bounds[k+1])` on its own."""
        first, last = self.tab.first, self.tab.last
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            sub = [u for u in um if first[u] < hi and last[u] > lo]
            if sub and not self._subsolve(sub, lo, hi):
                return False
        return True

    def _subsolve(self, sub: list[int], lo: int, hi: int) -> bool:
        """Search one independent part afresh (canonical order restarts), re-ranking its buffers by the
        preorder with today's section totals when `dynamic_preorder` is on (MiniMalloc's SubSolve)."""
        if not (self.sw.dynamic_preorder and self.preorder) or len(sub) > self.sw.dynamic_preorder_max:
            return self._node(sub, lo, hi, -1)
        rank, key, minoff, n = self.rank, self.key, self.minoff, self.n
        old = [rank[u] for u in sub]
        for u, r in zip(self._reorder(sub), sorted(old), strict=True):
            rank[u] = r
            key[u] = minoff[u] * n + r
        try:
            return self._node(sub, lo, hi, -1)
        finally:
            for u, r in zip(sub, old, strict=True):
                rank[u] = r
                key[u] = minoff[u] * n + r

    def _reorder(self, sub: list[int]) -> list[int]:
        """`sub` sorted by the preorder, "T" being the largest unplaced total among a buffer's sections."""
        cols = [
            self._largest_totals(sub) if c == "T" else [self.static_keys[c][u] for u in sub]
            for c in self.preorder
        ]
        idx = sorted(range(len(sub)), key=lambda j: (*(-col[j] for col in cols), sub[j]))
        return [sub[j] for j in idx]

    def _tick(self) -> None:
        self.nodes += 1
        self.nodes_left -= 1
        if self.nodes_left < 0:
            raise Abort
        if self.nodes & 63 == 0 and (time.perf_counter() > self.deadline or self.stop()):
            raise Timeout

    def _node(self, um: list[int], s0: int, s1: int, last_key: int) -> bool:
        """Place one more of the unplaced buffers `um` (sections `[s0, s1)`), after the last one placed
        (`last_key`)."""
        self._tick()
        if not um:
            return True
        um.sort(key=self.key.__getitem__)  # nearly sorted already: the parent's order
        lo, hi = self._candidates(um, s0, s1, last_key)
        prev, minoff = self.tab.sym_prev, self.minoff
        for i in range(lo, hi):
            b = um[i]
            if self.sw.symmetry and minoff[prev[b]] != self.cap:
                continue  # twins go in index order
            if not self._doomed(b, s0, s1) and self._try(b, um[:i] + um[i + 1 :], s0, s1):
                return True
            if self.sw.hatless_pruning and self._hatless(b):
                return False  # b fixed nothing for the others, and no later sibling can place b
        return False

    def _doomed(self, b: int, s0: int, s1: int) -> bool:
        """Look-ahead on the section whose check failed last (failures cluster): True when placing b would
        leave it without a witness, so `_try` would fail; skips the lift and its undo. Never wrong: a
        member's min offset after the lift is taken as max(min offset, b's top) only when both lifespans
        are single intervals that overlap (otherwise as today's), at most its true value."""
        s, tab, minoff = self.conflict, self.tab, self.minoff
        if not (s0 <= s < s1 and tab.single[b]):
            return False
        f, end, top = tab.first[b], tab.last[b], minoff[b] + tab.size[b]
        room = self.cap - self.total[s] + (tab.size[b] if f <= s < end else 0)
        if room >= self.cap:
            return False  # b was the section's last unplaced buffer
        first, last, single = tab.first, tab.last, tab.single
        for u in tab.members[s]:
            m = minoff[u]
            if (
                m <= room
                and u != b
                and (m >= top or top <= room or not single[u] or last[u] <= f or first[u] >= end)
            ):
                return False
        return True

    def _hatless(self, b: int) -> bool:
        """No unplaced buffer overlaps b. Then placing b first at its min offset is as good as any
        completion's choice (it lifts nobody and its min offset can no longer rise), so when that failed,
        the node fails: a later sibling c (key above b's) leaves b unplaceable under the canonical rule."""
        minoff = self.minoff
        return all(minoff[u] == self.cap for u in self.tab.overlaps[b])

    def _candidates(self, um: list[int], s0: int, s1: int, last_key: int) -> tuple[int, int]:
        """The slice of `um` (sorted by (min offset, rank)) worth placing next.

        Canonical: key above `last_key`. Dominance: min offset below every unplaced buffer's min-offset top
        (else that buffer fits entirely below: a hole no canonical packing leaves). Section inference:
        placing c at o keeps o + total(s) <= capacity in every section (its own lose size(c) but gain
        floor o + size(c)), so o <= capacity - max total.
        """
        key, sw, n = self.key.__getitem__, self.sw, self.n
        hi_key = (self.cap + 1) * n
        if sw.dominance:
            hi_key = min(hi_key, self._lowest_top(um) * n)
        if sw.section_inference:
            hi_key = min(hi_key, (self.cap - max(self.total[s0:s1]) + 1) * n)
        start = bisect_right(um, last_key, key=key) if sw.canonical_only else 0
        return start, bisect_left(um, hi_key, key=key, lo=start)

    def _lowest_top(self, um: list[int]) -> int:
        """Lowest min-offset top among `um`, sorted by min offset: a scan stops at the first min offset
        at or above the best top so far (every later top is higher)."""
        minoff, size = self.minoff, self.tab.size
        best = INF
        for u in um:
            m = minoff[u]
            if m >= best:
                break
            if m + size[u] < best:
                best = m + size[u]
        return best

    def _largest_totals(self, sub: list[int]) -> list[int]:
        """Per buffer of `sub`, the largest unplaced total among its sections."""
        total, tab = self.total, self.tab
        return [
            max(total[tab.first[u] : tab.last[u]])
            if tab.single[u]
            else max([total[s] for s in tab.covers[u]])
            for u in sub
        ]

    def _try(self, b: int, um: list[int], s0: int, s1: int) -> bool:
        """Place b at its min offset, recurse, undo."""
        tab, minoff, key, rank, n = self.tab, self.minoff, self.key, self.rank, self.n
        off, sz = minoff[b], tab.size[b]
        minoff[b] = self.cap
        self.offsets[b] = off
        risen = [u for u in tab.overlaps[b] if minoff[u] < off + sz]  # placed: the capacity
        old = list(map(minoff.__getitem__, risen))
        self._raise(risen, off + sz)
        total = self.total
        for s in tab.covers[b]:
            total[s] -= sz
        try:
            if not self._check(b, risen, s0, s1):
                return False
            if self.sw.dynamic_decomposition:
                return self._decompose(b, um, s0, s1)
            return self._node(um, s0, s1, key[b])
        finally:
            for s in tab.covers[b]:
                total[s] += sz
            for u, m in zip(risen, old, strict=True):
                minoff[u] = m
                key[u] = m * n + rank[u]
            minoff[b] = off

    def _raise(self, risen: list[int], top: int) -> None:
        """Lift the min offset of `risen` (unplaced, overlapping the buffer just placed) to its top,
        aligned."""
        minoff, key, rank, n = self.minoff, self.key, self.rank, self.n
        if self.unit_align:
            top_n = top * n
            for u in risen:
                minoff[u] = top
                key[u] = top_n + rank[u]
            return
        align = self.tab.align
        for u in risen:
            a = align[u]
            new = -(-top // a) * a
            minoff[u] = new
            key[u] = new * n + rank[u]

    def _check(self, b: int, risen: list[int], s0: int, s1: int) -> bool:
        """Re-establish the invariant where placing b changed something: every lifted buffer still fits
        under the capacity, and (section inference with unallocated floor) every section of b or of a lifted
        buffer (for single lifespans, one range: they all overlap b) has a witness u with min offset +
        section total <= capacity."""
        tab, minoff, cap = self.tab, self.minoff, self.cap
        if self.offsets[b] + tab.reach[b] > cap:  # some lifted buffer might poke out: look
            size = tab.size
            if any(minoff[u] + size[u] > cap for u in risen):
                return False
        if not (self.sw.section_inference and self.sw.unallocated_floor):
            return True
        first, last = tab.first, tab.last
        lo = min(min(map(first.__getitem__, risen), default=first[b]), first[b])
        hi = max(max(map(last.__getitem__, risen), default=last[b]), last[b])
        return self._witnessed(max(lo, s0), min(hi, s1))

    def _witnessed(self, lo: int, hi: int) -> bool:
        """Every section of `[lo, hi)` with unplaced buffers has one whose min offset leaves room for the
        section's unplaced total above it: `hint` is tried first (at C speed), then the previous section's
        witness, then the section's lowest member."""
        total, hint, minoff, cap = self.total, self.hint, self.minoff, self.cap
        need = list(map(add, map(minoff.__getitem__, hint[lo:hi]), total[lo:hi]))
        if max(need, default=0) <= cap:
            return True  # every hint is a witness (the usual case)
        tab, lowest, u = self.tab, minoff.__getitem__, 0  # u: a guess, checked before use
        for s in [lo + j for j, v in enumerate(need) if v > cap]:
            if not (tab.single[u] and tab.first[u] <= s < tab.last[u] and minoff[u] + total[s] <= cap):
                u = min(tab.members[s], key=lowest)  # the last witness does not cover s: the lowest
                if minoff[u] + total[s] > cap:
                    self.conflict = s
                    return False
            hint[s] = u  # neighbouring sections often share their witness: u is tried first for the next
        return True

    def _decompose(self, b: int, um: list[int], s0: int, s1: int) -> bool:
        """Recurse, splitting [s0, s1) wherever placing b left no unplaced buffer crossing a boundary."""
        tab, crossing = self.tab, self.crossing
        f, end = tab.first[b], tab.last[b]
        cuts: list[int] = []
        for s in range(f, end - 1):
            crossing[s] -= 1
            if not crossing[s] and s0 <= s < s1 - 1:
                cuts.append(s + 1)
        try:
            if not cuts:
                return self._node(um, s0, s1, self.key[b])
            return self._split(um, [s0, *cuts, s1])
        finally:
            for s in range(f, end - 1):
                crossing[s] += 1
