"""Consistency of a plan's typed decisions with the plan itself (failure kind `bad-decision`).

- order: a permutation of the op ids in which every op comes after the producers of what it reads;
- bits: known formats, on storages (not views) that exist, at most one record per tensor; candidates
  priced for their tensor, the chosen format among them, tied tensors at one format;
- kv: non-negative token budgets at a supported bit width;
- remat: every tensor exists, its steps are ordered, its ops exist, the swap tier is a tier of the
  hardware and holds the swapped part; a split swaps between 1 and rows - 1 rows;
- placement: a placed storage exists, lives on a tier the hardware has, and resides there;
- allocate: one arena per packed tier whose size is the predicted arena, every resident storage on a
  packed tier has an offset (`missing_offsets`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from memplan.ir.graph import Graph, Value
from memplan.plans.decisions import (
    DTYPE_FORMAT,
    FORMAT_BITS,
    KV_BITS,
    BitsDecision,
    DeviceCopy,
    RematDecision,
    TensorRemat,
)
from memplan.plans.plan import Plan

ViolationKind = Literal[
    "use-before-def",
    "over-capacity",
    "overlap",
    "offset-bounds",
    "prefetch-late",
    "bad-reference",
    "bad-decision",
]


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: its kind, a message naming what and where, and the tier when it has one."""

    kind: ViolationKind
    message: str
    tier: str | None = None


def check_decisions(plan: Plan, graph: Graph) -> list[Violation]:
    """Every check of the module docstring, on `graph` (the plan's effective graph)."""
    found = _order(plan, graph) + _bits(plan) + _kv(plan) + _placement(plan)
    if plan.decisions.remat is not None:
        found += _remat(plan, graph, plan.decisions.remat)
    return found + _allocate(plan)


def _bad(message: str, tier: str | None = None) -> Violation:
    return Violation("bad-decision", message, tier)


def order_permutation(plan: Plan) -> list[Violation]:
    """The order decision, if any, must be a permutation of the plan's op ids (else no effective graph)."""
    order = plan.decisions.order
    ids = sorted(op.id for op in plan.ops)
    if order is None or sorted(order.op_ids) == ids:
        return []
    return [_bad(f"order: {len(order.op_ids)} op ids, not a permutation of the plan's {len(ids)} ops")]


def _order(plan: Plan, graph: Graph) -> list[Violation]:
    """Every op after the producers of what it reads (`graph` is the effective graph: a permutation)."""
    if plan.decisions.order is None:
        return []
    out = []
    for step, op in enumerate(graph.ops):
        for vid in op.inputs:
            born = graph.producer(vid)
            if born is not None and born >= step:
                out.append(
                    _bad(
                        f"order: op {op.name} at step {step} reads {graph.value(vid).name} first "
                        f"written at step {born}"
                    )
                )
    return out


def _bits(plan: Plan) -> list[Violation]:
    bits = plan.decisions.bits
    if bits is None:
        return []
    values = {v.id: v for v in plan.tensors}
    out = []
    for vid, n in Counter(b.value_id for b in bits.tensors).items():
        if n > 1:
            out.append(_bad(f"bits: {n} records for value {vid}"))
    for b in bits.tensors:
        v = values.get(b.value_id)
        if v is None or v.alias_of is not None:
            out.append(_bad(f"bits: value {b.value_id} is not a storage of the plan"))
        if b.format not in FORMAT_BITS:
            out.append(_bad(f"bits: unknown format {b.format!r} for value {b.value_id}"))
        if b.group_size is not None and b.group_size <= 0:
            out.append(_bad(f"bits: group size {b.group_size} of value {b.value_id} is not positive"))
    return out + _candidates(bits, values)


def _candidates(bits: BitsDecision, values: dict[int, Value]) -> list[Violation]:
    """Candidates priced on storages of the plan at their stored bytes; a chosen format among its tensor's
    candidates; tied tensors at one label."""
    out = []
    chosen: dict[int, str] = {}
    for t in bits.candidates:
        v = values.get(t.value_id)
        if v is None or v.alias_of is not None:
            out.append(_bad(f"bits: candidates for value {t.value_id}, not a storage of the plan"))
            continue
        for c in t.candidates:
            if c.bits.value_id != t.value_id or c.stored_bytes != c.bits.stored_bytes(v.shape):
                out.append(_bad(f"bits: candidate {c.label} of {v.name} is not priced for it"))
        picked = bits.of(t.value_id)
        own = DTYPE_FORMAT.get(v.dtype)
        match = [c.label for c in t.candidates if (c.bits == picked if picked else c.bits.format == own)]
        if not match:
            out.append(_bad(f"bits: the format chosen for {v.name} is none of its candidates"))
        chosen[t.value_id] = match[0] if match else "?"
    for group in bits.ties:
        labels = {chosen.get(vid, "?") for vid in group}
        if len(labels) > 1:
            out.append(_bad(f"bits: tied values {list(group)} are stored as {', '.join(sorted(labels))}"))
    return out


