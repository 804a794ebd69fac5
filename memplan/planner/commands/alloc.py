"""`memplan alloc problem.csv [--capacity N] [--timeout S] [-o out.csv]`: offsets for a MiniMalloc CSV.

Reads `id,lower,upper,size[,alignment]` rows (buffer live on [lower, upper)), packs them with the
portfolio (greedy best fit, then exact search) and writes the same rows with an `offset` column to `-o`
(or stdout). Without `--capacity` the arena height is minimised. `--validate` instead checks a solution
file (rows with `offset`). Exit codes: 0 packed (or valid), 1 invalid solution, 3 proven infeasible at
this capacity, 4 no packing found in the time limit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from memplan.errors import InvalidInput
from memplan.units import parse_size

if TYPE_CHECKING:
    from rich.console import Console

    from memplan.solvers.packing import Problem, Solution


EXIT_INVALID, EXIT_INFEASIBLE, EXIT_TIMEOUT = 1, 3, 4


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "alloc",
        help="offsets for buffers in a MiniMalloc CSV (static memory allocation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("problem", help="CSV with id,lower,upper,size[,alignment] (and offset, for --validate)")
    p.add_argument("--capacity", help="arena size in bytes (e.g. 1048576 or 1MiB); default: minimise")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for the solver (default 10)")
    p.add_argument("-o", "--output", help="write the solution CSV here (default: stdout)")
    p.add_argument("--validate", action="store_true", help="check the offsets in PROBLEM instead of solving")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Parse, solve or validate, print a one-line summary to stderr, write the CSV."""
    from rich.console import Console

    from memplan.solvers.packing import Status, csv_format, solve

    capacity = _capacity(args.capacity)
    if args.timeout <= 0:
        raise InvalidInput(f"--timeout {args.timeout}: must be a positive number of seconds")
    problem, offsets = csv_format.read(args.problem, capacity)
    err = Console(stderr=True, highlight=False)
    if args.validate:
        return _validate(problem, offsets, args.problem, err)
    sol = solve(problem, args.timeout)
    err.print(_summary(problem, sol, args.timeout))
    fits = sol.status in (Status.OPTIMAL, Status.FEASIBLE)
    if fits and sol.offsets_bytes is not None:
        text = csv_format.render(problem, list(sol.offsets_bytes))
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    return EXIT_INFEASIBLE if sol.status is Status.INFEASIBLE else EXIT_TIMEOUT


def _capacity(text: str | None) -> int | None:
    if text is None:
        return None
    value = parse_size(text)
    if value <= 0:
        raise InvalidInput(f"--capacity {text}: must be a positive number of bytes")
    return value


def _summary(problem: Problem, sol: Solution, timeout_s: float) -> str:
    from memplan.solvers.packing import Status

    n = len(problem.buffers)
    cap = problem.capacity_bytes
    if sol.status is Status.INFEASIBLE:
        return (
            f"[red]infeasible[/red] at capacity {cap}: no packing of the {n} buffers fits "
            f"(proven lower bound {sol.lower_bound_bytes} bytes, by {sol.solver})"
        )
    if sol.status is Status.TIMEOUT:
        best = f"; lowest packing found needs {sol.height_bytes} bytes" if sol.height_bytes else ""
        return (
            f"[yellow]no packing found in {timeout_s:g} s[/yellow] within capacity {cap} "
            f"(lower bound {sol.lower_bound_bytes}{best})"
        )
    ratio = sol.height_bytes / sol.lower_bound_bytes if sol.lower_bound_bytes and sol.height_bytes else 1.0
    return (
        f"[green]{sol.status.value}[/green]: {n} buffers, height {sol.height_bytes} bytes, lower bound "
        f"{sol.lower_bound_bytes} ({ratio:.4f}x), {sol.time_s:.2f} s, by {sol.solver}"
    )


def _validate(problem: Problem, offsets: list[int] | None, source: str, err: Console) -> int:
    from memplan.solvers.packing import validate

    if offsets is None:
        raise InvalidInput(f"{source}: --validate needs an offset column (a solution file)")
    violations = validate(problem, offsets)
    for v in violations:
        err.print(f"[red]{v.kind.value}[/red]: {v.message}")
    if violations:
        err.print(f"[red]{len(violations)} violation(s)[/red] in {source}")
        return EXIT_INVALID
    height = max((o + b.size_bytes for o, b in zip(offsets, problem.buffers, strict=True)), default=0)
    err.print(f"[green]valid[/green]: {len(offsets)} buffers, height {height} bytes")
    return 0
