"""Exact packing search: depth-first branch and bound over canonical solutions (MiniMalloc's ideas).

Our own implementation of the techniques of Moffitt, "MiniMalloc" (ASPLOS 2023; google/minimalloc),
each a switch of `SearchParams`. This module holds the API, the fixed tables (built once with numpy) and
the round robin; the inner loop is `search_dfs` (plain Python lists and ints: on a few hundred buffers a
node costs 30-100 µs there, where numpy's per-call overhead made it 300-500 µs), and `search_race` runs two
differently ordered searches on two processes.

- **Canonical solutions.** Every packing can be pushed down until each buffer rests at 0 or on top of a
  buffer overlapping it in time; its offset is then its *min offset*: the highest top, aligned, of the
  placed buffers it overlaps. Such a packing can be built bottom-up, in non-decreasing (offset, preorder
  rank) order, so the search only ever places a buffer at its current min offset, and only in that order.
- **Dominance.** A buffer is not placed at an offset at or above the min-offset top of another unplaced
  buffer: that buffer would fit entirely below, a hole no canonical packing leaves.
- **Cross-section inference.** In every section, the unplaced buffers must stack above the section's
  floor (the lowest min offset of its unplaced ones, and never below the current placement offset):
  floor + unplaced total > capacity prunes the node (`unallocated_floor`: the min-offset part).
- **Symmetry.** Buffers with identical lifespans and sizes are placed in index order.
- **Hatless pruning.** When a buffer that overlaps no unplaced buffer was placed and its subtree failed,
  the node fails (MiniMalloc's `hatless_pruning`; see `Dfs._hatless`).
- **Dynamic decomposition.** When no unplaced buffer crosses a section boundary, both sides are solved
  independently (a failure on one side never re-searches the other); with `dynamic_preorder`, each side is
  re-ranked by the preorder with the current section totals, as MiniMalloc's `SubSolve` does (parts above
  `dynamic_preorder_max` buffers keep their ranks: re-ranking costs O(part) per split).
- **Round robin.** Several static preorders (W: lifespan width, A: area, T: largest section total, each
  descending) run under a node limit that doubles every round, so one unlucky order cannot stall.
- **Racing** (`parallel`, off here, on in the portfolio). A forked process runs the preorders reversed
  with `dynamic_preorder` flipped; the first answer wins. Either setting is sometimes 10-100x faster.

Invariant (why pruning is sound): every canonical packing reachable from a node satisfies, in every
section, offset >= floor and total unplaced size <= capacity - floor, so a node failing either has no
completion. The search is complete: "infeasible" is a proof.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np

from memplan.solvers.packing.problem import Problem
from memplan.solvers.packing.search_dfs import Abort, Dfs, Switches, Tables, Timeout
from memplan.solvers.packing.search_race import race
from memplan.solvers.packing.sweep import overlap_lists, sweep


@dataclass(frozen=True, slots=True)
class SearchParams:
    """Switches for every technique (all on by default except `parallel`), for ablations."""

    canonical_only: bool = True
    dominance: bool = True
    section_inference: bool = True
    unallocated_floor: bool = True
    symmetry: bool = True
    dynamic_decomposition: bool = True
    hatless_pruning: bool = True
    dynamic_preorder: bool = True
    dynamic_preorder_max: int = 512
    preorderings: tuple[str, ...] = ("WAT", "TAW", "TWA")
    parallel: bool = False
    parallel_min_buffers: int = 64


class Outcome(str, Enum):  # noqa: UP042
    FOUND = "found"
    INFEASIBLE = "infeasible"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Offsets (problem order) when found, the outcome, and the nodes explored over all rounds."""

    offsets_bytes: tuple[int, ...] | None
    outcome: Outcome
    nodes: int


@lru_cache(maxsize=2)
def _tables(problem: Problem) -> tuple[Tables, dict[str, np.ndarray]]:
    """The search's fixed lists, and each preorder letter's key per buffer (sorted descending). Cached:
    the portfolio searches one problem at several capacities, and nothing here depends on the capacity."""
    sw = sweep(problem)
    n = len(problem.buffers)
    size = np.asarray([b.size_bytes for b in problem.buffers], dtype=np.int64)
    align = np.asarray([problem.alignment_of(i) for i in range(n)], dtype=np.int64)
    pairs_s = np.concatenate(sw.covers)
    pairs_b = np.repeat(np.arange(n), [len(c) for c in sw.covers])
    members: list[list[int]] = [[] for _ in range(sw.n_sections)]
    for s, i in zip(pairs_s.tolist(), pairs_b.tolist(), strict=True):
        members[s].append(i)
    crossing = np.zeros(sw.n_sections + 1, dtype=np.int64)
    np.add.at(crossing, sw.first, 1)
    np.add.at(crossing, sw.last - 1, -1)
    reach = np.zeros(sw.n_sections, dtype=np.int64)  # per section: largest size + alignment - 1
    np.maximum.at(reach, pairs_s, (size + align - 1)[pairs_b])
    tab = Tables(
        size.tolist(),
        align.tolist(),
        sw.first.tolist(),
        sw.last.tolist(),
        [c.tolist() for c in sw.covers],
        [o.tolist() for o in overlap_lists(sw, list(range(n)))],
        members,
        _sym_prev(problem),
        np.cumsum(crossing)[:-1].tolist(),
        sw.load.tolist(),
        [int(size[i] + reach[c].max()) for i, c in enumerate(sw.covers)],
        [len(c) == int(sw.last[i] - sw.first[i]) for i, c in enumerate(sw.covers)],
    )
    width = sw.events[sw.last] - sw.events[sw.first]
    total = sw.peak_load()
    keys = {"W": width, "A": np.asarray([b.area for b in problem.buffers], dtype=np.int64), "T": total}
    return tab, keys


