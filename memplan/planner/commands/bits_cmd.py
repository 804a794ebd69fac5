"""`memplan bits problem.json [-o solution.json] [--time-limit S]`: one format per layer (mixed precision).

Reads a multiple-choice problem (each layer's formats with a cost and the size, BOPs and latency each takes;
ties between layers that must share a format; limits on the summed size, BOPs and latency: see
`memplan.planner.bits_file`), solves it exactly (`memplan.solvers.multiple_choice`, a MILP on HiGHS) and
writes `{"status", "objective", "bound", "gap", "choice", "layers", "usage", "time_s"}` to `-o` (atomically)
or stdout, with a one-line summary on stderr. Exit codes: 0 solved (status optimal, or feasible: the best
found in the time limit), 2 a malformed problem file, 3 infeasible (a limit below the least of its resource
any choice reaches, which the message gives, or limits that no choice meets together), 4 no choice found
in the time limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from memplan.errors import InvalidInput

if TYPE_CHECKING:
    from memplan.solvers.multiple_choice import ChoiceProblem, ChoiceSolution

EXIT_INFEASIBLE, EXIT_TIMEOUT = 3, 4


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bits",
        help="one format per layer under size / BOPs / latency limits (HAWQ-V3-style mixed precision)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("problem", help="JSON: layers' choices (format, cost, size, bops, latency), ties, limits")
    p.add_argument("-o", "--output", help="write the solution JSON here (default: stdout)")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for the solver (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read, solve, print a summary to stderr, write the solution; the exit code of the outcome."""
    from rich.console import Console

    from memplan.files import atomic_write_text
    from memplan.planner.bits_file import read_problem, solution_to_dict
    from memplan.solvers.multiple_choice import solve_multiple_choice

    if not args.time_limit > 0:
        raise InvalidInput(f"--time-limit {args.time_limit}: must be a positive number of seconds")
    problem = read_problem(args.problem)
    sol = solve_multiple_choice(problem, args.time_limit)
    err = Console(stderr=True, highlight=False)
    err.print(summary(problem, sol))
    if sol.formats is None:
        return EXIT_INFEASIBLE if sol.status == "infeasible" else EXIT_TIMEOUT
    text = json.dumps(solution_to_dict(problem, sol), indent=1) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def summary(problem: ChoiceProblem, sol: ChoiceSolution) -> str:
    """One line: the outcome, and for an infeasible limit the least its resource can be."""
    from memplan.solvers.multiple_choice import RESOURCES

    n = len(problem.layers)
    if sol.shortfalls:
        return "\n".join(
            f"[red]infeasible:[/red] limits.{s.resource} = {s.limit!r} is below {s.minimum!r}, the least "
            f"{s.resource} any choice reaches (every tie group at its smallest format)"
            for s in sol.shortfalls
        )
    if sol.status == "infeasible":
        limited = [r for r in RESOURCES if getattr(problem.limits, r) is not None]
        least = ", ".join(f"{r} {getattr(sol.minimum, r)!r}" for r in limited)
        return (
            "[red]infeasible:[/red] no choice meets all the limits together, though each alone is "
            f"reachable (least {least}); relax one of them"
        )
    if sol.status == "timeout":
        found = f"[yellow]no choice found in {sol.time_limit_s:g} s[/yellow]"
        return f"{found} for {n} layers; raise --time-limit"
    gap = "-" if sol.gap is None else f"{sol.gap:.2e}"
    return (
        f"[green]{sol.status}[/green]: {n} layers, objective {sol.objective!r}, bound {sol.bound!r}, "
        f"gap {gap}, {sol.time_s:.3f} s"
    )
