"""Training memory at equal measured peak: memplan vs per-block checkpointing vs torch.compile's budget.

    .venv/bin/python -m bench.run train --quick          # gpt2-tiny and llama-tiny, 4 x 64 tokens, ~4 min
    .venv/bin/python -m bench.train                      # the full run (GPT-2 small and a Llama of its size)
    .venv/bin/python -m bench.train --batch 2 --seq 128  # the full run at another size

For each model (full run: GPT-2 small and `llama-gpt2size`, a 134M Llama-style model, at batch x seq tokens;
quick run: `gpt2-tiny` and `llama-tiny`), on the CPU, every method runs the same training step (forward and
backward of the model's loss, no optimizer), and every peak is the live-storage tracker's measurement of that
step (parameters and inputs counted as live), so methods compare at equal *measured* peak:

1. plain: the eager step, no plan. Its loss and gradients are the reference; its peak is "plain peak".
2. memplan: budgets at `fractions` (90%, 70%, 50%, ...) of the plain peak, until the first `InfeasibleBudget`
   (its lower bound is recorded), then once more at that lower bound (memplan's lowest point). Each budget
   is planned (`memplan.plan`, default passes, planning time includes capture; hardware: the `cpu` preset
   with this machine's FLOP/s, memory and SSD bandwidth measured by `memplan.runtime.calibrate` at the start
   of the run) and run under `memplan.applied`; the row says whether the measured peak held the budget, and
   whether loss and gradients are bitwise equal to the plain step's (required when the plan only keeps or
   swaps) or allclose (rtol 1e-5, atol 1e-6).
3. checkpoint: every transformer block wrapped in `torch.utils.checkpoint.checkpoint(use_reentrant=False)`.
4. compile: `torch.compile(backend="aot_eager_decomp_partition")` for each `activation_memory_budget` in
   1.0 ... 0.05; compilation happens in the warm-up and is excluded from the step time.
5. memplan-torch: each budget planned for PyTorch's own mechanisms instead (`plan_for_torch`: planned lower
   until the torch mechanism's peak, predicted by a dry run on fake tensors, fits the budget) and run under
   `memplan.applied(..., mechanism="torch")` (SAC for the recomputing blocks, saved-tensor hooks for swaps);
   "refused" when no such plan fits (the row has the lowest predicted peak).
6. memplan's twin of each peer point: memplan planned with the peer's *measured* peak as its budget, so the
   two compare at equal measured peak (or memplan's is lower: a plan holds its budget).

Timing (see `train_peers.time_rounds`): after its tracked step, a method is timed in `reps` rounds together
with the plain step and, for a peer point, its memplan twin; each round times one step of each, in an order
rotated by one per round. `overhead_%` is the method's median step over the plain step's median in the same
rounds, minus 1, so a drift of the machine's speed during the run (seen here: 20%) moves both alike, and a
peer and its twin share their rounds. Plans run on a deep copy of the model (the "twin"), so that a peer's
patches (checkpointed blocks, a compiled module) and an applied plan coexist; the copy's parameters equal
the model's, so the gradients compare with the plain step's. The notes compare memplan with each peer point
at that point's memory level, and the run ends with the planning time of Llama-2-7B (batch 1, 4,096 tokens,
A100-80GB, captured on the meta device). The Pareto plot is `bench/results/train_pareto.png`. A crash of
any method is recorded in its row, not raised.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch

import memplan
from bench.harness import RESULTS, Result, markdown, write
from bench.train_peers import (
    LLAMA_GPT2SIZE,
    BenchModel,
    LossCall,
    MiB,
    StepRun,
    checkpointed,
    compiled,
    level_notes,
    load_bench_model,
    measure,
    peer_label,
    time_rounds,
    without_checkpoints,
    write_pareto,
)
from memplan.errors import InfeasibleBudget
from memplan.ir.hardware import Hardware, load_hardware
from memplan.planner.torch_mechanism import plan_for_torch
from memplan.plans.plan import Plan
from memplan.runtime.calibrate import calibrate
from memplan.runtime.eager_peak import TorchOverBudget
from memplan.units import format_size

COLUMNS = ["model", "method", "knob", "peak_MiB", "peak/plain", "step_s", "overhead_%",
           "predicted_overhead_%", "within_budget", "grads", "plan_s", "keep/swap/recompute/split", "solver"]
PLOT = RESULTS / "train_pareto.png"


@dataclass(frozen=True)
class ScaleConfig:
    """The planning-time check at scale: plan `model` at `fractions` of its baseline peak, first that fits."""

    model: str = "llama2-7b"
    batch: int = 1
    seq: int = 4096
    hardware: str = "a100-80gb"
    fractions: tuple[float, ...] = (0.7, 0.9)


@dataclass(frozen=True)
class TrainConfig:
    """What one run measures; `FULL` and `QUICK` below are the two the harness runs."""

    models: tuple[str, ...]
    batch: int
    seq: int
    warmup: int = 0
    """Untracked steps before the tracked one; compile always gets one (compilation), memplan needs none
    (its capture runs in the tracked step, outside the tracker, and that step is not timed)."""
    reps: int = 2
    fractions: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.1)
    compile_budgets: tuple[float, ...] = (1.0, 0.7, 0.4, 0.2, 0.05)
    threads: int | None = None
    """torch intra-op threads; None leaves torch's default (all cores)."""
    scale: ScaleConfig | None = ScaleConfig()
    calibrate_bytes: int | None = 256 * MiB
    """Sample size of the calibration memplan plans with (None: the `cpu` preset's figures as they are)."""


