"""Benchmark of the `allocate` pass's packing portfolio against the max-load bound and greedy by size.

Instances: MiniMalloc's 11 challenging problems at capacity 1048576 (`../shared/data/minimalloc`), two real
traces minimised (`../shared/data/idealloc`: ResNet-50, IOPDDL G_1), and synthetic transformer training
traces of 20,000 to 100,000 buffers made by `training_trace` (seeded, so every run sees the same ones).
Per instance: buffers, lower bound, height, ratio, time, status, and greedy by size (TFLite / XLA best
fit, ordered by size) on the same instance as the baseline. Run: `python -m bench.run allocate [--quick]`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Result
from memplan.solvers.packing import Problem, Solution, Status, csv_format, make_buffer, solve, validate
from memplan.solvers.packing.greedy import ordering, place
from memplan.solvers.packing.sweep import sweep

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHALLENGING = "ABCDEFGHIJK"
TIMEOUT_CHALLENGING_S = 5.0
TIMEOUT_TRACE_S = 1.0
TIMEOUT_SCALE_S = 30.0


def training_trace(n_buffers: int, seed: int = 0, layers: int = 32) -> Problem:
    """A synthetic training trace: micro-batches of `layers` transformer layers, forward then backward.

    Forward of layer l makes ~6 activations saved until its backward (sizes from a few shapes: hidden,
    4x hidden for the MLP, heads x seq^2 for attention scores) plus short temporaries; backward frees them
    in reverse order while making gradient temporaries. Weights and their gradient accumulators live
    through the whole trace. Sizes get a +-10% jitter in 256-byte steps, so repeats are near, not exact.
    """
    rng = np.random.default_rng(seed)
    hidden, mlp, attn = 4 << 20, 16 << 20, 32 << 20
    shapes = np.array([hidden, hidden, hidden, mlp, mlp, attn])
    out: list[tuple[int, int, int]] = []
    t = 0
    for _ in range(2 * layers):  # weights and gradient accumulators
        out.append((0, -1, int(rng.choice([hidden * 3, mlp * 2]))))
    while len(out) < n_buffers:
        saved: list[list[tuple[int, int]]] = []
        for _layer in range(layers):
            mine = []
            for s in shapes:
                mine.append((t, _jitter(rng, int(s))))
                out.append((t, t + int(rng.integers(1, 4)), _jitter(rng, int(rng.choice(shapes)))))
                t += 1
            saved.append(mine)
        for mine in reversed(saved):
            for start, size in mine:
                out.append((t, t + int(rng.integers(1, 3)), _jitter(rng, int(rng.choice(shapes)))))
                out.append((start, t + 1, size))
                t += 1
    end = t + 4
    bufs = [make_buffer(str(i), [(lo, end if hi < 0 else hi)], size) for i, (lo, hi, size) in enumerate(out)]
    return Problem(tuple(bufs[:n_buffers]))


def _jitter(rng: np.random.Generator, size: int) -> int:
    return max(256, int(size * rng.uniform(0.9, 1.1)) // 256 * 256)


def _greedy_by_size(problem: Problem) -> tuple[int, float]:
    t = time.perf_counter()
    sw = sweep(problem)
    res = place(problem, ordering(problem, "size", sw), sw, "size")
    return res.height_bytes, time.perf_counter() - t


def _row(name: str, kind: str, problem: Problem, sol: Solution, capacity: int | None) -> dict[str, Any]:
    g_height, g_time = _greedy_by_size(problem)
    fits = sol.status in (Status.OPTIMAL, Status.FEASIBLE)
    ok = not validate(problem, sol.offsets_bytes) if fits and sol.offsets_bytes is not None else ""
    lb = sol.lower_bound_bytes
    return {
        "instance": name, "kind": kind, "buffers": len(problem.buffers), "capacity": capacity or "",
        "lower_bound": lb, "height": sol.height_bytes if fits else "", "ratio": (sol.height_bytes / lb)
        if fits and sol.height_bytes and lb else "", "time_s": round(sol.time_s, 3),
        "status": sol.status.value,
        "solver": sol.solver, "nodes": sol.nodes,
        "nodes_per_s": round(sol.nodes / sol.time_s) if sol.time_s else "", "valid": ok,
        "greedy_size_height": g_height,
        "greedy_size_ratio": round(g_height / lb, 4) if lb else "", "greedy_size_time_s": round(g_time, 3),
    }


def _challenging(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for letter in CHALLENGING[:3] if quick else CHALLENGING:
        path = DATA / "minimalloc" / f"{letter}.1048576.csv"
        problem, _ = csv_format.read(path, 1048576)
        sol = solve(problem, TIMEOUT_CHALLENGING_S)
        rows.append(_row(f"minimalloc/{letter}", "challenging", problem, sol, 1048576))
    return rows


def _traces() -> list[dict[str, Any]]:
    rows = []
    for name in ("resnet50", "iopddl_G_1"):
        problem, _ = csv_format.read(DATA / "idealloc" / f"{name}.csv")
        sol = solve(problem, TIMEOUT_TRACE_S)
        rows.append(_row(f"idealloc/{name}", "trace", problem, sol, None))
    return rows


ZOO_TRACES = (("llama2-7b", 1, 4096), ("llama2-70b", 1, 4096))
"""Training steps of the zoo's largest models (meta device), as device-tier traces."""


