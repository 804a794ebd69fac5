"""Benchmark of pure recomputation (Checkmate, MLSys 2020): the greedy pass, the region decomposition, the
Checkmate MILP and Moccasin's CP-SAT model (ICML 2023), the last two started from the best schedule before
them, on training graphs and random layered DAGs at 0.9x and 0.8x of the no-recompute peak (the standard
budgets of Checkmate and Moccasin).

Instances: synthetic training graphs (forward then the mirrored backward: gradient node i reads the gradients
of i's readers, i's inputs and i's output, costs twice the forward) of a chain and of U-nets with skip
connections, seeded; and the joint forward + backward graphs of `zoo:gpt2-tiny` and `zoo:llama-tiny` training
steps (batch 4, seq 64) captured with `capture_train_step` and converted by `graph_to_node_link` (node = op
that creates a storage, cost = FLOPs, size = bytes created); and random layered DAGs of 250, 500 and 1000
nodes (`layered`). Per instance, budget and solver: status, total compute, lower bound (the larger of the
solver's proven bound and the sum of all costs), gap, overhead over computing every node once, time. Run:
`python -m bench.run checkmate [--quick]`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.harness import Result
from memplan.ir.frontends.checkmate import from_node_link, graph_to_node_link
from memplan.planner.commands.remat_cmd import problem_of
from memplan.solvers.checkmate_milp import MAX_COLUMNS, milp_columns, solve_checkmate
from memplan.solvers.remat_dag import RematProblem, no_remat_peak, working_set_bound
from memplan.solvers.remat_solve import REGION_MIN_NODES, solve

FRACTIONS = (0.9, 0.8)
SOLVERS = ("greedy", "regions", "milp", "cpsat")
LABELS = {"greedy": "greedy", "regions": "regions", "milp": "checkmate-milp", "cpsat": "moccasin-cpsat"}
LIMIT_S = 20.0
LONG_LIMIT_S = 60.0
"""For graphs of 1000 nodes or more (the decomposition alone takes about 18 s on layered-1000)."""
COLUMNS = [
    "instance",
    "nodes",
    "edges",
    "fraction",
    "budget_B",
    "solver",
    "status",
    "objective",
    "bound",
    "gap",
    "tolerance",
    "overhead",
    "time_s",
]


def training_graph(
    name: str, cost: list[float], size: list[int], preds: list[tuple[int, ...]]
) -> RematProblem:
    """The forward DAG, a loss node, and the mirrored backward (see module docstring)."""
    n = len(cost)
    users: list[list[int]] = [[] for _ in range(n)]
    for j, ps in enumerate(preds):
        for i in ps:
            users[i].append(j)
    names = [f"f{i}" for i in range(n)] + ["loss"]
    c, s, p = list(cost) + [1.0], list(size) + [4], [*preds, (n - 1,)]
    grad = {n - 1: n}  # the loss seeds the gradient of the last forward node
    for i in reversed(range(n)):
        ups = [grad[j] for j in users[i] if j in grad] or [n]
        names.append(f"g{i}")
        c.append(2.0 * cost[i])
        s.append(size[i])
        p.append(tuple(sorted({*ups, *preds[i], i})))
        grad[i] = len(names) - 1
    return RematProblem(tuple(f"{name}:{x}" for x in names), tuple(c), tuple(s), tuple(p))


def chain(n: int, seed: int = 0) -> RematProblem:
    rng = np.random.default_rng(seed)
    cost = [float(x) for x in rng.integers(1, 10, n)]
    size = [int(x) * 1024 for x in rng.integers(1, 8, n)]
    return training_graph(f"chain{n}", cost, size, [()] + [(i - 1,) for i in range(1, n)])


def unet(depth: int, seed: int = 0) -> RematProblem:
    """Encoder levels halve the size and double the cost per byte; decoder level l reads the level below and
    the encoder's skip at level l."""
    rng = np.random.default_rng(seed)
    cost: list[float] = []
    size: list[int] = []
    preds: list[tuple[int, ...]] = []
    enc: list[int] = []
    for level in range(depth + 1):
        preds.append((len(cost) - 1,) if cost else ())
        size.append((1 << 16) >> level)
        cost.append(float(rng.integers(2, 6) * (level + 1)))
        enc.append(len(cost) - 1)
    for level in reversed(range(depth)):
        preds.append((len(cost) - 1, enc[level]))
        size.append((1 << 16) >> level)
        cost.append(float(rng.integers(2, 6) * (level + 1)))
    return training_graph(f"unet{depth}", cost, size, preds)


def layered(n: int, width: int = 5, seed: int = 0, fan: tuple[int, int] = (1, 3)) -> RematProblem:
    """A random layered DAG (no backward pass): layers of `width` nodes; each node after the first layer reads
    `fan` (inclusive range) distinct nodes drawn from the one or two layers before its own; costs uniform in
    1..99, sizes uniform in 1..63 KiB."""
    rng = np.random.default_rng(seed)
    preds: list[tuple[int, ...]] = []
    for i in range(n):
        layer = i // width
        pool = range(max(0, layer - 2) * width, layer * width)
        k = min(int(rng.integers(fan[0], fan[1] + 1)), len(pool))
        preds.append(tuple(sorted(int(x) for x in rng.choice(pool, size=k, replace=False))) if k else ())
    cost = tuple(float(c) for c in rng.integers(1, 100, n))
    size = tuple(int(s) * 1024 for s in rng.integers(1, 64, n))
    return RematProblem(tuple(f"layered{n}:n{i}" for i in range(n)), cost, size, tuple(preds))


