"""From the MILP's columns back to decisions: each candidate's keep / swap / recompute / split, the
checkpointed blocks, the pass's notes and its solver report."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from memplan.ir.hardware import Tier
from memplan.passes.remat_blocks import Block
from memplan.passes.remat_candidates import Candidate
from memplan.passes.remat_formulation import BLOCKS, Space
from memplan.passes.remat_schedule import Choice
from memplan.plans.plan import SolverReport
from memplan.solvers.milp import MilpResult


def decode(x: np.ndarray, space: Space) -> tuple[list[Choice], list[Block]]:
    """Each candidate's decision, and the checkpointed blocks (their members: recompute, with the block's
    layer). A split's share of rows rounds up to whole rows (fewer rows to rebuild, so smaller transients
    than the MILP counted), to a plain swap or recompute at the ends, whose profiles free at least as
    much."""
    cands, groups = space.cands, space.groups
    g_count = len(groups)
    out = [Choice("keep")] * len(cands)
    chosen = [
        space.blocks[j]
        for k, ms in enumerate(space.block_groups)
        if x[BLOCKS * g_count + k] > 0.5
        for j in ms
    ]
    index = {c.value_id: i for i, c in enumerate(cands)}
    for b in chosen:
        for vid in b.members:
            out[index[vid]] = Choice("recompute", block=b.layer)
    for g, members in enumerate(groups):
        for i in members:
            if out[i].block is not None:
                continue
            if x[g] > 0.5:
                out[i] = Choice("swap")
            elif x[g_count + g] > 0.5:
                out[i] = Choice("recompute")
            elif x[2 * g_count + g] > 0.5:
                k = math.ceil(float(x[3 * g_count + g]) * cands[i].rows - 1e-6)
                out[i] = (
                    Choice("recompute")
                    if k <= 0
                    else Choice("swap")
                    if k >= cands[i].rows
                    else Choice("split", k)
                )
    return out, chosen


def summary_notes(
    cands: list[Candidate], choice: list[Choice], chosen: list[Block], per_layer: bool, tier: Tier | None
) -> tuple[str, ...]:
    count: dict[str, int] = defaultdict(int)
    size: dict[str, int] = defaultdict(int)
    split_swapped = 0
    for c, ch in zip(cands, choice, strict=True):
        count[ch.decision] += 1
        size[ch.decision] += c.size_bytes
        split_swapped += ch.swapped_bytes(c) if ch.decision == "split" else 0
    mib = 2**20
    split = ", ".join(
        f"{d} {count[d]} ({size[d] / mib:.1f} MiB)" for d in ("keep", "swap", "recompute", "split")
    )
    form = (
        "per-layer (shared decisions across repeated layers)"
        if per_layer
        else "exact (one decision per tensor)"
    )
    notes = [f"{len(cands)} saved activations: {split}"]
    if chosen:
        layers = ", ".join(str(b.layer) for b in chosen)
        notes.append(
            f"checkpointed blocks (forward re-run once at the start of their backward): layers {layers}"
        )
    if count["split"]:
        notes.append(
            f"split tensors: {split_swapped / mib:.1f} of {size['split'] / mib:.1f} MiB swapped by rows, "
            "the other rows recomputed"
        )
    return (*notes, f"formulation: {form}", f"swap tier: {tier.name if tier else 'none'}")


def solver_report(r: MilpResult) -> SolverReport:
    return SolverReport("highs-milp", r.status, r.objective, r.bound, r.gap, r.time_s, r.time_limit_s)
