"""What the training executor does around each step, derived once from a plan: drop, swap out, release,
prefetch, arrive, recompute, re-run a checkpointed block, rebuild a split's rows, and the schedule pass's
evictions and reloads (its `evict` and `swap_in` events).

The remat decision names ops by id; `step_actions` turns them into steps of the plan's effective order, so
the interpreter (`memplan.runtime.executor`) walks steps only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from memplan.ir.graph import Graph
from memplan.ir.phases import last_reads, phases
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan
from memplan.runtime.writes import last_forward_writes


@dataclass
class StepActions:
    """What happens around each step, derived once from the plan."""

    drop_after: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    swap_out: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    release: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    prefetch: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    arrive: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    recompute: dict[int, list[tuple[int, tuple[int, ...], frozenset[int]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Step -> (value, ops to re-run, the storages those ops may rebuild: the value and its transients)."""
    views: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Ops that rebuild the views of a swapped value once it is back."""
    split: dict[int, list[tuple[int, tuple[int, ...], int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Step -> (value, its closure, rows swapped) for the split values rebuilt there."""
    swap_rows: dict[int, int] = field(default_factory=dict)
    """Split value -> how many of its leading rows go to the tier."""
    reruns: dict[int, list[tuple[tuple[int, ...], frozenset[int], dict[int, list[int]]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Step -> checkpointed blocks re-run there: (ops, storages they rebuild, transients to drop after an
    op)."""
    evict: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    """Step -> storages the schedule pass sends off the device after it (written out, or dropped when the
    next tier's copy is current)."""
    load: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    """Step -> storages the schedule pass reads back onto the device before it."""


def step_actions(plan: Plan, graph: Graph) -> StepActions:
    """Drop points from the device residency; swap and recompute points from the pass's decisions (its op
    ids turned into steps of `graph`, the plan's effective order)."""
    sch = StepActions()
    remat = plan.decisions.remat
    decided = {t.value_id: t for t in (remat.tensors if remat else ())}
    moved = {vid for vid, t in decided.items() if t.decision != "keep"}
    step_of = {op.id: i for i, op in enumerate(graph.ops)}
    n = len(plan.ops)
    written = last_forward_writes(graph, phases(graph).fwd_end)
    for iv in plan.residency:
        if iv.tier == "device" and iv.value_id not in moved and iv.end < n:
            sch.drop_after[iv.end - 1].append(iv.value_id)
    for e in plan.events:  # the schedule pass's replacement (remat's own moves are in its record)
        if e.value_id is not None and e.value_id not in decided:
            if e.kind == "evict" and e.src_tier == "device":
                sch.evict[e.step].append(e.value_id)
            elif e.kind == "swap_in" and e.dst_tier == "device":
                sch.load[e.step].append(e.value_id)
    for vid, t in decided.items():
        ops = tuple(step_of[i] for i in t.recompute_ops)
        if t.decision in ("swap", "split"):  # copied out once its forward writes are done
            views = tuple(step_of[i] for i in t.view_ops)
            _schedule_swap(sch, vid, t, views, max(t.produced, written.get(vid, -1)))
        if t.decision == "split":
            sch.swap_rows[vid] = t.swap_rows
            sch.split[t.first_bwd_use].append((vid, ops, t.swap_rows))
        elif t.decision == "recompute" and t.block is not None:
            sch.drop_after[t.last_fwd_use].append(vid)  # its block's re-run rebuilds it
        elif t.decision == "recompute":
            _schedule_recompute(sch, vid, t, ops)
        if t.decision != "keep" and t.last_use + 1 < n:
            sch.drop_after[t.last_use].append(vid)
    for b in remat.blocks if remat else ():  # checkpointed blocks: one re-run each
        ops = tuple(step_of[i] for i in b.ops)
        rebuilt = frozenset([*b.members, *b.transient])
        # Each transient goes after its last read in the re-run, so the re-run's live transients never pass
        # its worst moment, which the plan counts (holding that set through the step put later transients
        # beside it: Whisper's decoder layers went 1.6% over their budget).
        drops = last_reads(graph, ops, b.transient)
        sch.reruns[b.rebuild_step].append((ops, rebuilt, drops))
    return sch


def _schedule_swap(
    sch: StepActions, vid: int, t: TensorRemat, view_steps: tuple[int, ...], final: int
) -> None:
    sch.swap_out[final + 1].append(vid)
    sch.release[t.write_done_step].append(vid)
    sch.prefetch[t.prefetch_step].append(vid)
    sch.arrive[t.first_bwd_use].append(vid)
    sch.views[vid] = view_steps


def _schedule_recompute(sch: StepActions, vid: int, t: TensorRemat, ops: tuple[int, ...]) -> None:
    """Dropped after its last forward use, rebuilt before its first backward use; the values rebuilt on the
    way (not saved activations themselves) are dropped right after that step."""
    sch.drop_after[t.last_fwd_use].append(vid)
    sch.recompute[t.first_bwd_use].append((vid, ops, frozenset([vid, *t.recompute_transient])))
    sch.drop_after[t.first_bwd_use].extend(t.recompute_transient)


def rerun_ops(sch: StepActions) -> set[int]:
    """The ops the plan runs a second time: recompute closures, block re-runs, views redone on arrival."""
    ops = {i for at_step in sch.recompute.values() for _, o, _ in at_step for i in o}
    ops |= {i for at_step in sch.reruns.values() for o, _, _ in at_step for i in o}
    return ops | {i for o in sch.views.values() for i in o}