FULL = TrainConfig(models=("gpt2", LLAMA_GPT2SIZE), batch=4, seq=256, reps=5)
QUICK = TrainConfig(models=("gpt2-tiny", "llama-tiny"), batch=4, seq=64, threads=1,
                    scale=ScaleConfig("llama-tiny", batch=1, seq=128), calibrate_bytes=32 * MiB)


# ---------------------------------------------------------------------------------------------------
# Rows


def _row(model: str, method: str, knob: str, run: StepRun | None, **more: Any) -> dict[str, Any]:
    """A table row (progress goes to stderr as each one is made: a full run takes minutes)."""
    row: dict[str, Any] = {"model": model, "method": method, "knob": knob}
    if run is not None and run.times:
        row |= {"peak_MiB": run.peak_bytes / MiB, "step_s": run.step_s, "overhead_%": 100 * run.overhead,
                "plain_s": statistics.median(run.plain_times), "grads": run.equal, "times_s": run.times,
                "plain_times_s": run.plain_times, "warmup_s": run.warmup_s, "ops": run.ops}
        print(f"[train] {model} {method} {knob}: peak {run.peak_bytes / MiB:.1f} MiB, "
              f"step {run.step_s:.2f} s ({100 * run.overhead:+.1f}%), warm-up {run.warmup_s:.1f} s, "
              f"{run.equal}",
              file=sys.stderr, flush=True)
    else:
        if run is not None:  # tracked but not timed: its run says why
            more.setdefault("grads", run.equal)
        print(f"[train] {model} {method} {knob}: {more.get('solver') or more.get('grads')}", file=sys.stderr,
              flush=True)
    return row | more


def _remat_report(plan: Plan) -> dict[str, Any]:
    """Keep / swap / recompute / split counts and MiB, solver status and gap of the remat_swap pass."""
    tensors = plan.decisions.remat.tensors if plan.decisions.remat else ()
    split = {d: [t for t in tensors if t.decision == d] for d in ("keep", "swap", "recompute", "split")}
    report = next((p for p in plan.passes if p.name == "remat_swap"), None)
    gap = report.solver.gap if report is not None else None
    compute_s = sum(e.duration_s for e in plan.events if e.kind == "compute")  # the plan-free step
    return {
        "keep/swap/recompute/split": "/".join(str(len(ts)) for ts in split.values()),
        "recomputed": len(split["recompute"]) + len(split["split"]),
        "split_MiB": {d: sum(t.size_bytes for t in ts) / MiB for d, ts in split.items()},
        "solver": (report.solver.status if report else "-") + (f", gap {gap:.2g}" if gap else ""),
        "solver_gap": gap,
        "pass_s": {p.name: p.time_s for p in plan.passes},
        "predicted_MiB": plan.predictions.peak_bytes.get("device", 0) / MiB,
        "predicted_overhead_%": 100 * (plan.predictions.time_s / compute_s - 1) if compute_s else None,
    }


