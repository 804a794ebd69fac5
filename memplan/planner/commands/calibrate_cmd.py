"""`memplan calibrate [--hardware cpu] [--tiers ssd] -o this-machine.json`: measure this machine's speeds.

Times a dense matmul and a large copy on the compute device, and a write and a read through the store of
each slower tier (`--tiers`, default all), and writes the hardware description with those figures in
place of the preset's. Plans made with `--hardware this-machine.json` then price recomputation against
transfers as this machine runs them.
"""

from __future__ import annotations

import argparse

from memplan.errors import InvalidInput
from memplan.units import parse_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "calibrate",
        help="measure this machine's FLOP/s and tier bandwidths into a hardware file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hardware", default="cpu", help="preset or hardware JSON to start from (default cpu)")
    p.add_argument("--tiers", help="comma-separated tiers to measure (default: every tier but the device)")
    p.add_argument("--sample", default="128MiB", help="bytes per copy and per transfer (default 128MiB)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per figure, median kept (default 3)")
    p.add_argument(
        "--emulate", action="append", default=[], help="tier to emulate (cxl), as in `memplan run`"
    )
    p.add_argument("-o", "--output", required=True, help="hardware JSON file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from memplan.ir.hardware import load_hardware
    from memplan.runtime.calibrate import calibrate, write_hardware

    if args.reps < 1:
        raise InvalidInput(f"--reps must be at least 1, got {args.reps}")
    console = Console(stderr=True)
    hw = load_hardware(args.hardware)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()] if args.tiers else None
    with console.status("calibrating") as status:
        new, report = calibrate(
            hw,
            tiers,
            sample_bytes=parse_size(args.sample),
            reps=args.reps,
            emulate=frozenset(args.emulate),
            progress=lambda msg: status.update(f"calibrating: {msg}"),
        )
    write_hardware(
        new,
        args.output,
        f"{hw.name} calibrated by `memplan calibrate` with {report.threads} torch threads in "
        f"{report.seconds:.1f} s",
    )
    table = Table("figure", "was", "measured", title=f"{args.output} ({report.seconds:.1f} s)")
    table.add_row("device FLOP/s", f"{report.preset_flops:.3g}", f"{report.flops:.3g}")
    table.add_row("device bytes/s", f"{report.preset_mem_bw:.3g}", f"{report.mem_bw:.3g}")
    for t in report.tiers:
        table.add_row(f"{t.name} write bytes/s", f"{t.preset_write_bw:.3g}", f"{t.write_bw:.3g}")
        table.add_row(f"{t.name} read bytes/s", f"{t.preset_read_bw:.3g}", f"{t.read_bw:.3g}")
        table.add_row(f"{t.name} compute share", "-", f"{t.compute_share:.2f}")
    Console().print(table)
    return 0
