"""The `allocate` pass: a byte offset for every storage in its tier's arena, as small an arena as possible.

Follows MiniMalloc's formulation (Moffitt, ASPLOS 2023) through `memplan.solvers.packing`: for each tier,
every storage resident there becomes one buffer whose lifespans are its residency intervals on that tier
(a storage swapped out and back in keeps one offset), aligned to the tier's alignment (64 bytes for
memory tiers, 4096 for the SSD tier so that file reads are page-aligned). The portfolio (best-fit greedy
under several orderings, then exact search) minimises each arena's height against the max-load bound.

Reads `plan.residency`; writes `plan.offsets` (tier -> value id -> offset), `predictions.arena_bytes`
and its `AllocateDecision` (one arena per tier, each packing's height, bound and solver). Runs last: a pass
after it would move storages its offsets were packed for. Never mutates its inputs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from memplan.ir.analysis import Interval
from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.passes.base import PassOutput, PassSpec
from memplan.plans.decisions import AllocateDecision, Arena, TierPacking
from memplan.plans.plan import PassReport, Plan, SolverReport
from memplan.solvers.packing import PortfolioOptions, Problem, Solution, Status, make_buffer, solve

NAME = "allocate"
DEFAULT_ALIGNMENT: dict[str, int] = {"device": 64, "host": 64, "cxl": 64, "ssd": 4096}


@dataclass(frozen=True, slots=True)
class AllocateOptions:
    """`timeout_s` is shared by all tiers (each gets its share of what is left); `alignment_bytes`
    overrides the defaults per tier; `exact=False` keeps to greedy best fit."""

    timeout_s: float = 5.0
    alignment_bytes: dict[str, int] = field(default_factory=dict)
    exact: bool = True

    def alignment(self, tier: str) -> int:
        return self.alignment_bytes.get(tier, DEFAULT_ALIGNMENT.get(tier, 64))


@dataclass(frozen=True, slots=True)
class TierAllocation:
    """One tier's packing: offset per value id, and the solver's answer (height, bound, status)."""

    tier: str
    offsets_bytes: dict[int, int]
    solution: Solution


def tier_problem(intervals: Iterable[Interval], alignment_bytes: int) -> tuple[Problem, list[int]]:
    """The packing problem of one tier's intervals (one buffer per value) and the value id of each buffer."""
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    size: dict[int, int] = {}
    for iv in intervals:
        spans[iv.value_id].append((iv.start, iv.end))
        size[iv.value_id] = max(size.get(iv.value_id, 0), iv.size_bytes)
    ids = sorted(spans)
    buffers = tuple(make_buffer(str(v), spans[v], size[v]) for v in ids)
    return Problem(buffers, None, alignment_bytes), ids


def allocate_intervals(
    intervals: Iterable[Interval], alignment_bytes: dict[str, int], timeout_s: float, exact: bool = True
) -> dict[str, TierAllocation]:
    """Pack each tier's intervals into its own arena, minimising its height. Tiers without an entry in
    `alignment_bytes` use the defaults (64 bytes; 4096 for ssd). A tier whose storages all live at once
    (weights streamed from a file) is laid out in the order the device first reads them (`file_layout`)."""
    ivs = list(intervals)
    by_tier: dict[str, list[Interval]] = defaultdict(list)
    first_read: dict[int, int] = {}
    for iv in ivs:
        by_tier[iv.tier].append(iv)
        if iv.tier == "device":
            first_read[iv.value_id] = min(first_read.get(iv.value_id, iv.start), iv.start)
    deadline = time.perf_counter() + timeout_s
    out: dict[str, TierAllocation] = {}
    tiers = sorted(by_tier)
    for k, tier in enumerate(tiers):
        align = alignment_bytes.get(tier, DEFAULT_ALIGNMENT.get(tier, 64))
        if tier != "device" and _all_at_once(by_tier[tier]):
            out[tier] = file_layout(tier, by_tier[tier], align, first_read)
            continue
        problem, ids = tier_problem(by_tier[tier], align)
        share = max(deadline - time.perf_counter(), 0.05) / (len(tiers) - k)
        sol = solve(problem, share, options=PortfolioOptions(exact=exact))
        offsets = dict(zip(ids, sol.offsets_bytes or (), strict=False))
        out[tier] = TierAllocation(tier, offsets, sol)
    return out


