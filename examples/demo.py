"""The main job, on embedded defaults: plan and run GPT-2 small on this machine, and prove the plan.

    make demo        # or: .venv/bin/python examples/demo.py [--batch 4 --seq 256 --budget 2.5GiB]

1. Plans a GPT-2-small training step (forward, loss, backward, AdamW update) and an inference forward on
   the `cpu` hardware preset under a device budget, prints the summary tables, writes `plan.json` (the
   training plan) and `timeline.png` (its memory timeline).
2. Verifies the plan's invariants, runs both steps for real on the CPU under the live-storage tracker, and
   prints predicted vs measured peak: the budget is a peak in bytes, and the run proves it.
3. Plans a generation (`model.generate`, 16 new tokens) with a device budget below the weights: the
   placement pass streams the rest from the SSD tier; runs it and checks the tokens are the plain model's.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from rich.console import Console

import memplan
from memplan.planner.plot import plot_timeline
from memplan.planner.report import render_summary
from memplan.planner.run import run_plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--budget", default="2.5GiB")
    ap.add_argument("--out", default="plan.json")
    ap.add_argument("--png", default="timeline.png")
    ap.add_argument("--gen-budget", default="350MiB", help="device budget of the generation (part 3)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    ok = True
    for mode, optimizer, path in (("train", "adamw", args.out), ("infer", "none", None)):
        console.rule(
            f"{args.model}: {mode} step, batch {args.batch} x {args.seq} tokens, budget {args.budget}"
        )
        t0 = time.perf_counter()
        with console.status(f"planning the {mode} step..."):
            plan = memplan.plan(
                args.model,
                mode=mode,
                budget=args.budget,
                hardware="cpu",
                batch=args.batch,
                seq=args.seq,
                optimizer=optimizer,
            )
        console.print(f"planned in {time.perf_counter() - t0:.1f} s")
        render_summary(plan, console)
        report = memplan.verify(plan)
        console.print(f"verify: {'ok' if report.ok else report.violations}")
        ok &= report.ok
        if path:
            plan.save(path)
            plot_timeline(plan, args.png)
            console.print(f"wrote {path} and {args.png}")
        with console.status(f"running the {mode} step on the CPU under the tracker..."):
            _, comparison = run_plan(plan)
        console.print(comparison.describe(), highlight=False)
        ok &= comparison.within_budget and abs(comparison.peak_error) <= 0.05
    ok &= _generation(args.model, args.gen_budget, console)
    return 0 if ok else 1


def _generation(model: str, budget: str, console: Console) -> bool:
    """Part 3: a generation whose weights do not all fit the device budget."""
    from memplan.planner.run import run_generation_plan

    console.rule(f"{model}: generate 16 tokens after a 64-token prompt, budget {budget} (below the weights)")
    t0 = time.perf_counter()
    with console.status("planning the generation..."):
        plan = memplan.plan(model, mode="infer", budget=budget, hardware="cpu", batch=1, seq=64, gen=16)
    console.print(f"planned in {time.perf_counter() - t0:.1f} s")
    for report in plan.passes[1:]:
        console.print(f"{report.name}: {report.solver.status}; " + "; ".join(report.notes), highlight=False)
    with console.status("generating with the weights streamed from the SSD tier..."):
        result = run_generation_plan(plan)
    console.print(result.describe(), highlight=False)
    return result.tokens_equal and result.comparison.within_budget


if __name__ == "__main__":
    sys.exit(main())