def _kv(plan: Plan) -> list[Violation]:
    kv = plan.decisions.kv
    if kv is None:
        return []
    return [
        _bad(f"kv: layer {k.layer} head {k.head}: {k.tokens} tokens at {k.bits} bits")
        for k in kv.budgets
        if k.tokens < 0 or (k.bits is not None and k.bits not in KV_BITS)
    ]


def _placement(plan: Plan) -> list[Violation]:
    placement = plan.decisions.placement
    if placement is None:
        return []
    ids = {v.id for v in plan.tensors}
    resident = {(iv.value_id, iv.tier) for iv in plan.residency}
    out = []
    for p in placement.tensors:
        if p.value_id not in ids:
            out.append(_bad(f"placement: unknown value {p.value_id}"))
        elif not plan.hardware.has_tier(p.tier):
            out.append(_bad(f"placement: value {p.value_id} on tier {p.tier!r}, which the hardware lacks"))
        elif (p.value_id, p.tier) not in resident:
            out.append(
                _bad(f"placement: value {p.value_id} placed on {p.tier} has no residency there", p.tier)
            )
        out += _copies(p.value_id, p.copies, len(plan.ops))
    return out


def _copies(vid: int, copies: tuple[DeviceCopy, ...], steps: int) -> list[Violation]:
    """Device copies in step order, each within the schedule, none overlapping the next."""
    prev_end = -1
    for c in copies:
        if not 0 <= c.prefetch_step <= c.evict_step < steps or c.prefetch_step <= prev_end:
            return [
                _bad(f"placement: value {vid}: device copy {c.prefetch_step}..{c.evict_step} out of order")
            ]
        prev_end = c.evict_step
    return []


def _remat(plan: Plan, graph: Graph, remat: RematDecision) -> list[Violation]:
    ids = {v.id for v in plan.tensors}
    op_ids = {op.id for op in plan.ops}
    out = []
    if remat.tier is not None and not plan.hardware.has_tier(remat.tier):
        out.append(_bad(f"remat: swap tier {remat.tier!r} is not a tier of the hardware"))
    on_tier = {iv.value_id for iv in plan.residency if iv.tier == remat.tier}
    for t in remat.tensors:
        if t.value_id not in ids:
            out.append(_bad(f"remat: unknown value {t.value_id}"))
            continue
        out += _remat_tensor(t, op_ids, len(graph.ops))
        if t.decision in ("swap", "split") and t.value_id not in on_tier:
            out.append(_bad(f"remat: {t.name} is swapped but has no residency on {remat.tier}"))
    for b in remat.blocks:
        if not set(b.ops) <= op_ids or not set(b.members) <= ids:
            out.append(_bad(f"remat: checkpointed block of layer {b.layer} names unknown ops or values"))
    return out


def _remat_tensor(t: TensorRemat, op_ids: set[int], n_steps: int) -> list[Violation]:
    out = []
    if not t.produced <= t.last_fwd_use < t.first_bwd_use <= t.last_use < n_steps:
        out.append(
            _bad(
                f"remat: {t.name}: steps produced {t.produced}, last forward use {t.last_fwd_use}, "
                f"first backward use {t.first_bwd_use}, last use {t.last_use} are out of order"
            )
        )
    if not set(t.recompute_ops) | set(t.view_ops) <= op_ids:
        out.append(_bad(f"remat: {t.name}: recompute or view ops name unknown op ids"))
    if t.decision == "split" and not 0 < t.swap_rows < t.rows:
        out.append(_bad(f"remat: {t.name}: a split swaps {t.swap_rows} of {t.rows} rows"))
    if t.decision == "recompute" and t.block is None and not t.recompute_ops:
        out.append(_bad(f"remat: {t.name} is recomputed with no ops to re-run"))
    return out


def _allocate(plan: Plan) -> list[Violation]:
    alloc = plan.decisions.allocate
    if alloc is None:
        return []
    out = []
    for tier, n in Counter(a.tier for a in alloc.arenas).items():
        if n > 1:
            out.append(_bad(f"allocate: {n} arenas on {tier}", tier))
    for a in alloc.arenas:
        predicted = plan.predictions.arena_bytes.get(a.tier)
        if predicted != a.size_bytes:
            out.append(_bad(f"allocate: arena {a.id} is {a.size_bytes} bytes, predicted {predicted}", a.tier))
    return out + missing_offsets(plan)


def missing_offsets(plan: Plan, every_tier: bool = False) -> list[Violation]:
    """Storages resident on a tier that has offsets (with `every_tier`: on any tier) but no offset."""
    return [
        _bad(f"allocate: storage {iv.value_id} resident on {iv.tier} has no offset", iv.tier)
        for iv in plan.residency
        if (every_tier or iv.tier in plan.offsets) and iv.value_id not in plan.offsets.get(iv.tier, {})
    ]