def _sym_prev(problem: Problem) -> list[int]:
    n = len(problem.buffers)
    prev = [n] * n
    seen: dict[tuple[object, ...], int] = {}
    for i, b in enumerate(problem.buffers):
        key = (b.lifespans, b.size_bytes, problem.alignment_of(i))
        if key in seen:
            prev[i] = seen[key]
        seen[key] = i
    return prev


def preorder_rank(keys: dict[str, np.ndarray], heuristic: str) -> list[int]:
    """Rank of each buffer under a preorder such as "WAT" (descending keys, then index)."""
    n = len(next(iter(keys.values())))
    cols = [np.arange(n)] + [-keys[c] for c in reversed(heuristic)]
    order = np.lexsort(tuple(cols))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank.tolist()


def search(
    problem: Problem, capacity_bytes: int, timeout_s: float, params: SearchParams = SearchParams()
) -> SearchResult:
    """Find a packing of `problem` within `capacity_bytes`, prove there is none, or time out.

    Buffers of size 0 get offset 0 and take no part. The found packing's offsets respect alignment.
    With `params.parallel` and at least `params.parallel_min_buffers` buffers, two differently ordered
    searches race on two processes (`search_race`).
    """
    if params.parallel and len(problem.buffers) >= params.parallel_min_buffers:
        return race(_run, problem, capacity_bytes, timeout_s, params)
    return _run(problem, capacity_bytes, timeout_s, params, lambda: False)


def _run(
    problem: Problem, capacity_bytes: int, timeout_s: float, params: SearchParams, stop: Callable[[], bool]
) -> SearchResult:
    """The search in this process; `stop()` (polled every 64 nodes) ends it early, as a timeout."""
    deadline = time.perf_counter() + timeout_s
    keep = [i for i, b in enumerate(problem.buffers) if b.size_bytes > 0]
    sub = Problem(tuple(problem.buffers[i] for i in keep), capacity_bytes, problem.alignment_bytes)
    if not keep:
        return SearchResult(tuple(0 for _ in problem.buffers), Outcome.FOUND, 0)
    tab, keys = _tables(sub)
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 8 * len(keep) + 2000))  # 3 frames per placed buffer, at most
    try:
        return _rounds(tab, keys, capacity_bytes, params, deadline, keep, len(problem.buffers), stop)
    finally:
        sys.setrecursionlimit(old_limit)


def _switches(params: SearchParams) -> Switches:
    return Switches(
        params.canonical_only,
        params.dominance,
        params.section_inference,
        params.unallocated_floor,
        params.symmetry,
        params.dynamic_decomposition,
        params.hatless_pruning,
        params.dynamic_preorder,
        params.dynamic_preorder_max,
    )


def _rounds(
    tab: Tables,
    keys: dict[str, np.ndarray],
    capacity_bytes: int,
    params: SearchParams,
    deadline: float,
    keep: list[int],
    n: int,
    stop: Callable[[], bool],
) -> SearchResult:
    """Round robin over the preorders with a node limit doubling every round (MiniMalloc's schedule)."""
    limit, nodes = len(keep), 0
    ranks = {h: preorder_rank(keys, h) for h in params.preorderings}
    static_keys = {c: v.tolist() for c, v in keys.items()}
    while True:
        limit *= 2
        for heuristic in params.preorderings:
            dfs = Dfs(
                tab,
                capacity_bytes,
                ranks[heuristic],
                _switches(params),
                limit,
                deadline,
                heuristic,
                static_keys,
                stop,
            )
            try:
                found = dfs.solve()
            except Abort:
                nodes += dfs.nodes
                continue
            except Timeout:
                return SearchResult(None, Outcome.TIMEOUT, nodes + dfs.nodes)
            nodes += dfs.nodes
            if not found:
                return SearchResult(None, Outcome.INFEASIBLE, nodes)
            return SearchResult(_expand(dfs.offsets, keep, n), Outcome.FOUND, nodes)


def _expand(offsets: list[int], keep: list[int], n: int) -> tuple[int, ...]:
    full = [0] * n
    for j, i in enumerate(keep):
        full[i] = offsets[j]
    return tuple(full)