def zoo_train_step(name: str) -> RematProblem:
    from memplan.planner.models import capture, load_model

    graph, _ = capture(load_model(f"zoo:{name}", "train", batch=4, seq=64), "train", "none")
    return problem_of(from_node_link(graph_to_node_link(graph), name))


def instances(quick: bool) -> list[tuple[str, RematProblem]]:
    small = [("chain-16", chain(16)), ("unet-3", unet(3))]
    if quick:
        return [*small, ("layered-250", layered(250))]
    return [
        *small,
        ("chain-32", chain(32)),
        ("unet-5", unet(5)),
        ("gpt2-tiny", zoo_train_step("gpt2-tiny")),
        ("llama-tiny", zoo_train_step("llama-tiny")),
        ("layered-250", layered(250)),
        ("layered-500", layered(500)),
        ("layered-1000", layered(1000)),
    ]


def run(quick: bool) -> Result:
    limit = 10.0 if quick else LIMIT_S
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name, problem in instances(quick):
        peak = no_remat_peak(problem)
        limit_here = LONG_LIMIT_S if problem.n >= 1000 and not quick else limit
        methods = [m for m in SOLVERS if m != "regions" or problem.n > REGION_MIN_NODES]
        for fraction in FRACTIONS:
            budget = int(fraction * peak)
            rows += [_row(name, problem, fraction, budget, method, limit_here) for method in methods]
    notes = [
        f"Time limit {limit:g} s per instance, budget and solver ({LONG_LIMIT_S:g} s for layered-1000; "
        "all stages included; HiGHS overruns it by up to 12 s on gpt2-tiny's 94k columns). Every row's "
        "schedule is replayed by the checker in bytes; objective = its total compute summed from the "
        "graph's own costs. bound = the best proven lower bound of the stages run (never below the sum of "
        "all costs: every node is computed at least once); gap = (objective - bound) / objective; status "
        "optimal only where objective - bound <= tolerance (half a cost unit: the costs' gcd, or their sum "
        "/ 1e8), feasible otherwise; timeout = it ran and found no schedule; skipped = the MILP was not run "
        "(more than 150,000 columns; `memplan remat --method milp` would still return its start).",
        "greedy = the best of four eviction orders (DTR-like, cost per byte, Belady, largest first), no "
        "bound of its own. It finds no schedule on the layered graphs: evicting one node there forces "
        "recompute chains whose working sets do not fit.",
        "regions (graphs of more than 48 nodes) = greedy, then `remat_regions`: the order cut by dynamic "
        "programming at cuts with few crossing bytes into regions of 4-24 nodes, each solved by CP-SAT "
        "(3 copies per node) with the crossing tensors pinned resident at its ends, stitched; a region "
        "with no schedule bans its cuts and the cuts are planned again (regions up to 48 nodes). No bound "
        "of its own. In the milp and cpsat rows it takes 40% of the limit (80% where greedy found "
        "nothing) and the solver starts from the best schedule so far.",
        "checkmate-milp: HiGHS, 1 thread, costs in units of their gcd (or sum / 1e8), relative gap 0, "
        "absolute gap 0.5 units, primal and integer feasibility tolerances 1e-9, warm-started "
        "(Highs.setSolution) from the best start.",
        "moccasin-cpsat: first the LP relaxation of the Checkmate MILP (HiGHS, at most 30% of the limit, "
        "where the formulation can be built and solved in that time: up to about 250 nodes), then CP-SAT "
        "(OR-Tools 9.15, 2 workers) hinted with the best start. Graphs with at most 10k serve literals "
        "(unet-3, unet-5) get the exact model (a copy per stage), whose CP-SAT bound counts; the others 2 "
        "copies per node (more where the hint needs them), a restriction whose own bound is no bound, so "
        "their bound is the LP's (or the sum of costs). CP-SAT with 2 workers is not deterministic: the "
        "objectives of the large rows vary from run to run.",
        "layered-N: `layered(N, seed=0)`: layers of 5 nodes, each reading 1-3 nodes of the two layers "
        "before, costs 1-99, sizes 1-63 KiB; no backward pass. overhead = objective / sum of costs - 1.",
        f"Two CPU cores shared with other jobs. total {time.perf_counter() - t0:.1f} s.",
    ]
    return Result(
        "checkmate",
        "Pure recomputation (Checkmate): greedy vs regions vs MILP vs CP-SAT at 0.9x / 0.8x of the "
        "no-recompute peak",
        COLUMNS,
        rows,
        notes,
    )


def _row(
    name: str, problem: RematProblem, fraction: float, budget: int, method: str, limit: float
) -> dict[str, Any]:
    head = {
        "instance": name,
        "nodes": problem.n,
        "edges": sum(len(set(p)) for p in problem.preds),
        "fraction": fraction,
        "budget_B": budget,
        "solver": LABELS[method],
    }
    if budget < working_set_bound(problem):
        return head | {"status": f"below working set {working_set_bound(problem)} B"}
    if method == "milp" and milp_columns(problem) > MAX_COLUMNS:
        res = solve_checkmate(problem, budget, limit)  # skipped at once: no start is worth computing
    else:
        res = solve(problem, budget, limit, method=method)  # type: ignore[arg-type]
    once = float(sum(problem.cost))
    obj = res.objective
    return head | {
        "status": res.status,
        "objective": "-" if obj is None else obj,
        "bound": res.bound,
        "gap": "-" if res.gap is None else res.gap,
        "tolerance": res.tolerance,
        "overhead": "-" if obj is None or once <= 0 else obj / once - 1,
        "time_s": res.time_s,
    }
