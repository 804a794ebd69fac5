"""`memplan remat graph.json --budget-fraction 0.8 [--timeout S]`: pure recomputation on a Checkmate DAG.

Reads a networkx node-link JSON DAG (each node with a compute `cost`/`cpu`/`runtime` and an output
`size`/`mem`/`ram` in bytes; see `memplan.ir.frontends.checkmate`), sets the budget to the fraction of the
no-recompute peak (or to `--budget` bytes), and solves with the greedy pass, the region decomposition
(graphs of more than 48 nodes), then the Checkmate MILP (HiGHS) on small graphs or Moccasin's CP-SAT model
on large ones, started from the best schedule so far (`--method` picks one; see
`memplan.solvers.remat_solve`). Prints a table: nodes, edges, peak, budget, solver, status, total compute,
lower bound, gap, overhead over computing every node once, time. Status optimal means the total is within
the printed tolerance (half a cost unit) of a proven lower bound; feasible, a schedule with the gap shown;
skipped, the MILP was not run (graph too large). Exit codes: 0 a schedule was found, 3 proven infeasible,
4 none found in the time limit, 5 none found and the MILP asked for was skipped.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from memplan.errors import InvalidInput
from memplan.units import parse_size

if TYPE_CHECKING:
    from rich.table import Table

    from memplan.ir.frontends.checkmate import DagGraph
    from memplan.solvers.remat_dag import RematProblem, RematResult


EXIT_INFEASIBLE, EXIT_TIMEOUT, EXIT_SKIPPED = 3, 4, 5


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "remat",
        help="optimal recomputation schedule for a DAG (Checkmate)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("graph", help="networkx node-link JSON: nodes with cost and size, links as dependencies")
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=0.8,
        help="budget as a fraction of the no-recompute peak (default 0.8)",
    )
    p.add_argument("--budget", help="budget in bytes (e.g. 4MiB); overrides --budget-fraction")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the solvers (default 60)")
    p.add_argument(
        "--method",
        choices=("auto", "milp", "cpsat", "greedy", "regions"),
        default="auto",
        help="auto: greedy, regions, then the MILP (small graphs) or CP-SAT (large ones); keep the best "
        "(default)",
    )
    p.set_defaults(func=run)


def problem_of(dag: DagGraph) -> RematProblem:
    """The solver's problem for a DAG read by the frontend."""
    from memplan.solvers.remat_dag import RematProblem

    return RematProblem(dag.names, dag.cost, dag.size, dag.preds)


def budget_for(problem: RematProblem, fraction: float | None, budget: str | None) -> int:
    """Bytes: `budget` if given, else `fraction` of the no-recompute peak (rounded down)."""
    from memplan.solvers.remat_dag import no_remat_peak

    if budget is not None:
        value = parse_size(budget)
        if value <= 0:
            raise InvalidInput(f"--budget {budget}: must be a positive number of bytes")
        return value
    if fraction is None or not 0 < fraction <= 10:
        raise InvalidInput(f"--budget-fraction {fraction}: must be a number in (0, 10], e.g. 0.8")
    return int(fraction * no_remat_peak(problem))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memplan.ir.frontends.checkmate import load_node_link
    from memplan.solvers.remat_solve import solve

    if args.timeout <= 0:
        raise InvalidInput(f"--timeout {args.timeout}: must be a positive number of seconds")
    dag = load_node_link(args.graph)
    problem = problem_of(dag)
    budget = budget_for(problem, args.budget_fraction, args.budget)
    result = solve(problem, budget, args.timeout, method=args.method)
    Console(highlight=False).print(render(dag.name, problem, budget, result))
    if result.schedule is not None:
        return 0
    return {"infeasible": EXIT_INFEASIBLE, "skipped": EXIT_SKIPPED}.get(result.status, EXIT_TIMEOUT)


def render(name: str, problem: RematProblem, budget: int, result: RematResult) -> Table:
    """The result as a two-column table (quantity, value)."""
    from rich.table import Table

    from memplan.solvers.remat_dag import no_remat_peak

    table = Table(title=f"recomputation schedule for {name}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    once = float(sum(problem.cost))
    obj = result.objective
    rows = [
        ("nodes", str(problem.n)),
        ("edges", str(sum(len(set(p)) for p in problem.preds))),
        ("no-recompute peak (bytes)", str(no_remat_peak(problem))),
        ("budget (bytes)", str(budget)),
        ("solver", result.solver),
        ("status", result.status),
        ("optimal within (cost units)", f"{result.tolerance:.6g}"),
        ("total compute", "-" if obj is None else f"{obj:.6g}"),
        ("lower bound", f"{result.bound:.6g}"),
        ("gap", "-" if result.gap is None else f"{result.gap:.2%}"),
        ("overhead vs computing once", "-" if obj is None or once <= 0 else f"{obj / once - 1:+.2%}"),
        ("time (s)", f"{result.time_s:.2f}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