@dataclass
class Level:
    """The model, its twins (copies that memplan's plans run on, so that a peer's patches on the model and a
    plan applied to a twin coexist: `twin` for the graph mechanism, `eager` for the torch mechanism) and
    the plain step's reference run."""

    model: BenchModel
    twin: BenchModel
    eager: BenchModel
    plain: StepRun
    cfg: TrainConfig
    hw: Hardware


def _plan(lv: Level, budget: int) -> tuple[Plan | None, dict[str, Any]]:
    """Plan the twin at `budget` bytes: (plan, its report) or (None, an infeasible or crash row's fields)."""
    t0 = time.perf_counter()
    try:
        plan = memplan.plan(lv.twin.module, lv.twin.inputs, mode="train", budget=budget, hardware=lv.hw)
    except InfeasibleBudget as e:
        return None, {"plan_s": time.perf_counter() - t0, "within_budget": "infeasible",
                      "lower_bound_bytes": e.lower_bound_bytes,
                      "solver": f"InfeasibleBudget, lower bound {format_size(e.lower_bound_bytes)}"}
    except Exception as e:  # any other planning failure is a finding too
        return None, {"grads": f"CRASH (planning): {e!r}"[:300]}
    return plan, _remat_report(plan) | {"plan_s": time.perf_counter() - t0, "budget_MiB": budget / MiB}


def _torch_plan(lv: Level, budget: int) -> tuple[Plan | None, dict[str, Any]]:
    """A plan the torch mechanism is predicted to hold at `budget` (`plan_for_torch`), with its report, or
    None and the refusal's (or crash's) fields."""
    t0 = time.perf_counter()
    try:
        fit = plan_for_torch(lv.eager.module, lv.eager.inputs, budget, hardware=lv.hw)
    except TorchOverBudget as e:
        return None, {"plan_s": time.perf_counter() - t0, "within_budget": "refused",
                      "budget_MiB": budget / MiB, "predicted_torch_MiB": e.peak_bytes / MiB,
                      "solver": f"TorchOverBudget, lowest predicted {format_size(e.peak_bytes)}"}
    except Exception as e:  # any other planning failure is a finding too
        return None, {"grads": f"CRASH (planning): {e!r}"[:300]}
    fields = {"plan_s": time.perf_counter() - t0, "budget_MiB": budget / MiB,
              "planned_at_MiB": fit.planned_at_bytes / MiB,
              "predicted_torch_MiB": fit.predicted_peak_bytes / MiB}
    return fit.plan, _remat_report(fit.plan) | fields


@dataclass
class _Timed:
    """One step timed in a point's rounds: what it is ("plain", "peer", or a plan's mechanism), how to call
    it, on which model, its tracked run (None for the plain step, whose times are the reference) and the
    extra fields of its row."""

    label: str
    call: LossCall
    model: BenchModel
    run: StepRun | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def _applied(stack: ExitStack, lv: Level, plan: Plan, twin: BenchModel, mechanism: str,
             fields: dict[str, Any]) -> list[_Timed]:
    """Apply `plan` to `twin` (inside `stack`) and track one step: the entry to time, or none (the crash is
    in `fields`)."""
    try:
        done = stack.enter_context(memplan.applied(plan, twin.module, mechanism=mechanism))
        run = measure(twin.module, twin, lv.cfg.warmup, reference=lv.plain)
    except Exception as e:  # a runtime failure is a finding: record it, go on
        fields["grads"] = f"CRASH: {e!r}"[:300]
        return []
    if done is not None:
        fields |= _mechanism_report(done)
    return [_Timed(mechanism, twin.module, twin, run, fields)]


