"""`memplan run plan.json`: run the planned step for real on this machine and compare with the prediction.

Exit code 0 when the measured device peak is within the plan's budget, 1 when it is not.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run", help="run a zoo model's planned step and measure its real peak", description=__doc__
    )
    p.add_argument("plan", help="a plan file written by `memplan plan` for a zoo:NAME model")
    p.add_argument(
        "--arena",
        action="store_true",
        help="inference plans: run inside one preallocated arena per tier at the planned offsets",
    )
    p.add_argument(
        "--prompt-file",
        help="generation plans: a text file whose bytes are the prompt's token ids (default: the zoo's "
        "example prompt)",
    )
    p.add_argument(
        "--emulate",
        action="append",
        default=[],
        choices=["cxl"],
        help="back this tier with host memory (reported as emulated)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memplan.planner.api import load
    from memplan.planner.run import run_plan

    plan = load(args.plan)
    console = Console()
    if plan.workload.gen > 0:
        from memplan.planner.run import run_generation_plan

        with console.status(f"generating {plan.workload.gen} tokens with {plan.model.name}, as planned..."):
            result = run_generation_plan(plan, args.prompt_file)
        console.print(result.describe(), highlight=False)
        return 0 if result.comparison.within_budget and result.tokens_equal else 1
    if args.arena:
        from memplan.planner.run import run_arena_for_plan

        with console.status(f"running {plan.model.name} inside its planned arena..."):
            text = run_arena_for_plan(plan)
        console.print(text, highlight=False)
        return 0 if text.startswith("arena run OK") else 1
    with console.status(
        f"running {plan.model.name} ({plan.workload.mode}) under the live-storage tracker..."
    ):
        _, comparison = run_plan(plan, emulate=args.emulate)
    console.print(comparison.describe(), highlight=False)
    if args.emulate:
        console.print(f"[yellow]emulated tiers: {', '.join(args.emulate)} (backed by host memory)[/yellow]")
    return 0 if comparison.within_budget else 1
