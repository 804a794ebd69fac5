"""`verify_plan`: replay a plan's schedule and check its invariants, independently of whoever made it.

Checks, each with its own failure kind:
- `use-before-def`: an op reads a storage that is not resident on the device at that step;
- `over-capacity`: a tier's live bytes exceed its budget (or capacity) at some step;
- `overlap`: two storages live on the same tier at the same time share bytes of the arena;
- `offset-bounds`: an offset places a storage outside its tier's arena;
- `prefetch-late`: a storage comes back to the device with no transfer or recompute event by then;
- `bad-reference`: a residency, offset or event names a value or op that does not exist;
- `bad-decision`: a pass's decision record contradicts the plan (`memplan.plans.verify_decisions`).

It reads the plan's effective graph (`plan.graph()`), so it checks the order and sizes the passes chose.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from memplan.ir.analysis import Interval, timeline
from memplan.ir.graph import Graph
from memplan.plans.plan import Plan
from memplan.plans.verify_decisions import Violation, check_decisions, missing_offsets, order_permutation

__all__ = ["VerifyReport", "Violation", "missing_offsets", "verify_plan"]
_ARRIVALS = ("prefetch", "swap_in", "recompute")


@dataclass(frozen=True)
class VerifyReport:
    violations: tuple[Violation, ...]
    checked: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations


def verify_plan(plan: Plan, max_per_kind: int = 20) -> VerifyReport:
    """Every check above; at most `max_per_kind` violations of each kind are reported."""
    not_ordered = order_permutation(plan)
    if not_ordered:  # nothing else can be replayed without an order
        return VerifyReport(tuple(not_ordered), ("decisions",))
    graph = plan.graph()
    found: list[Violation] = []
    for check in (_references, _uses, _capacity, _offsets, _arrivals, check_decisions):
        vs = check(plan, graph)
        found.extend(vs[:max_per_kind])
    return VerifyReport(tuple(found), ("references", "uses", "capacity", "offsets", "arrivals", "decisions"))


def _references(plan: Plan, graph: Graph) -> list[Violation]:
    ids = {v.id for v in plan.tensors}
    out = [
        Violation("bad-reference", f"residency names unknown value {iv.value_id}")
        for iv in plan.residency
        if iv.value_id not in ids
    ]
    out += [
        Violation("bad-reference", f"offset on {t} for unknown value {vid}")
        for t, m in plan.offsets.items()
        for vid in m
        if vid not in ids
    ]
    n = len(plan.ops)
    out += [
        Violation("bad-reference", f"event {e.kind} at step {e.step} outside the schedule (0..{n - 1})")
        for e in plan.events
        if not 0 <= e.step < max(n, 1)
    ]
    return out


def _device_spans(plan: Plan) -> dict[int, list[tuple[int, int]]]:
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for iv in plan.residency:
        if iv.tier == "device":
            spans[iv.value_id].append((iv.start, iv.end))
    return spans


def _uses(plan: Plan, graph: Graph) -> list[Violation]:
    spans = _device_spans(plan)
    out = []
    for step, op in enumerate(graph.ops):
        for vid in (*op.inputs, *op.outputs):
            root = graph.storage_of(vid)
            if graph.value(root).size_bytes == 0:
                continue
            if not any(s <= step < e for s, e in spans.get(root, ())):
                what = "reads" if vid in op.inputs else "writes"
                out.append(
                    Violation(
                        "use-before-def",
                        f"step {step} ({op.name}) {what} {graph.value(vid).name}, whose storage "
                        f"{graph.value(root).name} is not on the device then",
                    )
                )
    return out


def _capacity(plan: Plan, graph: Graph) -> list[Violation]:
    out = []
    n = max(len(graph.ops), 1)
    for tier, live in timeline(plan.residency, n).items():
        limit = plan.budget_bytes.get(tier)
        if limit is None and plan.hardware.has_tier(tier):
            limit = plan.hardware.tier(tier).capacity_bytes
        if limit is None:
            out.append(Violation("bad-reference", f"residency on tier {tier!r}, which the hardware lacks"))
            continue
        over = np.nonzero(live > limit)[0]
        if len(over):
            s = int(over[0])
            out.append(
                Violation(
                    "over-capacity",
                    f"{tier}: {int(live[s])} bytes live at step {s} "
                    f"(and {len(over) - 1} more steps) over its limit of {limit} bytes",
                    tier,
                )
            )
    return out


def _offsets(plan: Plan, graph: Graph) -> list[Violation]:
    out = []
    by_tier: dict[str, list[Interval]] = defaultdict(list)
    for iv in plan.residency:
        by_tier[iv.tier].append(iv)
    for tier, offs in plan.offsets.items():
        arena = plan.predictions.arena_bytes.get(tier)
        placed = [(iv, offs[iv.value_id]) for iv in by_tier.get(tier, []) if iv.value_id in offs]
        for iv, off in placed:
            if off < 0 or (arena is not None and off + iv.size_bytes > arena):
                out.append(
                    Violation(
                        "offset-bounds",
                        f"{tier}: value {iv.value_id} at [{off}, "
                        f"{off + iv.size_bytes}) outside the arena of {arena} bytes",
                    )
                )
        out.extend(_overlaps(tier, placed))
    return out


def _overlaps(tier: str, placed: list[tuple[Interval, int]]) -> list[Violation]:
    """Sweep over time; among intervals live together, sort by offset and compare neighbours' extents."""
    out: list[Violation] = []
    events = sorted(placed, key=lambda p: p[0].start)
    active: list[tuple[Interval, int]] = []
    for iv, off in events:
        active = [(a, o) for a, o in active if a.end > iv.start]
        for a, o in active:
            if a.value_id != iv.value_id and o < off + iv.size_bytes and off < o + a.size_bytes:
                out.append(
                    Violation(
                        "overlap",
                        f"{tier}: values {a.value_id} [{o}, {o + a.size_bytes}) and "
                        f"{iv.value_id} [{off}, {off + iv.size_bytes}) overlap while both are live",
                    )
                )
        active.append((iv, off))
    return out


def _arrivals(plan: Plan, graph: Graph) -> list[Violation]:
    """A device interval must start where the value is produced (or at step 0 for state and inputs), or be
    preceded by an arrival event (prefetch, swap_in, recompute) at or before its start."""
    arrivals: dict[int, list[int]] = defaultdict(list)
    for e in plan.events:
        if e.kind in _ARRIVALS and e.value_id is not None:
            arrivals[e.value_id].append(e.step)
    out = []
    for vid, spans in _device_spans(plan).items():
        if vid not in {v.id for v in plan.tensors}:
            continue
        born = graph.producer(vid)
        for s, _ in spans:
            if s == (born if born is not None else 0):
                continue
            if not any(a <= s for a in arrivals.get(vid, ())):
                out.append(
                    Violation(
                        "prefetch-late",
                        f"value {vid} ({graph.value(vid).name}) is on the device "
                        f"from step {s} with no prefetch, swap-in or recompute event by then",
                    )
                )
    return out