def _memplan_point(lv: Level, budget: int, knob: str, rival: tuple[LossCall, StepRun] | None = None,
                   plain_call: LossCall | None = None, torch_mechanism: bool = False,
                   **more: Any) -> list[dict[str, Any]]:
    """Plan at `budget` bytes and run the plan on the twin (and, with `torch_mechanism`, once more through
    PyTorch's SAC and saved-tensor hooks on the other twin); time them in rounds with the plain step
    (`plain_call`, default the model's forward) and `rival` (a peer's step and its tracked run, which gets
    its times here too). An `infeasible` row carries the lower bound; a crash of any of them is recorded in
    its row (the rival's in its run's `equal`), not raised. Returns memplan's row, then the torch
    mechanism's if it was asked for."""
    m = lv.model
    plan, info = _plan(lv, budget)
    torch_plan, mech = _torch_plan(lv, budget) if torch_mechanism and plan is not None else (None, info)
    ours, mech = info | more, mech | more
    timed = [_Timed("plain", plain_call or m.module, m)]
    timed += [_Timed("peer", rival[0], m, rival[1])] if rival else []
    closing, rounds = None, None
    try:
        with ExitStack() as stack:
            if plan is not None:
                timed += _applied(stack, lv, plan, lv.twin, "graph", ours)
            if torch_plan is not None:
                timed += _applied(stack, lv, torch_plan, lv.eager, "torch", mech)
            rounds = time_rounds([(t.call, t.model) for t in timed], lv.cfg.reps)
    except Exception as e:  # leaving an applied plan (closing its tier store) failed: the plans' rows say so
        closing = f"CRASH (closing): {e!r}"[:300]
    if rounds is None:  # nothing was timed: a plan could not even be entered and left
        raise RuntimeError(f"{m.name}: {closing}")
    if 0 in rounds.errors:
        raise RuntimeError(f"{m.name}: the plain step failed: {rounds.errors[0]}")
    runs: dict[str, StepRun] = {}
    for i, t in enumerate(timed[1:], start=1):
        assert t.run is not None
        error = f"CRASH (timed steps): {rounds.errors[i]}" if i in rounds.errors else None
        if error or (closing and t.label != "peer"):
            t.run.equal = t.fields["grads"] = error or closing
            continue
        t.run.times, t.run.plain_times = rounds.times[i], rounds.times[0]
        runs[t.label] = t.run
    rows = [_planned_row(m.name, "memplan", knob, runs.get("graph"), budget, ours)]
    if torch_mechanism and plan is not None:
        rows.append(_planned_row(m.name, "memplan-torch", knob, runs.get("torch"), budget, mech))
    return rows


def _planned_row(model: str, method: str, knob: str, run: StepRun | None, budget: int,
                 info: dict[str, Any]) -> dict[str, Any]:
    """The row of a plan's run (None: it did not run; `info` says why)."""
    if run is None:
        return _row(model, method, knob, None, **info)
    if info["recomputed"] == 0 and run.equal == "allclose":  # keep/swap only: the plain step's ops exactly
        run.equal = "NOT BITWISE (keep/swap only)"
    return _row(model, method, knob, run, within_budget="yes" if run.peak_bytes <= budget else "NO", **info)


def _mechanism_report(info: Any) -> dict[str, Any]:
    """What `applied(..., mechanism="torch")` did in the tracked step (an `EagerInfo`), for the row."""
    return {"checkpointed_layers": info.checkpointed, "sac_answers": dict(info.sac),
            "swapped_tensors": info.swapped_tensors, "swapped_MiB": info.swapped_bytes / MiB,
            "loaded_tensors": info.loaded_tensors, "prefetched_tensors": info.prefetched_tensors,
            "held_on_device": info.held_on_device, "missed_swaps": info.missed_swaps,
            "swaps_recomputed": len(info.swaps_recomputed),
            "swaps_outside_blocks": len(info.swaps_outside_blocks)}


def _memplan_rows(lv: Level) -> list[dict[str, Any]]:
    """Budgets at `cfg.fractions` of the plain peak down to the first infeasible one; then, once, at the
    lower bound that `InfeasibleBudget` named (memplan's lowest point), if it is below the last that fit."""
    rows: list[dict[str, Any]] = []
    peak = lv.plain.peak_bytes
    last_fit = peak
    for frac in lv.cfg.fractions:
        budget = int(frac * peak)
        point = _memplan_point(lv, budget, f"budget {frac:.0%} ({format_size(budget)})", torch_mechanism=True)
        rows += point
        low = point[0].get("lower_bound_bytes")
        if low is None:
            last_fit = budget
            continue
        if low < last_fit:
            rows += _memplan_point(lv, int(low), f"lower bound {low / peak:.0%} ({format_size(low)})",
                                   torch_mechanism=True)
        break
    return rows


