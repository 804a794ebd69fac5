"""Bits and tiers decided together: for each weight tensor of a generation, one (storage format, tier)
pair, for the fastest generation whose total quantization sensitivity stays within a limit and whose every
tier holds its budget.

Why jointly: a tensor's bits change both where it fits and how long it takes to stream, so the best bits
depend on the placement (a tensor kept on the device costs no I/O at any width; a streamed one costs its
stored bytes over the link each forward) and the best placement on the bits. Sensitivities differ from
layer to layer, so unlike the bits-blind formulation (`placement_formulation`, counts per class of
identical layers) this one has a binary x[v, f, r] per tensor v, candidate format f and tier r (exactly
one per tensor), and the time rows are per unit: t_u >= compute_u + share * io_u and t_u >= io_u, io_u
the stored bytes unit u streams from each tier over its read bandwidth. The window and tier rows are the
bits-blind model's, over stored bytes. KV caches stay on the device here. A `Candidate` with `bits` None
is the tensor as captured.

The device row holds at every step: with `unit_fixed` (unit -> the most the storages placement leaves
where they are take at any of its calls, KV caches included), one row per unit, resident weights + window
+ e_u <= budget - unit_fixed[u], where e_u >= the dequantize transient of each format chosen for a weight
the unit reads (`TensorBits.dequant_workspace_bytes`: a unit multiplies by its weights one after another,
so its transient is the largest of them); a weight kept as captured adds none. Without `unit_fixed`, one
row with `fixed_bytes` for every step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from memplan.ir.cost import op_time_s
from memplan.ir.graph import Graph, Role
from memplan.ir.hardware import Hardware
from memplan.passes.remat_schedule import compute_share
from memplan.plans.decisions import TensorBits
from memplan.solvers.milp import DenseRows, MilpResult, dense_problem, solve_milp

MIB = float(1 << 20)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to store a tensor: its format (None: as captured), sensitivity cost, stored bytes."""

    bits: TensorBits | None
    cost: float
    stored_bytes: int


@dataclass(frozen=True, slots=True)
class JointChoice:
    """Per tensor: the index of its candidate and its tier; the objective (seconds)."""

    candidate: dict[int, int]
    tier: dict[int, str]
    objective_s: float
    sensitivity: float


