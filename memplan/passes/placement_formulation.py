"""The placement MILP: how many layers of each class keep each tensor (and their KV cache) on each tier,
and on which tier each other unit's tensors live, for the fastest generation within every tier's budget.

Identical layers are solved once: for a class of L layers and a tensor of it, integer n[t, r] says how
many of the L layers keep that tensor on tier r (their sum is L); `spread` then gives each layer its tier.
Time follows FlexGen's model, per layer and forward: t >= compute + share * io and t >= io, where io is
the bytes streamed from each tier over that tier's read bandwidth (averaged over the class's layers, as
`spread` makes them) plus, for a KV cache off the device, reading it back at the mean context and writing
the new token. The objective is the prefill plus `gen - 1` decode forwards. The device holds what stays
there, the fixed activations and workspaces, and a prefetch window W: the streamed bytes of the unit
computing and of the next one arriving, W >= S(a) + S(b) for every two consecutive unit calls (the last
unit of a forward is followed by the first of the next). A layer of a class streams its tensors with
z[t] = 1, forced when fewer than L layers keep the tensor (n[t, device] >= L (1 - z[t])); another unit
streams what it does not keep on the device.
Every other tier holds what lives there within its budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memplan.ir.hardware import Hardware
from memplan.passes.placement_model import GenerationModel
from memplan.passes.remat_schedule import compute_share
from memplan.solvers.milp import DenseRows, MilpProblem, MilpResult, dense_problem, solve_milp

GIB = float(1 << 20)
"""Bytes per unit of the byte rows (MiB: HiGHS's 1e-6 feasibility tolerance is then about a byte)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The formulation's answer: tier counts per (class, tensor) and per class's KV, a tier per other
    tensor, the window, and the per-forward times it predicts."""

    layer_tiers: dict[tuple[int, int], dict[str, int]]
    """(class index, tensor index) -> tier -> number of layers."""
    kv_tiers: dict[int, dict[str, int]]
    other_tiers: dict[int, str]
    """value id -> tier."""
    window_bytes: int
    objective_s: float


@dataclass
class _Cols:
    names: list[str]
    lower: list[float]
    upper: list[float]
    integer: list[int]

    def add(self, name: str, lo: float, hi: float, integer: bool) -> int:
        self.names.append(name)
        self.lower.append(lo)
        self.upper.append(hi)
        self.integer.append(int(integer))
        return len(self.names) - 1


def formulate(
    model: GenerationModel, hw: Hardware, budgets: dict[str, int], kv_tiers: tuple[str, ...],
    least_device: bool = False,
) -> tuple[MilpProblem, dict[str, object]]:  # fmt: skip
    """The MILP and an index of its columns (see the module docstring). `least_device`: minimise the
    device bytes instead of the time, with no device budget (the least budget any placement needs)."""
    tiers = [t.name for t in hw.tiers if t.name in budgets]
    kv_ok = [t for t in tiers if t == "device" or t in kv_tiers]
    cols = _Cols([], [], [], [])
    n: dict[tuple[int, int, str], int] = {}
    z: dict[tuple[int, int], int] = {}
    k: dict[tuple[int, str], int] = {}
    zk: dict[int, int] = {}
    x: dict[tuple[int, str], int] = {}
    t_layer: dict[tuple[int, int], int] = {}
    t_other: dict[tuple[int, int], int] = {}
    for c, cls in enumerate(model.classes):
        for j in range(len(cls.sizes)):
            for r in tiers:
                n[(c, j, r)] = cols.add(f"n{c}.{j}.{r}", 0, cls.count, True)
            z[(c, j)] = cols.add(f"z{c}.{j}", 0, 1, True)
        if cls.kv_bytes:
            for r in kv_ok:
                k[(c, r)] = cols.add(f"k{c}.{r}", 0, cls.count, True)
            zk[c] = cols.add(f"zk{c}", 0, 1, True)
        for f in (0, 1):
            t_layer[(c, f)] = cols.add(f"T{c}.{f}", 0, np.inf, False)
    for u, other in enumerate(model.others):
        for vid in other.values:
            for r in tiers:
                x[(vid, r)] = cols.add(f"x{vid}.{r}", 0, 1, True)
        for f in (0, 1):
            t_other[(u, f)] = cols.add(f"U{u}.{f}", 0, np.inf, False)
    w = cols.add("W", 0, np.inf, False)
    width = len(cols.names)
    dense = DenseRows(width)
    row = dense.add

    share = {r: compute_share(hw, hw.tier(r)) for r in tiers}
    read = {r: 1.0 / hw.tier(r).read_bw for r in tiers}
    write = {r: 1.0 / hw.tier(r).write_bw for r in tiers}
    decode_forwards = model.forwards - 1
    cost = np.zeros(width)
    device_use: dict[int, float] = {w: 1.0}
    tier_use: dict[str, dict[int, float]] = {r: {} for r in tiers if r != "device"}
    streams: dict[tuple[str, int], tuple[dict[int, float], float]] = {}
    """Unit -> its streamed GiB as (coefficients, constant)."""
    for c, cls in enumerate(model.classes):
        window: dict[int, float] = {}
        for j, size in enumerate(cls.sizes):
            row({n[(c, j, r)]: 1.0 for r in tiers}, cls.count, cls.count)
            row({n[(c, j, "device")]: 1.0, z[(c, j)]: float(cls.count)}, cls.count, np.inf)
            window[z[(c, j)]] = size / GIB
            device_use[n[(c, j, "device")]] = size / GIB
            for r in tier_use:
                tier_use[r][n[(c, j, r)]] = size / GIB
        if cls.kv_bytes:
            row({k[(c, r)]: 1.0 for r in kv_ok}, cls.count, cls.count)
            row({k[(c, "device")]: 1.0, zk[c]: float(cls.count)}, cls.count, np.inf)
            window[zk[c]] = cls.kv_bytes / GIB
            device_use[k[(c, "device")]] = cls.kv_bytes / GIB
            for r in kv_ok:
                if r != "device":
                    tier_use[r][k[(c, r)]] = cls.kv_bytes / GIB
        streams[("class", c)] = (window, 0.0)
        for f, compute in ((0, cls.prefill_s), (1, cls.decode_s)):
            io: dict[int, tuple[float, float]] = {}
            for j, size in enumerate(cls.sizes):
                for r in tiers:
                    if r != "device":
                        io[n[(c, j, r)]] = (size * read[r] / cls.count, share[r])
            for r in kv_ok if cls.kv_bytes else ():
                if r == "device":
                    continue
                if f == 0:
                    per = cls.kv_prompt_bytes * write[r]
                else:
                    per = model.mean_ctx_tokens * cls.kv_token_bytes * read[r] + cls.kv_token_bytes * write[r]
                io[k[(c, r)]] = (per / cls.count, share[r])
            _time_rows(row, t_layer[(c, f)], io, compute)
            cost[t_layer[(c, f)]] = cls.count * (1.0 if f == 0 else decode_forwards)
    for u, other in enumerate(model.others):
        kept: dict[int, float] = {}
        for vid, size in zip(other.values, other.sizes, strict=True):
            row({x[(vid, r)]: 1.0 for r in tiers}, 1.0, 1.0)
            kept[x[(vid, "device")]] = -size / GIB
            device_use[x[(vid, "device")]] = size / GIB
            for r in tier_use:
                tier_use[r][x[(vid, r)]] = size / GIB
        streams[("other", u)] = (kept, sum(other.sizes) / GIB)
        for f, compute in ((0, other.prefill_s), (1, other.decode_s)):
            io = {
                x[(vid, r)]: (size * read[r], share[r])
                for vid, size in zip(other.values, other.sizes, strict=True)
                for r in tiers
                if r != "device"
            }
            _time_rows(row, t_other[(u, f)], io, compute)
            cost[t_other[(u, f)]] = 1.0 if f == 0 else decode_forwards
    seq = list(model.sequence)
    for a, b in zip(seq, seq[1:] + seq[:1], strict=True):
        (ca, ka), (cb, kb) = streams[a], streams[b]
        both = {i: ca.get(i, 0.0) + cb.get(i, 0.0) for i in {*ca, *cb}}
        row({w: 1.0, **{i: -v for i, v in both.items()}}, ka + kb, np.inf)
    if least_device:
        cost[:] = 0.0
        for i, v in device_use.items():
            cost[i] += v
    else:
        row(device_use, -np.inf, (budgets["device"] - model.fixed_bytes) / GIB)
    for r, use in tier_use.items():
        if use:
            row(use, -np.inf, budgets[r] / GIB)
    problem = dense_problem(
        cost, dense.matrix(), np.array(dense.lower), np.array(dense.upper), np.array(cols.lower),
        np.array(cols.upper),
        np.array(cols.integer, dtype=np.int8),
    )  # fmt: skip
    index: dict[str, object] = {"n": n, "k": k, "x": x, "w": w, "tiers": tiers, "kv_tiers": kv_ok}
    return problem, index


def _time_rows(
    row: Callable[[dict[int, float], float, float], None], t_col: int,
    io: dict[int, tuple[float, float]], compute: float,
) -> None:  # fmt: skip
    """t >= compute + share * io and t >= io; `io` maps a column to (seconds per unit, compute share)."""
    row({t_col: 1.0, **{i: -s * sh for i, (s, sh) in io.items()}}, compute, np.inf)
    row({t_col: 1.0, **{i: -s for i, (s, _) in io.items()}}, 0.0, np.inf)


def decode(result: MilpResult, model: GenerationModel, index: dict[str, object]) -> Choice:
    """The solver's columns as counts and tiers."""
    assert result.x is not None
    xs = result.x
    n: dict[tuple[int, int, str], int] = index["n"]  # type: ignore[assignment]
    k: dict[tuple[int, str], int] = index["k"]  # type: ignore[assignment]
    x: dict[tuple[int, str], int] = index["x"]  # type: ignore[assignment]
    layer_tiers: dict[tuple[int, int], dict[str, int]] = {}
    for (c, j, r), col in n.items():
        layer_tiers.setdefault((c, j), {})[r] = int(round(xs[col]))
    kv: dict[int, dict[str, int]] = {}
    for (c, r), col in k.items():
        kv.setdefault(c, {})[r] = int(round(xs[col]))
    other: dict[int, str] = {}
    for (vid, r), col in x.items():
        if xs[col] > 0.5:
            other[vid] = r
    w: int = index["w"]  # type: ignore[assignment]
    return Choice(layer_tiers, kv, other, int(round(xs[w] * GIB)), float(result.objective or 0.0))


def solve(
    model: GenerationModel, hw: Hardware, budgets: dict[str, int], kv_tiers: tuple[str, ...],
    time_limit_s: float,
) -> tuple[MilpResult, Choice | None]:  # fmt: skip
    """Formulate and solve within the time limit; the choice is None when no incumbent was found."""
    problem, index = formulate(model, hw, budgets, kv_tiers)
    result = solve_milp(problem, time_limit_s, mip_rel_gap=1e-6)
    return result, (decode(result, model, index) if result.x is not None else None)


def least_device_bytes(
    model: GenerationModel, hw: Hardware, budgets: dict[str, int], kv_tiers: tuple[str, ...],
    time_limit_s: float,
) -> tuple[int | None, MilpResult]:  # fmt: skip
    """The least device budget any placement of this model needs (its proven bound when the solver stops
    early), or None when the other tiers cannot hold what must leave the device."""
    problem, _ = formulate(model, hw, budgets, kv_tiers, least_device=True)
    result = solve_milp(problem, time_limit_s, mip_rel_gap=1e-9)
    best = result.bound if result.status == "optimal" or result.bound is not None else None
    if result.x is None or best is None:
        return None, result
    return int(best * GIB) + model.fixed_bytes, result
