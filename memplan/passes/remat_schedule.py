"""Turn `remat_swap`'s keep / swap / recompute / split decisions into a plan: the residency of every storage
on every tier, the event schedule (recomputes before their first backward use, transfers on one link per
direction, stalls where a transfer is late), and the decisions in `Plan.decisions["remat_swap"]`, which
the executor (`memplan.runtime.executor`) follows, as a typed `RematDecision` (op ids, schedule steps).

It composes: it starts from the plan it is given (whatever earlier passes placed or moved stays as it was;
only the candidates' device intervals are replaced) and keeps the earlier passes' events, shifted in time
by the stalls and recomputes it inserts.

A member of a checkpointed block (`remat_blocks`) is dropped after its last forward use and rebuilt, with
the rest of the block, by one re-run of the block's forward at the block's rebuild step.

A split of c swapping k of its rows is timed and placed like a swap of k rows plus a recompute of the
other rows: the tier holds k rows, the device buffer for all of c comes back at the prefetch step (the
swapped rows are read into it, the recomputed rows written into it), and the rebuild's transients are the
closure's, scaled to the recomputed rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from memplan.ir.analysis import Interval
from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware, Tier
from memplan.passes.remat_blocks import Block
from memplan.passes.remat_candidates import Candidate
from memplan.plans.decisions import BlockRemat, RematDecision, TensorRemat
from memplan.plans.effective import predictions_for
from memplan.plans.plan import Event, Plan

Decision = Literal["keep", "swap", "recompute", "split"]


@dataclass(frozen=True, slots=True)
class Choice:
    """What happens to one candidate; `swap_rows` is how many of its leading rows a split swaps."""

    decision: Decision
    swap_rows: int = 0
    block: int | None = None
    """For a recompute: the layer whose checkpointed block rebuilds it (None: its own closure does)."""

    def rebuilt_share(self, c: Candidate) -> float:
        """Share of c its own closure recomputes: all of it for a recompute, the unswapped rows for a split,
        none for a member of a checkpointed block (the block's re-run rebuilds it)."""
        if self.block is not None:
            return 0.0
        if self.decision == "recompute":
            return 1.0
        return (c.rows - self.swap_rows) / c.rows if self.decision == "split" else 0.0

    def swapped_bytes(self, c: Candidate) -> int:
        if self.decision == "split":
            return c.size_bytes // c.rows * self.swap_rows
        return c.size_bytes if self.decision == "swap" else 0


def decided_residency(
    graph: Graph,
    start: Sequence[Interval],
    cands: list[Candidate],
    choice: list[Choice],
    tier: Tier | None,
    blocks: Sequence[Block] = (),
) -> list[Interval]:
    """The `start` residency (the plan so far), with each moved candidate's device interval replaced by
    its profile, and the transients of the checkpointed `blocks` at their rebuild steps."""
    moved = {c.value_id: (c, ch) for c, ch in zip(cands, choice, strict=True) if ch.decision != "keep"}
    out = [iv for iv in start if not (iv.value_id in moved and iv.tier == "device")]
    rebuild = {b.layer: b.rebuild_step for b in blocks}
    hold: dict[int, int] = {}
    for b in blocks:
        for vid, _, _ in b.held:
            hold[vid] = max(hold.get(vid, 0), b.rebuild_step + 1)
    out = [
        replace(iv, end=max(iv.end, hold[iv.value_id])) if iv.value_id in hold and iv.tier == "device" else iv
        for iv in out
    ]
    for b in blocks:
        out += [
            Interval(t, "device", b.rebuild_step, b.rebuild_step + 1, graph.value(t).size_bytes)
            for t in b.peak_transient
        ]
    for c, ch in moved.values():
        size = c.size_bytes
        if ch.block is not None:
            out.append(Interval(c.value_id, "device", c.produced, c.last_fwd_use + 1, size))
            out.append(Interval(c.value_id, "device", rebuild[ch.block], c.last_use + 1, size))
        elif ch.decision in ("swap", "split"):
            assert tier is not None
            out.append(
                Interval(c.value_id, "device", c.produced, max(c.last_fwd_use + 1, c.swap_write_done), size)
            )
            out.append(Interval(c.value_id, tier.name, c.produced, c.first_bwd_use + 1, ch.swapped_bytes(c)))
            out.append(Interval(c.value_id, "device", c.prefetch_step, c.last_use + 1, size))
        else:
            out.append(Interval(c.value_id, "device", c.produced, c.last_fwd_use + 1, size))
            out.append(Interval(c.value_id, "device", c.first_bwd_use, c.last_use + 1, size))
        share = ch.rebuilt_share(c)
        for t in c.recompute_transient if share else ():
            nbytes = graph.value(t).size_bytes
            rebuilt = nbytes if share == 1.0 else nbytes // c.rows * (c.rows - ch.swap_rows)
            out.append(Interval(t, "device", c.first_bwd_use, c.first_bwd_use + 1, rebuilt))
    return _merge(out)


def _merge(ivs: list[Interval]) -> list[Interval]:
    """Join touching or overlapping intervals of the same value on the same tier."""
    ivs = sorted(ivs, key=lambda iv: (iv.value_id, iv.tier, iv.start))
    out: list[Interval] = []
    for iv in ivs:
        last = out[-1] if out else None
        if last and last.value_id == iv.value_id and last.tier == iv.tier and iv.start <= last.end:
            out[-1] = replace(last, end=max(last.end, iv.end))
        else:
            out.append(iv)
    return out


GPU_COMPUTE_SHARE = 0.01
"""Swaps hidden under compute by a GPU's copy engines still cost this share of their transfer time
(contention, synchronisation)."""


def compute_share(hw: Hardware, tier: Tier | None) -> float:
    """Share of a transfer's seconds that delays compute: the tier's measured `compute_share`, else all of it
    on a CPU device (the memcpy and checksum of a swap take the cores the ops need) and
    `GPU_COMPUTE_SHARE` on a GPU."""
    if tier is not None and tier.compute_share is not None:
        return tier.compute_share
    return GPU_COMPUTE_SHARE if hw.device_kind == "cuda" else 1.0


def _events(
    plan: Plan,
    hw: Hardware,
    cands: list[Candidate],
    choice: list[Choice],
    tier: Tier | None,
    blocks: Sequence[Block] = (),
) -> list[Event]:
    """The plan's compute events with recomputes inserted before their first backward use, and transfer
    events on one link per direction (FIFO); a read not done by its use, or a write not done when its
    device copy is due to be freed, stalls compute. Each transfer also delays compute by its
    `compute_share` of its duration. The plan's other events stay at their steps, shifted with them."""
    by_step: dict[int, list[tuple[str, Candidate, Choice]]] = defaultdict(list)
    for c, ch in zip(cands, choice, strict=True):
        if ch.decision in ("swap", "split"):
            by_step[c.produced + 1].append(("swap_out", c, ch))
            by_step[c.prefetch_step].append(("prefetch", c, ch))
            by_step[max(c.last_fwd_use + 1, c.swap_write_done)].append(("write_due", c, ch))
            by_step[c.first_bwd_use].append(("read_due", c, ch))
        if ch.decision in ("recompute", "split") and ch.block is None:
            by_step[c.first_bwd_use].append(("recompute", c, ch))
    block_at: dict[int, list[Block]] = defaultdict(list)
    for b in blocks:
        block_at[b.rebuild_step].append(b)
    order = {"swap_out": 0, "write_due": 1, "prefetch": 2, "read_due": 3, "recompute": 4}  # as the executor
    events: list[Event] = []
    now, link_out, link_in = 0.0, 0.0, 0.0
    done: dict[tuple[str, int], float] = {}
    share = compute_share(hw, tier)
    computes = sorted((e for e in plan.events if e.kind == "compute"), key=lambda e: e.step)
    shift: dict[int, float] = {}
    for i, ce in enumerate(computes):
        for kind, c, ch in sorted(by_step.get(i, []), key=lambda e: order[e[0]]):
            if kind == "recompute":
                now = _recompute(c, ch, i, computes[c.recompute_ops[-1]].op_id, now, events)
                continue
            now, link_out, link_in = _event(kind, c, ch, i, now, link_out, link_in, done, tier, events)
            if kind in ("swap_out", "prefetch"):
                now += share * events[-1].duration_s
        for b in block_at.get(i, ()):  # one re-run of the block's forward rebuilds all its members
            events.append(
                Event(
                    "recompute",
                    i,
                    op_id=computes[b.ops[-1]].op_id,
                    value_id=b.members[0],
                    start_s=now,
                    duration_s=b.recompute_s,
                )
            )
            events += [Event("recompute", i, value_id=v, start_s=now) for v in (*b.members[1:], *b.transient)]
            now += b.recompute_s
        shift[i] = now - ce.start_s
        events.append(replace(ce, start_s=now))
        now += ce.duration_s
    earlier = [
        replace(e, start_s=e.start_s + shift.get(e.step, 0.0)) for e in plan.events if e.kind != "compute"
    ]
    return sorted([*earlier, *events], key=lambda e: (e.step, e.kind == "compute"))


def _recompute(
    c: Candidate, ch: Choice, step: int, op_id: int | None, now: float, events: list[Event]
) -> float:
    """One event for the value (named by the op that makes it), zero-length ones for the transients rebuilt
    with it; returns the time after it."""
    dur = c.recompute_s * ch.rebuilt_share(c)
    events.append(Event("recompute", step, op_id=op_id, value_id=c.value_id, start_s=now, duration_s=dur))
    events.extend(Event("recompute", step, value_id=t, start_s=now) for t in c.recompute_transient)
    return now + dur


def _event(
    kind: str,
    c: Candidate,
    ch: Choice,
    step: int,
    now: float,
    link_out: float,
    link_in: float,
    done: dict[tuple[str, int], float],
    tier: Tier | None,
    events: list[Event],
) -> tuple[float, float, float]:
    """A transfer (swap_out, prefetch) on its link, or a wait for one to be done (write_due, read_due)."""
    assert tier is not None
    if kind in ("swap_out", "prefetch"):
        out = kind == "swap_out"
        start = max(now, link_out if out else link_in)
        dur = ch.swapped_bytes(c) / (tier.write_bw if out else tier.read_bw) + tier.latency_s
        src, dst = ("device", tier.name) if out else (tier.name, "device")
        events.append(
            Event(kind, step, value_id=c.value_id, src_tier=src, dst_tier=dst, start_s=start, duration_s=dur)
        )
        done[("w" if out else "r", c.value_id)] = start + dur
        return (now, start + dur, link_in) if out else (now, link_out, start + dur)
    key = ("w", c.value_id) if kind == "write_due" else ("r", c.value_id)
    return max(now, done.get(key, now)), link_out, link_in


def apply_decisions(
    graph: Graph,
    hw: Hardware,
    plan: Plan,
    cands: list[Candidate],
    choice: list[Choice],
    tier: Tier | None,
    blocks: Sequence[Block] = (),
) -> Plan:
    """The plan with these decisions: its residency and events updated, its `RematDecision` set."""
    residency = decided_residency(graph, plan.residency, cands, choice, tier, blocks)
    events = _events(plan, hw, cands, choice, tier, blocks)
    decision = remat_decision(graph, cands, choice, tier, blocks)
    return plan.with_(
        residency=tuple(residency),
        events=tuple(events),
        decisions=plan.decisions.with_(remat=decision),
        predictions=predictions_for(graph, residency, events),
    )


def remat_decision(
    graph: Graph,
    cands: list[Candidate],
    choice: list[Choice],
    tier: Tier | None,
    blocks: Sequence[Block] = (),
) -> RematDecision:
    """The typed record of the decisions: steps as they are, ops by id (graph positions are steps)."""
    ids = [op.id for op in graph.ops]

    def op_ids(steps: Sequence[int]) -> tuple[int, ...]:
        return tuple(ids[i] for i in steps)

    tensors = tuple(
        TensorRemat(
            value_id=c.value_id,
            name=graph.value(c.value_id).name,
            decision=ch.decision,
            size_bytes=c.size_bytes,
            layer=c.layer,
            produced=c.produced,
            last_fwd_use=c.last_fwd_use,
            first_bwd_use=c.first_bwd_use,
            last_use=c.last_use,
            write_done_step=max(c.last_fwd_use + 1, c.swap_write_done),
            prefetch_step=c.prefetch_step,
            recompute_ops=op_ids(c.recompute_ops) if ch.rebuilt_share(c) else (),
            recompute_transient=tuple(c.recompute_transient) if ch.rebuilt_share(c) else (),
            view_ops=op_ids(c.view_ops),
            rows=c.rows,
            swap_rows=ch.swap_rows,
            block=ch.block,
        )
        for c, ch in zip(cands, choice, strict=True)
    )
    records = tuple(
        BlockRemat(
            b.layer,
            b.rebuild_step,
            op_ids(b.ops),
            tuple(b.members),
            tuple(b.transient),
            tuple(b.peak_transient),
        )
        for b in blocks
    )
    return RematDecision(tier.name if tier else None, tensors, records)
