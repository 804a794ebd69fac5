"""`memplan verify plan.json`: replay the plan's schedule and check its invariants; exit 0 only if all
hold."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify",
        help="check a plan's invariants (uses after defs, capacities, overlaps, prefetches)",
        description=__doc__,
    )
    p.add_argument("plan", help="a plan file written by `memplan plan`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memplan.planner.api import verify

    console = Console()
    report = verify(args.plan)
    for v in report.violations:
        console.print(f"[red]{v.kind}[/red]: {v.message}", highlight=False)
    if report.ok:
        console.print(f"[green]ok[/green]: {args.plan} passes every check ({', '.join(report.checked)})")
        return 0
    console.print(f"[red]{len(report.violations)} violation(s)[/red] in {args.plan}")
    return 1
