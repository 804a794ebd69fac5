"""`memplan plan MODEL --mode train|infer --budget SIZE [--hardware NAME|FILE] [--batch N] [--seq N]
-o plan.json`."""

from __future__ import annotations

import argparse

from rich.console import Console

from memplan.planner.api import plan
from memplan.units import format_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "plan", help="plan a model's step under a device budget and write plan.json", description=__doc__
    )
    p.add_argument("model", help="zoo:NAME, a path to an .onnx file, or package.module:factory")
    p.add_argument("--mode", choices=["train", "infer"], default="infer")
    p.add_argument(
        "--budget", help="device peak budget, e.g. 16GiB, 512MiB, 2GB or bytes (default: capacity)"
    )
    p.add_argument(
        "--hardware",
        default="cpu",
        help="preset name (cpu, t4-16gb, a100-40gb, a100-80gb, h100-80gb) or a hardware JSON file",
    )
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument(
        "--optimizer",
        choices=["none", "sgd", "adamw"],
        default="none",
        help="include the optimizer update (and its state) in a training step",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="parameter dtype of zoo models (default fp32)",
    )
    p.add_argument("-o", "--output", default="plan.json", help="where to write the plan (default plan.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    with console.status("planning...") as status:
        result = plan(
            args.model,
            mode=args.mode,
            budget=args.budget,
            hardware=args.hardware,
            batch=args.batch,
            seq=args.seq,
            optimizer=args.optimizer,
            dtype=args.dtype,
            progress=lambda s: status.update(f"planning: {s}"),
        )
    result.save(args.output)
    for report in result.passes[1:]:
        s = report.solver
        console.print(
            f"{report.name}: {s.solver} {s.status} in {s.time_s:.2f} s; " + "; ".join(report.notes),
            highlight=False,
        )
    peak = result.predictions.peak_bytes.get("device", 0)
    console.print(
        f"[green]fits[/green]: device peak {format_size(peak)} <= budget "
        f"{format_size(result.budget_bytes['device'])}; wrote {args.output}"
    )
    return 0