def _peer_and_twin(lv: Level, method: str, knob: str, call: LossCall, run: StepRun, plain_call: LossCall,
                   short: str) -> list[dict[str, Any]]:
    """A peer point and memplan's twin of it, planned at the peer's measured peak and timed in its rounds."""
    peer = {"method": method, "knob": knob}
    twin = _memplan_point(lv, run.peak_bytes, f"twin of {short} ({format_size(run.peak_bytes)})",
                          rival=(call, run), plain_call=plain_call, twin_of=peer_label(peer))
    return [_row(lv.model.name, method, knob, run), *twin]


def _peer_rows(lv: Level) -> list[dict[str, Any]]:
    """Per-block checkpointing, then torch.compile at each memory budget, each with its memplan twin."""
    m, cfg = lv.model, lv.cfg
    knob = f"every block ({len(m.blocks)})"
    try:
        with checkpointed(m.blocks):
            run = measure(m.module, m, cfg.warmup, reference=lv.plain)
            rows = _peer_and_twin(lv, "checkpoint", knob, m.module, run,
                                  without_checkpoints(m.module, m.blocks), "checkpoint")
    except Exception as e:  # recorded like memplan's failures
        rows = [_row(m.name, "checkpoint", knob, None, grads=f"CRASH: {e!r}"[:300])]
    for mb in cfg.compile_budgets:
        knob = f"activation_memory_budget {mb:g}"
        try:
            with compiled(m.module, mb) as (fn, stats):
                run = measure(fn, m, max(cfg.warmup, 1), reference=lv.plain)
                pair = _peer_and_twin(lv, "compile", knob, fn, run, m.module, f"compile {mb:g}")
            pair[0] |= {"graphs": stats.graphs, "graph_breaks": stats.graph_breaks}  # counted on exit
            rows += pair
        except Exception as e:  # recorded like memplan's failures
            rows.append(_row(m.name, "compile", knob, None, grads=f"CRASH: {e!r}"[:300]))
    return rows


def bench_model(name: str, cfg: TrainConfig, hw: Hardware) -> list[dict[str, Any]]:
    """All rows of one model: plain, memplan at each budget, checkpoint and compile at each memory budget,
    each with its memplan twin. Every method is timed in rounds with the plain step (see `time_rounds`)."""
    m = load_bench_model(name, cfg.batch, cfg.seq)
    twin, eager = (BenchModel(m.name, copy.deepcopy(m.module), m.inputs, ()) for _ in range(2))
    plain = measure(m.module, m, cfg.warmup, keep_grads=True)
    alone = time_rounds([(m.module, m)], cfg.reps)
    if alone.errors:
        raise RuntimeError(f"{name}: the plain step failed: {alone.errors[0]}")
    plain.times = plain.plain_times = alone.times[0]
    lv = Level(m, twin, eager, plain, cfg, hw)
    rows = [_row(name, "plain", "-", plain, grads="reference"), *_memplan_rows(lv), *_peer_rows(lv)]
    for r in rows:
        if "peak_MiB" in r:
            r["peak/plain"] = r["peak_MiB"] * MiB / plain.peak_bytes
    return rows


# ---------------------------------------------------------------------------------------------------
# Planning at scale


def plan_at_scale(sc: ScaleConfig) -> dict[str, Any]:
    """Baseline peak (no passes), then plan at each fraction until one fits; times include capture."""
    kw: dict[str, Any] = {"mode": "train", "batch": sc.batch, "seq": sc.seq, "hardware": sc.hardware}
    t0 = time.perf_counter()
    base = memplan.plan(f"zoo:{sc.model}", budget="100TiB", passes=[], **kw)
    out: dict[str, Any] = {"model": sc.model, "batch": sc.batch, "seq": sc.seq, "hardware": sc.hardware,
                           "baseline_s": time.perf_counter() - t0,
                           "baseline_peak_bytes": base.predictions.peak_bytes["device"], "attempts": []}
    for frac in sc.fractions:
        budget = int(frac * base.predictions.peak_bytes["device"])
        t0 = time.perf_counter()
        try:
            plan = memplan.plan(f"zoo:{sc.model}", budget=budget, **kw)
        except InfeasibleBudget as e:
            out["attempts"].append({"fraction": frac, "plan_s": time.perf_counter() - t0,
                                    "status": "infeasible", "lower_bound_bytes": e.lower_bound_bytes})
            continue
        plan_s = time.perf_counter() - t0
        out["attempts"].append({"fraction": frac, "plan_s": plan_s, "status": "planned",
                                **_remat_report(plan)})
        break
    return out


