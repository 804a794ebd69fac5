"""`memplan export plan.json --to FORMAT -o FILE`: write the plan in a format another tool reads."""

from __future__ import annotations

import argparse

from memplan.errors import InvalidInput
from memplan.files import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="export a plan (chrome-trace, ...)", description=__doc__)
    p.add_argument("plan", help="a plan file written by `memplan plan`")
    p.add_argument(
        "--to",
        required=True,
        dest="fmt",
        help="format: chrome-trace, torch-sac, deepspeed, accelerate, torchao, compressed-tensors, prefixkv "
        "or kvpress",
    )
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memplan.planner.api import load
    from memplan.planner.exporters import EXPORTERS

    if args.fmt not in EXPORTERS:
        raise InvalidInput(f"unknown export format {args.fmt!r}; available: {', '.join(sorted(EXPORTERS))}")
    plan = load(args.plan)
    atomic_write_text(args.output, EXPORTERS[args.fmt](plan))
    Console().print(f"wrote {args.output} ({args.fmt})")
    return 0
