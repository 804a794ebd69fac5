"""Solve time of the bitwidth ILP at 70B scale: a synthetic multiple-choice problem shaped like Llama-2-70B's
80 decoder layers x 7 linear weights plus the untied LM head (561 layers), 5 formats each, through
`memplan.solvers.multiple_choice` in-process and through `memplan bits` as a command. Goal (issue 12):
under 5 s.

The problem, seeded (`SEED`): per weight (q, k, v, o: 8192x8192 / 1024x8192 with GQA; gate, up: 28672x8192;
down: 8192x28672; lm_head: 32000x8192) one choice per format of `FORMATS`, sized by `TensorBits.stored_bytes`
(payload, fp16 scales and zero points) as the bitwidth pass sizes them; BOPs = elements x `TOKENS` x weight
bits x 16; latency = the roofline of one read (a decode step at batch 1) on an H100 (bytes / 3.35 TB/s vs
2 x elements x tokens / 989 TFLOP/s). Cost = curvature / 2 x squared error, as the pass prices it: the
squared error of Gaussian weights (sigma from the 0.02 init scale, shrinking with width) under a uniform
quantizer of step range / (levels - 1), range 8 sigma per channel for int8 and 5 sigma per group of 128;
the curvature log-normal around a level that is higher for v, o and down projections and for the first
and last two layers (what trained LLMs show). Ties as the pass makes them: q/k/v of a layer share a
format, and gate/up. Limits: stored bytes at `MEAN_BITS` bits per weight, and one case adding a latency
limit. Run: `python -m bench.run bitwidth_scale`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Result
from memplan.planner.bits_file import solution_to_dict
from memplan.plans.decisions import FORMAT_BITS, Candidate, TensorBits
from memplan.solvers.multiple_choice import Choice, ChoiceProblem, Layer, Usage, solve_multiple_choice

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
GOAL_S = 5.0
TIME_LIMIT_S = 30.0
TOKENS = 1
"""Tokens per read of a weight: one decode step at batch 1 (memory-bound: latency follows the bytes)."""
MEM_BW, FLOPS = 3.35e12, 989e12
"""H100 SXM: HBM3 bytes/s and dense fp16 FLOP/s."""
LAYERS, HIDDEN, KV, FFN, VOCAB = 80, 8192, 1024, 28672, 32000
LINEARS = (("q_proj", HIDDEN, HIDDEN), ("k_proj", KV, HIDDEN), ("v_proj", KV, HIDDEN),
           ("o_proj", HIDDEN, HIDDEN), ("gate_proj", FFN, HIDDEN), ("up_proj", FFN, HIDDEN),
           ("down_proj", HIDDEN, FFN))  # fmt: skip
"""(name, out, in) of each decoder layer's weights: Llama-2-70B's."""
FORMATS = (
    Candidate("fp16"), Candidate("int8", True, "per-channel"), Candidate("int4", False, "per-group", 128),
    Candidate("int3", False, "per-group", 128), Candidate("int2", False, "per-group", 128),
)  # fmt: skip
SENSITIVE = {"v_proj": 4.0, "o_proj": 2.0, "down_proj": 3.0, "lm_head": 6.0}
MEAN_BITS = (2.5, 3.25, 4.25, 5.0, 6.5)
QUICK_BITS = (4.25,)
LATENCY_SHARE = 0.1
"""The latency case's limit: this share of the way from the least latency to the most (binding at 4.25
bits per weight)."""


def shapes() -> list[tuple[str, int, int]]:
    """(name, out, in) of every quantizable weight, in model order."""
    out = [(f"model.layers.{i}.{kind}.weight", o, k) for i in range(LAYERS) for kind, o, k in LINEARS]
    return out + [("lm_head.weight", VOCAB, HIDDEN)]


def squared_error(fmt: Candidate, numel: int, sigma: float) -> float:
    """Expected ||W - Q(W)||^2 of `numel` N(0, sigma^2) weights under `fmt` (see the module docstring)."""
    if fmt.format == "fp16":
        return numel * (sigma * 2.0**-11) ** 2 / 3
    levels = 2 ** FORMAT_BITS[fmt.format]
    spread = 8.0 if fmt.scale_layout == "per-channel" else 5.0
    step = spread * sigma / (levels - 1)
    return numel * step**2 / 12


def problem(seed: int = SEED, weights: list[tuple[str, int, int]] | None = None) -> ChoiceProblem:
    """The 70B-shaped problem without limits (see the module docstring)."""
    rng = np.random.default_rng(seed)
    layers = []
    names = weights if weights is not None else shapes()
    depths = [int(n.split(".")[2]) for n, _, _ in names if n.startswith("model.layers.")]
    n_layers = 1 + max(depths, default=0)
    for name, rows, cols in names:
        kind = name.split(".")[-2]
        depth = int(name.split(".")[2]) if name.startswith("model.layers.") else n_layers - 1
        edge = 3.0 if depth < 2 or depth >= n_layers - 2 else 1.0
        curvature = 1e-6 * SENSITIVE.get(kind, 1.0) * edge * float(rng.lognormal(0.0, 0.7))
        sigma = 0.02 * math.sqrt(4096 / cols)
        choices = []
        for fmt in FORMATS:
            spec: TensorBits = fmt.for_tensor(0, (rows, cols))
            size = spec.stored_bytes((rows, cols))
            numel = rows * cols
            bops = float(numel * TOKENS * spec.bits * 16)
            latency = max(size / MEM_BW, 2.0 * numel * TOKENS / FLOPS)
            cost = curvature / 2 * squared_error(fmt, numel, sigma)
            choices.append(Choice(fmt.label, cost, float(size), bops, latency))
        layers.append(Layer(name, tuple(choices)))
    index = {layer.name: i for i, layer in enumerate(layers)}
    ties = []
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        for i in range(n_layers):
            first = index.get(f"model.layers.{i}.{group[0]}.weight")
            for other in group[1:]:
                j = index.get(f"model.layers.{i}.{other}.weight")
                if first is not None and j is not None:
                    ties.append((first, j))
    return ChoiceProblem(tuple(layers), tuple(ties))


def limits_at(p: ChoiceProblem, mean_bits: float, latency_share: float | None = None) -> Usage:
    """A size limit of `mean_bits` bits per weight (scales included), and optionally a latency limit at
    `latency_share` of the way from the least to the most latency."""
    numel = sum(_numel(layer) for layer in p.layers)
    latency = None
    if latency_share is not None:
        low = sum(min(c.latency for c in layer.choices) for layer in p.layers)
        high = sum(max(c.latency for c in layer.choices) for layer in p.layers)
        latency = low + (high - low) * latency_share
    return Usage(numel * mean_bits / 8, None, latency)


def _numel(layer: Layer) -> int:
    fp16 = next(c for c in layer.choices if c.format == "fp16")
    return int(fp16.size) // 2


def to_document(p: ChoiceProblem) -> dict[str, Any]:
    """`p` as a `memplan bits` problem file."""
    limits = {k: v for k, v in (("size", p.limits.size), ("bops", p.limits.bops),
                                ("latency", p.limits.latency)) if v is not None}  # fmt: skip
    return {
        "layers": [{"name": layer.name, "choices": [
            {"format": c.format, "cost": c.cost, "size": c.size, "bops": c.bops, "latency": c.latency}
            for c in layer.choices]} for layer in p.layers],
        "ties": [list(t) for t in p.ties], "limits": limits,
    }  # fmt: skip


def solve_row(label: str, p: ChoiceProblem, tmp: Path) -> dict[str, Any]:
    """`p` solved in-process and by `memplan bits` in a fresh interpreter (timed around it)."""
    t0 = time.perf_counter()
    sol = solve_multiple_choice(p, TIME_LIMIT_S)
    in_process = time.perf_counter() - t0
    path, out = tmp / f"{label}.json", tmp / f"{label}.solution.json"
    path.write_text(json.dumps(to_document(p)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "memplan.planner.cli", "bits", str(path), "-o", str(out),
           "--time-limit", str(TIME_LIMIT_S)]  # fmt: skip
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - t1
    cli = json.loads(out.read_text()) if proc.returncode == 0 else {}
    doc = solution_to_dict(p, sol)
    counts: dict[str, int] = {}
    for f in sol.formats or ():
        counts[f] = counts.get(f, 0) + 1
    return {
        "case": label, "layers": len(p.layers), "formats": len(FORMATS), "ties": len(p.ties),
        "status": sol.status, "objective": sol.objective, "gap": sol.gap, "solve_s": round(in_process, 3),
        "cli_exit": proc.returncode, "cli_status": cli.get("status", proc.stderr.strip()[-200:]),
        "cli_same": cli.get("choice") == doc["choice"], "cli_solver_s": cli.get("time_s"),
        "cli_wall_s": round(wall, 3), "goal": "met" if max(in_process, wall) < GOAL_S else "MISSED",
        "chosen": ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    }  # fmt: skip


COLUMNS = ["case", "layers", "formats", "ties", "status", "objective", "gap", "solve_s", "cli_status",
           "cli_same", "cli_solver_s", "cli_wall_s", "goal", "chosen"]  # fmt: skip


def run(quick: bool) -> Result:
    base = problem()
    cases = [(f"size {b:g} bits", limits_at(base, b)) for b in (QUICK_BITS if quick else MEAN_BITS)]
    cases.append((f"size 4.25 bits + latency {LATENCY_SHARE:g}", limits_at(base, 4.25, LATENCY_SHARE)))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [solve_row(label.replace(" ", "_"), ChoiceProblem(base.layers, base.ties, lim), Path(tmp))
                for label, lim in cases]  # fmt: skip
    for row, (label, _) in zip(rows, cases, strict=True):
        row["case"] = label
    slowest = max(max(r["solve_s"], r["cli_wall_s"]) for r in rows)
    numel = sum(_numel(layer) for layer in base.layers)
    notes = [
        f"Llama-2-70B-shaped: {len(base.layers)} weights ({numel / 1e9:.2f}B elements), {len(FORMATS)} "
        f"formats ({', '.join(f.label for f in FORMATS)}), {len(base.ties)} ties; seed {SEED}",
        f"slowest {slowest:.2f} s; {sum(r['goal'] == 'met' for r in rows)} of {len(rows)} cases under "
        f"{GOAL_S:g} s (in-process and as a command)",
        "solve_s: solve_multiple_choice in-process; cli_wall_s: the whole `memplan bits` process (start-up, "
        "file reading and writing included); cli_solver_s: its solver's own time; cli_same: the command "
        "chose the same formats",
    ]
    title = f"bitwidth ILP at 70B scale: {len(base.layers)} weights x {len(FORMATS)} formats"
    return Result("bitwidth_scale", title, COLUMNS, rows, notes)