def zoo_trace(name: str, batch: int, seq: int) -> Problem:
    """The device tier of a zoo model's whole training step (every storage on the device for its lifetime),
    captured on the meta device, as a packing problem with 64-byte alignment."""
    import memplan
    from memplan.passes.allocate import tier_problem

    plan = memplan.plan(f"zoo:{name}", mode="train", batch=batch, seq=seq, budget="100TiB", passes=[])
    problem, _ = tier_problem([iv for iv in plan.residency if iv.tier == "device"], 64)
    return problem


def _scale(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for name, batch, seq in () if quick else ZOO_TRACES:
        problem = zoo_trace(name, batch, seq)
        sol = solve(problem, TIMEOUT_SCALE_S)
        rows.append(_row(f"zoo/{name}-train-b{batch}-s{seq}", "scale", problem, sol, None))
    for n in (5_000,) if quick else (20_000, 50_000, 100_000):
        problem = training_trace(n, seed=n)
        sol = solve(problem, TIMEOUT_SCALE_S)
        rows.append(_row(f"synthetic/train-{n}", "scale", problem, sol, None))
    return rows


COLUMNS = ["instance", "buffers", "capacity", "lower_bound", "height", "ratio", "time_s", "status", "solver",
           "nodes", "nodes_per_s", "greedy_size_height", "greedy_size_ratio", "valid"]


def run(quick: bool) -> Result:
    rows = _challenging(quick) + _traces() + _scale(quick)
    solved = sum(1 for r in rows if r["kind"] == "challenging" and r["status"] in ("optimal", "feasible"))
    in_time = sum(1 for r in rows if r["kind"] == "challenging" and r["status"] in ("optimal", "feasible")
                  and r["time_s"] <= TIMEOUT_CHALLENGING_S)
    notes = [
        f"challenging: {solved} of {sum(r['kind'] == 'challenging' for r in rows)} packed within capacity "
        f"1048576 ({in_time} within {TIMEOUT_CHALLENGING_S:g} s); ratio = height / max-load bound.",
        f"time limits: challenging {TIMEOUT_CHALLENGING_S:g} s, real traces {TIMEOUT_TRACE_S:g} s, "
        f"synthetic {TIMEOUT_SCALE_S:g} s; status timeout-without-solution = nothing fit in the limit.",
        "greedy_size = best fit ordered by size (TFLite/XLA baseline) on the same instance; "
        "valid = the independent checker found no overlap, misalignment or out-of-bounds buffer.",
        "synthetic/train-N: `training_trace(N, seed=N)` in this module; zoo/NAME-train: the device tier of "
        "that zoo model's whole training step, captured on the meta device (`zoo_trace`).",
        "nodes = exact-search nodes of this process, plus the forked rival's when the rival answered first; "
        "nodes_per_s = nodes / time_s, wall clock (the machine may be shared).",
    ]
    return Result("allocate", "Static offsets: packing portfolio vs max-load bound and greedy by size",
                  COLUMNS, rows, notes)