def _scale_notes(s: dict[str, Any]) -> list[str]:
    head = (f"{s['model']} (batch {s['batch']}, seq {s['seq']}, {s['hardware']}, meta device): baseline peak "
            f"{format_size(s['baseline_peak_bytes'])} (capture + baseline {s['baseline_s']:.1f} s)")
    notes = [head]
    for a in s["attempts"]:
        at = f"  at {a['fraction']:.0%}"
        took = f"{a['plan_s']:.1f} s ({'under' if a['plan_s'] < 60 else 'OVER'} the 60 s goal"
        if a["status"] == "infeasible":
            low = format_size(a["lower_bound_bytes"])
            notes.append(f"{at}: InfeasibleBudget in {took}), lower bound {low}")
            continue
        passes = ", ".join(f"{k} {v:.1f} s" for k, v in a["pass_s"].items())
        split = ", ".join(f"{d} {format_size(v * MiB)}" for d, v in a["split_MiB"].items())
        peak = format_size(a["predicted_MiB"] * MiB)
        notes.append(f"{at}: planned in {took}; passes {passes}), predicted peak {peak}, "
                     f"keep/swap/recompute/split {a['keep/swap/recompute/split']} tensors ({split}), "
                     f"solver {a['solver']}")
    return notes


# ---------------------------------------------------------------------------------------------------
# The benchmark


def _summary_notes(rows: list[dict[str, Any]]) -> list[str]:
    mp = [r for r in rows if r["method"] == "memplan"]
    held = sum(r.get("within_budget") == "yes" for r in mp)
    ran = sum("peak_MiB" in r for r in mp)
    bad = [f"{r['model']} {r['method']} {r['knob']}: {r['grads']}" for r in rows
           if str(r.get("grads", "")).startswith(("DIFFERENT", "NOT", "CRASH"))]
    notes = [f"memplan held its budget in {held} of {ran} measured runs"]
    mech = [r for r in rows if r["method"] == "memplan-torch" and "peak_MiB" in r]
    if mech:
        over = [f"{r['model']} {r['knob']}: {r['peak_MiB']:.4g} MiB" for r in mech
                if r["within_budget"] != "yes"]
        refused = [f"{r['model']} {r['knob']}" for r in rows
                   if r["method"] == "memplan-torch" and r.get("within_budget") == "refused"]
        notes.append("memplan-torch (plans made by `plan_for_torch` for SAC and saved-tensor hooks) "
                     f"held the budget in {len(mech) - len(over)} of {len(mech)} runs"
                     + (f"; over: {', '.join(over)}" if over else "")
                     + (f"; refused (no plan fits): {', '.join(refused)}" if refused else ""))
    notes += [f"loss/gradient mismatch or crash: {b}" for b in bad]
    if not bad:
        notes.append("loss and gradients matched the plain step in every measured run")
    plain = {r["model"]: r for r in rows if r["method"] == "plain"}
    for r in mp:
        if "lower_bound_bytes" in r:
            low = r["lower_bound_bytes"] / MiB
            notes.append(f"{r['model']}: memplan infeasible at {r['knob']}; lower bound {low:.4g} MiB "
                         f"({low / plain[r['model']]['peak_MiB']:.0%} of the plain peak)")
    for model in plain:
        medians = [r["plain_s"] for r in rows if r["model"] == model and "plain_s" in r]
        if max(medians) > 1.1 * min(medians):
            notes.append(f"{model}: the plain step's median over a row's rounds ranged from "
                         f"{min(medians):.3g} to {max(medians):.3g} s during the run; each overhead is "
                         "relative to its own rounds")
    breaks = {r["model"]: r["graph_breaks"] for r in rows if r.get("graph_breaks")}
    notes += [f"{k}: torch.compile made {v} graph breaks (the code between graphs runs eagerly)"
              for k, v in breaks.items()]
    return notes