def _all_at_once(intervals: list[Interval]) -> bool:
    """True when some step is inside every interval (so any packing is a sequence: no reuse possible)."""
    return max(iv.start for iv in intervals) < min(iv.end for iv in intervals)


def file_layout(
    tier: str, intervals: list[Interval], align: int, first_read: dict[int, int]
) -> TierAllocation:
    """Storages that all live at once, one after the other in the order the device first reads them (the
    weights one unit call reads are then one contiguous range). The bound: every storage at an aligned
    offset of its own, so all but the last take their size rounded up to the alignment."""
    t0 = time.perf_counter()
    size: dict[int, int] = {}
    for iv in intervals:
        size[iv.value_id] = max(size.get(iv.value_id, 0), iv.size_bytes)
    offsets: dict[int, int] = {}
    top = 0
    for vid in sorted(size, key=lambda v: (first_read.get(v, 1 << 62), v)):
        top = -(-top // align) * align
        offsets[vid] = top
        top += size[vid]
    padded = [-(-n // align) * align for n in size.values()]
    bound = sum(padded) - max((p - n for p, n in zip(padded, size.values(), strict=True)), default=0)
    status = Status.OPTIMAL if top <= bound else Status.FEASIBLE
    sol = Solution(tuple(offsets.values()), top, status, bound, time.perf_counter() - t0, "file-layout")
    return TierAllocation(tier, offsets, sol)


def _combined_status(solutions: list[Solution]) -> str:
    statuses = {s.status for s in solutions}
    for st in (Status.INFEASIBLE, Status.TIMEOUT, Status.FEASIBLE):
        if st in statuses:
            return st.value
    return Status.OPTIMAL.value if solutions else "trivial"


def run(graph: Graph, hardware: Hardware, plan: Plan, options: AllocateOptions | None = None) -> PassOutput:
    """Assign offsets to every interval of `plan.residency`; the arena of each tier is its packing height."""
    opts = options or AllocateOptions()
    t0 = time.perf_counter()
    align = {t.name: opts.alignment(t.name) for t in hardware.tiers}
    allocs = allocate_intervals(plan.residency, align, opts.timeout_s, opts.exact)
    sols = [a.solution for a in allocs.values()]
    height = sum(s.height_bytes or 0 for s in sols)
    bound = sum(s.lower_bound_bytes for s in sols)
    notes = tuple(_note(a, plan.budget_bytes.get(t)) for t, a in allocs.items())
    report = SolverReport(
        "packing-portfolio",
        _combined_status(sols),
        float(height),
        float(bound),
        (height - bound) / bound if bound else 0.0,
        sum(s.time_s for s in sols),
        opts.timeout_s,
    )
    arena = {t: a.solution.height_bytes or 0 for t, a in allocs.items()}
    decision = AllocateDecision(
        tuple(Arena(t, t, arena[t], align[t]) for t in allocs),
        tuple(_packing(a) for a in allocs.values()),
    )
    new_plan = plan.with_(
        offsets={t: dict(a.offsets_bytes) for t, a in allocs.items()},
        predictions=replace(plan.predictions, arena_bytes=arena),
        decisions=plan.decisions.with_(allocate=decision),
        warnings=(*plan.warnings, *(n for n in notes if "exceeds" in n)),
    )
    return PassOutput(new_plan, PassReport(NAME, time.perf_counter() - t0, report, notes))


def _packing(a: TierAllocation) -> TierPacking:
    s = a.solution
    return TierPacking(
        a.tier,
        s.height_bytes or 0,
        s.lower_bound_bytes,
        s.status.value,
        s.solver,
        len(a.offsets_bytes),
        round(s.time_s, 4),
    )


PASS = PassSpec(NAME, run, AllocateOptions, before=frozenset({"allocate"}), ensures=frozenset({"offsets"}))


def _note(a: TierAllocation, budget: int | None) -> str:
    s = a.solution
    text = (
        f"{a.tier}: arena {s.height_bytes} bytes for {len(a.offsets_bytes)} storages, "
        f"max-load bound {s.lower_bound_bytes} ({s.status.value}, {s.solver})"
    )
    if budget is not None and s.height_bytes is not None and s.height_bytes > budget:
        text += f"; exceeds the {a.tier} budget {budget} by {s.height_bytes - budget} bytes"
    return text
