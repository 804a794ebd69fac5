"""The MILP of the `remat_swap` pass: its decision space, columns, memory rows and logic rows.

Exact MILP (HiGHS, time limit, incumbent and gap reported). Per candidate c: binaries s (swap), r
(recompute), z (split) with s + r + z <= 1, and phi in [0, z], the share of c's rows a split swaps:

    minimise   sum_c  r_c * R_c + s_c * k * T_c + (z_c - phi_c) * R_c + phi_c * k * T_c
    s.t.       base(t) + sum_c size_c * ((s_c + z_c) * dS_c(t) + r_c * dR_c(t)) + transients <= budget
               r_c + z_c + r_a + z_a (+ s_a) <= 1   for each candidate a that c's rebuild reads
               sum_c (s_c + phi_c) * T_c <= link seconds available          (hiding needs a free link)

R_c is c's recompute time, T_c its transfer time (out and back), k the share of a transfer's time that
delays compute (`remat_schedule.compute_share`: the tier's measured share, else 1 on a CPU device and 0.01
on a GPU). The cost is linear in phi, so a split pays off only where the link's time binds: it fills the
link with part of a tensor and recomputes the rest. base(t) is the baseline live bytes (everything kept);
dS, dR in {-1, 0} are the steps where swapping or recomputing c frees it; a split frees c where a swap
does (timed as a whole-tensor swap, an upper bound on its part's transfer), and the transients of a
rebuild, (r_c + z_c - phi_c) times those of c's closure, land at its first backward use. Rows only at
steps where the baseline is over the budget or a transient lands, one per run of steps with the same
coefficients (the one with the largest base). For large models the per-layer formulation shares one
decision among the same tensor of every repeated layer (`Candidate.signature`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memplan.ir.hardware import Tier
from memplan.passes.remat_blocks import Block
from memplan.passes.remat_candidates import Candidate
from memplan.passes.remat_options import RematSwapOptions
from memplan.passes.remat_schedule import GPU_COMPUTE_SHARE
from memplan.solvers.milp import MilpProblem

MIB = float(2**20)


@dataclass(frozen=True)
class Space:
    """What the MILP decides over: candidates and checkpointable blocks, each in decision groups."""

    cands: list[Candidate]
    groups: list[list[int]]
    """Candidate indices that share one decision."""
    blocks: list[Block]
    block_groups: list[list[int]]
    """Block indices that share one decision."""

    @property
    def width(self) -> int:
        """Columns of the decisions: s, r, z, phi per candidate group, then one per block group."""
        return BLOCKS * len(self.groups) + len(self.block_groups)


@dataclass(frozen=True)
class Formulation:
    """The MILP over `space`."""

    space: Space
    problem: MilpProblem


def _profiles(c: Candidate, n: int, swap: bool) -> tuple[np.ndarray, np.ndarray]:
    """dS, dR: change in device bytes, in units of c's size, per step, if c is swapped (or split) /
    recomputed (without the rebuild's transient, which lands at its first backward use)."""
    ds = np.zeros(n)
    dr = np.zeros(n)
    if swap and c.can_swap:
        ds[max(c.last_fwd_use + 1, c.swap_write_done) : c.prefetch_step] = -1.0
    if c.can_recompute:
        dr[c.last_fwd_use + 1 : c.first_bwd_use] = -1.0
    return ds, dr


BLOCKS = 4
"""Column blocks of the MILP, G columns each: s (swap), r (recompute), z (split), phi (a split's swapped
share of rows)."""


def _coefficients(
    space: Space, base: np.ndarray, budget: int, tier: Tier | None
) -> tuple[np.ndarray, np.ndarray]:
    """Dense memory rows (one per kept step) over the columns [s | r | z | phi | blocks], and right-hand
    sides."""
    cands, groups = space.cands, space.groups
    n = len(base)
    steps = set(np.nonzero(base > budget)[0].tolist())
    steps |= {c.first_bwd_use for c in cands if c.transient_bytes}
    steps |= {b.rebuild_step for b in space.blocks}
    rows = np.array(sorted(steps), dtype=np.int64)
    g_count = len(groups)
    mat = np.zeros((len(rows), space.width))
    by_id = {c.value_id: c for c in cands}
    for k, members in enumerate(space.block_groups):
        col = BLOCKS * g_count + k
        for b in (space.blocks[j] for j in members):
            for vid in b.members:
                c = by_id[vid]
                gone = (rows > c.last_fwd_use) & (rows < b.rebuild_step)
                mat[gone, col] -= c.size_bytes
            mat[rows == b.rebuild_step, col] += b.transient_bytes
            for _, end, nbytes in b.held:  # counted per block: an upper bound where blocks share a value
                mat[(rows >= end) & (rows <= b.rebuild_step), col] += nbytes
    for g, members in enumerate(groups):
        s_, r_, z_, phi = g, g_count + g, 2 * g_count + g, 3 * g_count + g
        for i in members:
            c = cands[i]
            ds, dr = _profiles(c, n, tier is not None)
            mat[:, s_] += c.size_bytes * ds[rows]
            mat[:, z_] += c.size_bytes * ds[rows]
            mat[:, r_] += c.size_bytes * dr[rows]
            if c.transient_bytes:
                at_b = rows == c.first_bwd_use
                mat[at_b, r_] += c.transient_bytes
                mat[at_b, z_] += c.transient_bytes
                mat[at_b, phi] -= c.transient_bytes
    rhs = budget - base[rows].astype(np.float64)
    return _dedupe(mat, rhs)


def _dedupe(mat: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep one row per distinct coefficient pattern, with the tightest right-hand side."""
    if len(rhs) == 0:
        return mat, rhs
    uniq, inverse = np.unique(mat, axis=0, return_inverse=True)
    tight = np.full(len(uniq), np.inf)
    np.minimum.at(tight, inverse.ravel(), rhs)
    return uniq, tight


def formulate(
    space: Space,
    base: np.ndarray,
    budget: int,
    tier: Tier | None,
    opts: RematSwapOptions,
    link_s: float,
    swap_cost: float = GPU_COMPUTE_SHARE,
    min_peak: bool = False,
) -> Formulation:
    """Columns: s_g, r_g, z_g, phi_g for every group g, block by block, then one per block group (then the
    peak P in MiB when `min_peak`); rows: memory (in MiB, for conditioning), one decision per group, rebuild
    inputs, link. With `min_peak` the objective is the device peak itself, over every step: the lowest peak
    this pass can reach. A swap costs `swap_cost` times its transfer seconds (a small share where copies
    overlap compute, all of it where they run on the compute cores)."""
    cands, groups = space.cands, space.groups
    g_count, k_count = len(groups), len(space.block_groups)
    mem, mem_rhs = _coefficients(space, base, 0 if min_peak else budget, tier)
    logic, logic_rhs = _logic_rows(space, tier, link_s)
    extra = 1 if min_peak else 0
    mem = np.hstack([mem / MIB, -np.ones((len(mem), extra))])
    logic = np.hstack([logic, np.zeros((len(logic), extra))])
    a = np.vstack([mem, logic])
    rhs = np.concatenate([mem_rhs / MIB, logic_rhs])
    cost = np.zeros(space.width + extra)
    upper = np.ones(space.width + extra)
    for k, members in enumerate(space.block_groups):
        cost[BLOCKS * g_count + k] = sum(space.blocks[j].recompute_s for j in members)
    for g, members in enumerate(groups):
        ms = [cands[i] for i in members]
        swap_s = swap_cost * sum(c.swap_s for c in ms)
        rec_s = sum(c.recompute_s for c in ms)
        can_swap = tier is not None and all(c.can_swap for c in ms)
        can_rec = opts.allow_recompute and all(c.can_recompute for c in ms)
        can_split = can_swap and can_rec and opts.allow_split and all(c.can_split for c in ms)
        cost[[g, g_count + g, 2 * g_count + g, 3 * g_count + g]] = swap_s, rec_s, rec_s, swap_s - rec_s
        upper[[g, g_count + g, 2 * g_count + g, 3 * g_count + g]] = can_swap, can_rec, can_split, can_split
    lower = np.zeros(len(cost))
    if opts.checkpoint_blocks:
        lower[BLOCKS * g_count : space.width] = 1.0
    if min_peak:
        cost[:] = 0.0
        cost[-1], upper[-1] = 1.0, np.inf
    n_cols = len(cost)
    cols, rows = np.nonzero(a.T)  # sorted by column, then row: CSC order
    problem = MilpProblem(
        c=cost,
        lower=lower,
        upper=upper,
        integrality=np.array(
            [1] * (3 * g_count) + [0] * g_count + [1] * k_count + [0] * extra, dtype=np.int8
        ),
        a_data=a[rows, cols],
        a_indices=rows,
        a_indptr=np.searchsorted(cols, np.arange(n_cols + 1)),
        row_lower=np.full(len(rhs), -np.inf),
        row_upper=rhs,
    )
    return Formulation(space, problem)


def _logic_rows(space: Space, tier: Tier | None, link_s: float) -> tuple[np.ndarray, np.ndarray]:
    """s_g + r_g + z_g <= 1 and phi_g <= z_g; a rebuild's inputs stay available; swaps fit the link's time
    and the tier's bytes; then the blocks' rows (`_block_rows`)."""
    cands, groups = space.cands, space.groups
    g_count = len(groups)
    width = space.width
    group_of = {cands[i].value_id: g for g, ms in enumerate(groups) for i in ms}
    rows: list[np.ndarray] = []
    rhs: list[float] = []
    for g in range(g_count):
        row = np.zeros(width)
        row[[g, g_count + g, 2 * g_count + g]] = 1.0
        share = np.zeros(width)
        share[[3 * g_count + g, 2 * g_count + g]] = 1.0, -1.0
        rows += [row, share]
        rhs += [1.0, 0.0]
    by_id = {c.value_id: c for c in cands}
    pairs = set()
    for g, ms in enumerate(groups):
        for i in ms:
            c = cands[i]
            for a in c.frontier:
                pairs.add((g, group_of[a], by_id[a].first_bwd_use > c.first_bwd_use))
    for g, h, needs_keep in sorted(pairs):
        row = np.zeros(width)
        row[[g_count + g, 2 * g_count + g]] += 1.0  # c rebuilt (recomputed or split) reads a:
        row[[g_count + h, 2 * g_count + h]] += 1.0  # a must not be rebuilt itself...
        if needs_keep:
            row[h] += 1.0  # ...nor be away on the tier when c is rebuilt
        rows.append(row)
        rhs.append(1.0)
    if tier is not None:
        link = np.zeros(width)
        cap = np.zeros(width)
        for g, ms in enumerate(groups):
            link[[g, 3 * g_count + g]] = sum(cands[i].swap_s for i in ms)
            cap[[g, 3 * g_count + g]] = sum(cands[i].size_bytes for i in ms)
        rows += [link, cap]
        rhs += [link_s, float(tier.capacity_bytes)]
    block_rows, block_rhs = _block_rows(space, group_of)
    return np.array(rows + block_rows), np.array(rhs + block_rhs)


def _block_rows(space: Space, group_of: dict[int, int]) -> tuple[list[np.ndarray], list[float]]:
    """A checkpointed block's members take no other decision; its frontier is on the device at its rebuild
    (not rebuilt itself, nor away on the tier if needed later); a tensor rebuilt before the block's rebuild
    does not read its members."""
    g_count = len(space.groups)
    by_id = {c.value_id: c for c in space.cands}
    block_of = {vid: j for j, b in enumerate(space.blocks) for vid in b.members}
    col = {j: BLOCKS * g_count + k for k, ms in enumerate(space.block_groups) for j in ms}
    keys: set[tuple[int, ...]] = set()
    for j, b in enumerate(space.blocks):
        for vid in b.members:
            g = group_of[vid]
            keys.add((col[j], g, g_count + g, 2 * g_count + g))
        for a in b.frontier:
            h = group_of[a]
            away = (h,) if by_id[a].first_bwd_use > b.rebuild_step else ()
            keys.add((col[j], g_count + h, 2 * g_count + h, *away))
    for c in space.cands:
        for a in c.frontier:
            j = block_of.get(a, -1)
            if j >= 0 and c.first_bwd_use < space.blocks[j].rebuild_step:
                g = group_of[c.value_id]
                keys.add((col[j], g_count + g, 2 * g_count + g))
    rows = []
    for key in sorted(keys):
        row = np.zeros(space.width)
        row[list(key)] = 1.0
        rows.append(row)
    return rows, [1.0] * len(rows)