def run(quick: bool = False, config: TrainConfig | None = None) -> Result:
    """Run the benchmark (`QUICK` or `FULL` unless `config` is given); writes the Pareto plot too."""
    warnings.filterwarnings("ignore")
    cfg = config or (QUICK if quick else FULL)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        hw, cal = load_hardware("cpu"), None
        if cfg.calibrate_bytes:
            hw, cal = calibrate(hw, sample_bytes=cfg.calibrate_bytes)
        rows = [r for name in cfg.models for r in bench_model(name, cfg, hw)]
        bench_s = time.perf_counter() - t0
        scale = plan_at_scale(cfg.scale) if cfg.scale else None
    finally:
        torch.set_num_threads(threads)
    write_pareto(rows, PLOT)
    level, met = level_notes(rows)
    notes = _summary_notes(rows)
    notes.append(f"goal (memplan's overhead lower than every peer point at that point's memory level): "
                 f"{'MET' if met else 'NOT MET'}; memplan's twin of each peer point (planned with the "
                 "point's measured peak as budget, timed in the same rounds):")
    notes += [f"  {n}" for n in level]
    notes += _scale_notes(scale) if scale else []
    if cal is not None:
        ssd = cal.tiers[0]
        notes.append(f"memplan planned with this machine's figures (`memplan calibrate`, {cal.seconds:.1f} "
                     f"s): {cal.flops:.3g} FLOP/s (preset {cal.preset_flops:.3g}), {cal.mem_bw:.3g} B/s "
                     f"memory (preset {cal.preset_mem_bw:.3g}), SSD write {ssd.write_bw:.3g} / read "
                     f"{ssd.read_bw:.3g} B/s (preset {ssd.preset_write_bw:.3g} / {ssd.preset_read_bw:.3g}); "
                     f"a transfer slows compute down by {ssd.compute_share:.2f} of its time (preset: 1)")
    notes.append(f"batch {cfg.batch} x seq {cfg.seq} tokens; per point {cfg.warmup} warm-up step(s) "
                 "(compile: at least 1), 1 tracked step (peak, correctness), then "
                 f"{cfg.reps} rounds, each timing one step of the plain step, the peer point and memplan's "
                 "twin of it (or memplan's budget point and the plain step), in rotated order; overhead_%: "
                 "median step / median plain step of the same rounds - 1; "
                 f"{cfg.threads or threads} torch threads")
    fastest = min(r["step_s"] for r in rows if r["method"] == "plain")
    if fastest < 1.0:
        notes.append(f"the plain step takes {fastest:.3f} s here: overheads at this size measure per-op "
                     "Python cost (memplan's op-by-op interpreter, dynamo guards, checkpoint hooks) and "
                     "timing noise, not the methods")
    extra = {"config": {k: v for k, v in vars(cfg).items() if k != "scale"}, "scale": scale,
             "calibration": cal.to_dict() if cal else None,
             "models_s": bench_s, "goal_met": met, "plot": str(PLOT)}
    return Result("train", "Training memory at equal measured peak: memplan vs checkpoint vs torch.compile "
                  f"({'quick' if quick else 'full'}, CPU, live-storage tracker)", COLUMNS, rows, notes, extra)


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.train [--quick] [--batch B] [--seq S] [--reps N] [--threads T] [--no-scale]`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--models", help="comma-separated, e.g. gpt2,llama-gpt2size")
    ap.add_argument("--no-scale", action="store_true", help="skip the Llama-2-7B planning-time check")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    sizes = ("batch", "seq", "reps", "threads")
    changes: dict[str, Any] = {k: getattr(args, k) for k in sizes if getattr(args, k) is not None}
    if args.models:
        changes["models"] = tuple(args.models.split(","))
    if args.no_scale:
        changes["scale"] = None
    t0 = time.perf_counter()
    result = run(args.quick, replace(cfg, **changes))
    path = write(result, time.perf_counter() - t0)
    print(markdown(result))
    print(f"wrote {path} and {PLOT}")


if __name__ == "__main__":
    main()
