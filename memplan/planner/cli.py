"""The `memplan` command line: parse, call the Python API, print. Each subcommand is a module in
`memplan.planner.commands`. User errors print one clear message and exit 2; no traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from rich.console import Console

from memplan import __version__
from memplan.errors import InfeasibleBudget, MemplanError

COMMANDS = (
    "plan_cmd",
    "show_cmd",
    "verify_cmd",
    "export_cmd",
    "run_cmd",
    "alloc",
    "bits_cmd",
    "remat_cmd",
    "zoo_cmd",
    "calibrate_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="memplan",
        description="Plan where every tensor of a model lives, and prove the plan by running it.",
    )
    ap.add_argument("--version", action="version", version=f"memplan {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"memplan.planner.commands.{name}").register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return int(args.func(args))
    except InfeasibleBudget as e:
        err.print(f"[red]infeasible:[/red] {e}", highlight=False)
        return 3
    except MemplanError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