def solve_joint(
    graph: Graph, hw: Hardware, budgets: dict[str, int], fixed_bytes: int,
    candidates: dict[int, list[Candidate]], sensitivity_limit: float, gen: int, time_limit_s: float,
    unit_fixed: dict[str, int] | None = None,
) -> tuple[MilpResult, JointChoice | None]:  # fmt: skip
    """Build and solve the joint MILP (see the module docstring)."""
    tiers = [t.name for t in hw.tiers if t.name in budgets]
    weights = [v.id for v in graph.values if v.role == Role.PARAMETER and v.alias_of is None]
    cands = {v: candidates.get(v) or [Candidate(None, 0.0, graph.value(v).size_bytes)] for v in weights}
    units, reads, compute = _units(graph, hw, set(weights))
    cols: list[tuple[int, int, str]] = []
    index: dict[tuple[int, int, str], int] = {}
    for v in weights:
        for f in range(len(cands[v])):
            for r in tiers:
                index[(v, f, r)] = len(cols)
                cols.append((v, f, r))
    t_col = {(u, k): len(cols) + 2 * i + k for i, u in enumerate(units) for k in (0, 1)}
    w_col = len(cols) + 2 * len(units)
    e_col = {u: w_col + 1 + i for i, u in enumerate(units)} if unit_fixed is not None else {}
    width = w_col + 1 + len(e_col)
    dense = DenseRows(width)
    row = dense.add

    for v in weights:
        row({index[(v, f, r)]: 1.0 for f in range(len(cands[v])) for r in tiers}, 1.0, 1.0)
    streamed: dict[str, dict[int, float]] = {}
    for u in units:
        s: dict[int, float] = {}
        for v in reads[u]:
            for f, c in enumerate(cands[v]):
                for r in tiers:
                    if r != "device":
                        s[index[(v, f, r)]] = c.stored_bytes / MIB
        streamed[u] = s
        for k in (0, 1):
            io = {
                index[(v, f, r)]: (c.stored_bytes / hw.tier(r).read_bw, compute_share(hw, hw.tier(r)))
                for v in reads[u] for f, c in enumerate(cands[v]) for r in tiers if r != "device"
            }  # fmt: skip
            row(
                {t_col[(u, k)]: 1.0, **{i: -sec * sh for i, (sec, sh) in io.items()}}, compute[(u, k)], np.inf
            )
            row({t_col[(u, k)]: 1.0, **{i: -sec for i, (sec, _) in io.items()}}, 0.0, np.inf)
    for a, b in zip(units, units[1:] + units[:1], strict=True):
        both = defaultdict(float)
        for i, c in (*streamed[a].items(), *streamed[b].items()):
            both[i] += c
        row({w_col: 1.0, **{i: -c for i, c in both.items()}}, 0.0, np.inf)
    for r in tiers:
        use = {index[(v, f, r)]: c.stored_bytes / MIB for v in weights for f, c in enumerate(cands[v])}
        if r == "device":
            row({**use, w_col: 1.0}, -np.inf, (budgets["device"] - fixed_bytes) / MIB)
            for u, e in e_col.items():
                assert unit_fixed is not None
                row({**use, w_col: 1.0, e: 1.0}, -np.inf, (budgets["device"] - unit_fixed.get(u, 0)) / MIB)
                for v in reads[u]:
                    for f, c in enumerate(cands[v]):
                        ws = c.bits.dequant_workspace_bytes(graph.value(v).shape) if c.bits else 0
                        if ws:
                            row({e: 1.0, **{index[(v, f, t)]: -ws / MIB for t in tiers}}, 0.0, np.inf)
        else:
            row(use, -np.inf, budgets[r] / MIB)
    scale = max((c.cost for v in weights for c in cands[v]), default=0.0) or 1.0
    row({index[(v, f, r)]: c.cost / scale for v in weights for f, c in enumerate(cands[v]) for r in tiers},
        -np.inf, sensitivity_limit / scale * (1 + 1e-9) + 1e-12)  # fmt: skip
    cost = np.zeros(width)
    for u in units:
        cost[t_col[(u, 0)]] = 1.0
        cost[t_col[(u, 1)]] = max(gen - 1, 0)
    lower = np.zeros(width)
    upper = np.ones(width)
    upper[len(cols) :] = np.inf
    integrality = np.zeros(width, dtype=np.int8)
    integrality[: len(cols)] = 1
    problem = dense_problem(
        cost, dense.matrix(), np.array(dense.lower), np.array(dense.upper), lower, upper, integrality
    )
    result = solve_milp(problem, time_limit_s, mip_rel_gap=1e-6)
    if result.x is None:
        return result, None
    chosen = {cols[i][0]: (cols[i][1], cols[i][2]) for i in range(len(cols)) if result.x[i] > 0.5}
    sens = sum(cands[v][f].cost for v, (f, _) in chosen.items())
    return result, JointChoice(
        {v: f for v, (f, _) in chosen.items()}, {v: r for v, (_, r) in chosen.items()},
        float(result.objective or 0.0), sens,
    )  # fmt: skip


def _units(
    graph: Graph, hw: Hardware, weights: set[int]
) -> tuple[list[str], dict[str, list[int]], dict[tuple[str, int], float]]:
    """Units in call order, the weights each reads, and each one's compute seconds in the prefill (0) and
    in a mean decode forward (1)."""
    units: list[str] = []
    reads: dict[str, list[int]] = {}
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    for op in graph.ops:
        kind = 0 if op.name.startswith("prefill:") else 1
        if kind == 0 and op.module_path not in reads:
            units.append(op.module_path)
            reads[op.module_path] = sorted(v for v in op.inputs if v in weights)
        times[(op.module_path, kind)].append(op_time_s(op, hw))
    compute = {
        (u, k): (sum(times[(u, k)]) / len(times[(u, k)]) if times[(u, k)] else 0.0)
        for u in units
        for k in (0, 1)
    }
    return units, reads, compute
