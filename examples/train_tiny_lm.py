"""Train tiny-lm (memplan's own small byte-level GPT) and cache it for `zoo:tiny-lm`.

    python examples/train_tiny_lm.py                 # the reference run, cached in ~/.cache/memplan/tiny-lm
    python examples/train_tiny_lm.py --steps 50 --out /tmp/tiny-lm   # a quick try

The cache directory is `$MEMPLAN_CACHE/tiny-lm` when MEMPLAN_CACHE is set. The model, the data and the
reference figures are described in docs/tiny-lm.md; the code is memplan/planner/tiny_lm.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memplan.zoo.tiny_lm import DEFAULT_STEPS, TrainReport, TrainSettings, cache_dir, train_tiny_lm


def report_table(report: TrainReport) -> Table:
    """The run's figures as a two-column table."""
    table = Table(title="tiny-lm training", show_header=False)
    rows = [
        ("steps", f"{report.steps} (batch {report.settings.batch}, {report.tokens_seen:,} bytes seen)"),
        ("time", f"{report.seconds:.0f} s wall, {report.cpu_seconds:.0f} s CPU, {report.threads} threads"),
        ("train loss", f"{report.train_loss:.4f} nats/byte"),
        ("val loss", f"{report.val_loss:.4f} nats/byte"),
        ("val bits/byte", f"{report.val_bits_per_byte:.3f}"),
        ("unigram bits/byte", f"{report.unigram_bits_per_byte:.3f} (baseline)"),
        ("history (step: val loss)", ", ".join(f"{s}: {v:.3f}" for s, v in report.history)),
        ("cached in", str(report.out_dir)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"default {DEFAULT_STEPS}")
    parser.add_argument("--out", type=Path, default=None, help=f"cache directory (default {cache_dir()})")
    parser.add_argument("--seed", type=int, default=TrainSettings().seed, help="seed of init and data order")
    args = parser.parse_args()
    settings = TrainSettings(seed=args.seed)
    report = train_tiny_lm(steps=args.steps, out_dir=args.out, progress=True, settings=settings)
    Console().print(report_table(report))


if __name__ == "__main__":
    main()
