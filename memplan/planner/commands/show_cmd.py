"""`memplan show plan.json [--png FILE]`: summary tables and, optionally, the memory-timeline plot."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("show", help="summary tables of a plan and its memory timeline", description=__doc__)
    p.add_argument("plan", help="a plan file written by `memplan plan`")
    p.add_argument("--png", help="also write the memory-timeline plot to this PNG file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memplan.planner.api import load
    from memplan.planner.report import render_summary

    plan = load(args.plan)
    console = Console()
    render_summary(plan, console)
    if args.png:
        from memplan.planner.plot import plot_timeline

        plot_timeline(plan, args.png)
        console.print(f"wrote {args.png}")
    return 0
