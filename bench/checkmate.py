"""Benchmark of pure recomputation (Checkmate, MLSys 2020): the greedy pass, the Checkmate MILP and Moccasin's
CP-SAT model (ICML 2023), both warm-started from the greedy schedule, on training graphs at 0.9x and 0.8x of
the no-recompute peak (the standard budgets of Checkmate and Moccasin).

Instances: synthetic training graphs (forward then the mirrored backward: gradient node i reads the gradients
of i's readers, i's inputs and i's output, costs twice the forward) of a chain and of U-nets with skip
connections, seeded; and the joint forward + backward graphs of `zoo:gpt2-tiny` and `zoo:llama-tiny` training
steps (batch 4, seq 64) captured with `capture_train_step` and converted by `graph_to_node_link` (node = op
that creates a storage, cost = FLOPs, size = bytes created). Per instance, budget and solver: status, total
compute, lower bound (the larger of the solver's proven bound and the sum of all costs), gap, overhead over
computing every node once, time. Run: `python -m bench.run checkmate [--quick]`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.harness import Result
from memplan.ir.frontends.checkmate import from_node_link, graph_to_node_link
from memplan.planner.commands.remat_cmd import problem_of
from memplan.solvers.remat_dag import RematProblem, no_remat_peak, working_set_bound
from memplan.solvers.remat_solve import solve

FRACTIONS = (0.9, 0.8)
SOLVERS = ("greedy", "milp", "cpsat")
LABELS = {"greedy": "greedy", "milp": "checkmate-milp", "cpsat": "moccasin-cpsat"}
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
        return [*small, ("gpt2-tiny", zoo_train_step("gpt2-tiny"))]
    return [
        *small,
        ("chain-32", chain(32)),
        ("unet-5", unet(5)),
        ("gpt2-tiny", zoo_train_step("gpt2-tiny")),
        ("llama-tiny", zoo_train_step("llama-tiny")),
    ]


def run(quick: bool) -> Result:
    limit = 10.0 if quick else 50.0
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name, problem in instances(quick):
        peak = no_remat_peak(problem)
        for fraction in FRACTIONS:
            budget = int(fraction * peak)
            rows += [_row(name, problem, fraction, budget, method, limit) for method in SOLVERS]
    notes = [
        f"Time limit {limit:g} s per instance, budget and solver (greedy included). greedy = the best of "
        "four eviction orders (DTR-like, cost per byte, Belady, largest first), no bound of its own.",
        "checkmate-milp: HiGHS, 1 thread, relative gap 1e-4, warm-started from the greedy schedule "
        "(Highs.setSolution: HiGHS keeps it as its first incumbent, so a feasible row at the greedy "
        "objective means the MILP found nothing better). It has n(n+1)/2 binaries each for R and S plus "
        "one FREE binary per (stage, node, input); above 150,000 columns it is not attempted (HiGHS overran "
        "a 50 s limit by 6x on llama-tiny's 300k columns): status timeout.",
        "moccasin-cpsat: CP-SAT (OR-Tools 9.15, 2 workers) hinted with the greedy schedule; each node has "
        "optional copies with retention intervals over the stage model's compute positions, memory is one "
        "cumulative constraint. Graphs with at most 10k serve literals (unet-3, unet-5) get a copy per "
        "stage: the exact stage model, so CP-SAT's bound counts. The others get 2 copies per node (more "
        "where the greedy hint recomputes a node more often): a restriction, whose CP-SAT bound is no lower "
        "bound for the problem, so those rows report the trivial bound, and status feasible even where "
        "CP-SAT proved the restricted model optimal (then time_s is below the limit).",
        "Every schedule is replayed by the checker in bytes. CP-SAT with 2 workers is not deterministic "
        "(parallel LNS): the objectives of the gpt2-tiny and llama-tiny rows vary from run to run.",
        "bound = max(solver's proven bound, sum of all costs): every node is computed at least once; gap = "
        "(objective - bound) / objective; overhead = objective / sum of costs - 1; status timeout = no "
        "schedule found in the limit.",
        f"total {time.perf_counter() - t0:.1f} s.",
    ]
    return Result(
        "checkmate",
        "Pure recomputation (Checkmate): greedy vs MILP vs CP-SAT at 0.9x / 0.8x of the no-recompute peak",
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
    res = solve(problem, budget, limit, method=method)  # type: ignore[arg-type]
    once = float(sum(problem.cost))
    obj = res.objective
    return head | {
        "status": res.status,
        "objective": "-" if obj is None else obj,
        "bound": res.bound,
        "gap": "-" if res.gap is None else res.gap,
        "overhead": "-" if obj is None or once <= 0 else obj / once - 1,
        "time_s": res.time_s,
    }
