"""Generation with weights streamed from slower tiers: memplan's placement vs accelerate's disk offload.

    .venv/bin/python -m bench.run placement --quick      # gpt2 at 25% ... 100%, ~4 min
    .venv/bin/python -m bench.run placement              # GPT-2 XL at 25% and 50%, ~13 min
    .venv/bin/python -m bench.placement --model gpt2 --fractions 0.4,0.5 --no-flexgen --no-scale

1. On this CPU, one model (full run: `zoo:gpt2-xl`, fp32, 6.2 GB of weights; quick: `zoo:gpt2`) generates
   `gen` tokens greedily after a `prompt`-token prompt (random ids, seed 0), first plainly (every weight
   in memory: the reference tokens), then at each device budget (`fractions` of the weight bytes):
   - memplan: `memplan.plan(model, ids, mode="infer", budget=B, hardware=H, gen=gen)` with `H` the `cpu`
     preset calibrated on this machine (`memplan.runtime.calibrate`: FLOP/s, memory bandwidth, SSD tier),
     run under `memplan.applied(plan, model)` around `model.generate`; the weights off the device are read
     from one `O_DIRECT` file on the local disk. Peak, prefill and decode times, and bytes read are the
     runtime's own measurement (`run.finish()`, its live-storage tracker).
   - accelerate: `infer_auto_device_map(model, max_memory={"cpu": B, "disk": ...})` and
     `dispatch_model(model, device_map, offload_dir=...)` (see `placement_peers.offloaded`), then the same
     `model.generate`, under the same tracker (meta placeholders not counted, see
     `placement_peers.DeviceTracker`) and the same per-forward clock. Its offload files are read through
     `np.memmap`, hence through the page cache, which on this machine holds the whole folder once it has
     been written: "accelerate (page cache)" runs like that; "accelerate (cold)" drops the files' page
     cache (`posix_fadvise(DONTNEED)`) before every forward, so that every forward reads them from the
     disk, as memplan's `O_DIRECT` reads always do.
   Each row says whether the tokens equal the plain model's, and the bytes read from the disk twice:
   `/proc/self/io` `read_bytes` during the generation (what the kernel fetched from the block device for
   this process) and the system's own count (memplan: its weight file's counter; accelerate: the bytes
   its `load_offloaded_weight` returned, from the disk or from the page cache).
2. The physical limit of an I/O-bound decode: the bytes memplan reads per decode token over the
   sequential `O_DIRECT` read bandwidth of its weight file measured right after the generation (64 MiB
   reads), as a throughput, and memplan's measured decode throughput as a share of it.
3. FlexGen's setting (Sheng et al., ICML 2023, Table 2 / the repository's benchmark/batch_size_table.md):
   one T4 16 GB, 208 GB DRAM, 1.5 TB SSD, prompt 512, gen 32, OPT-30B and OPT-175B in fp16 at FlexGen's
   effective batch sizes (144 and 256), planned only (no run) on a hardware file written for that machine
   (`FLEXGEN_T4`, the `t4-16gb` preset's speeds); the rows give memplan's placement of weights and KV
   cache per tier and its predicted throughput next to FlexGen's published policy and 7.32 / 0.69 tok/s.
   A refused plan reports its message; then the plan at FlexGen's GPU batch size is tried too.
4. Planning time of Llama-2-70B (t4-16gb, batch 8, prompt 512, gen 32, fp16, device budget 16 GiB).

The plot (`bench/results/placement.png`) is decode throughput versus device budget for each system.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

import memplan
from bench.harness import RESULTS, Result, markdown, write
from bench.placement_peers import (
    MiB,
    accelerate_generate,
    odirect_read_bw,
    offloaded,
    plain_generate,
    read_bytes,
    scratch_dir,
)
from memplan.errors import InfeasibleBudget
from memplan.ir.graph import Role
from memplan.ir.hardware import Hardware, load_hardware
from memplan.plans.effective import generation_times
from memplan.plans.plan import Plan
from memplan.runtime.calibrate import calibrate
from memplan.units import format_size
from memplan.zoo import catalog

COLUMNS = [
    "budget",
    "system",
    "prefill_tok/s",
    "decode_tok/s",
    "peak_MiB",
    "peak/budget",
    "disk_read_MiB",
    "own_read_MiB",
    "tokens",
    "notes",
]
PLOT = RESULTS / "placement.png"
MEMPLAN, ACC_WARM, ACC_COLD = "memplan", "accelerate (page cache)", "accelerate (cold)"

FLEXGEN_T4: dict[str, Any] = {
    "name": "t4-16gb-flexgen",
    "description": "FlexGen's machine (Sheng et al. 2023, Section 6): one NVIDIA T4 16 GB on GCP with 208 GB "
    "of DRAM and a 1.5 TB SSD; speeds are the t4-16gb preset's (PCIe 3.0 x16, NVMe SSD).",
    "device_kind": "cuda",
    "flops": 6.5e13,
    "mem_bw": 3.2e11,
    "tiers": [
        {
            "name": "device",
            "capacity_bytes": 17179869184,
            "read_bw": 3.2e11,
            "write_bw": 3.2e11,
            "latency_s": 1e-6,
        },
        {
            "name": "host",
            "capacity_bytes": 208000000000,
            "read_bw": 1.2e10,
            "write_bw": 1.2e10,
            "latency_s": 1e-5,
        },
        {
            "name": "ssd",
            "capacity_bytes": 1500000000000,
            "read_bw": 2.0e9,
            "write_bw": 1.0e9,
            "latency_s": 1e-4,
        },
    ],
}
FLEXGEN_BUDGET = {"device": "16GiB", "host": "208GB", "ssd": "1.5TB"}


@dataclass(frozen=True)
class FlexGenCase:
    """One of FlexGen's published points: model, effective batch (= GPU batch x number of GPU batches),
    its policy (`--percent` of weights / KV cache / activations on GPU and CPU, the rest on disk) and its
    published generation throughput (generated tokens / (prefill + decode time))."""

    model: str
    batch: int
    gpu_batch: int
    policy: str
    published_tok_s: float


FLEXGEN_CASES = (
    FlexGenCase(
        "opt-30b",
        144,
        48,
        "--percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 "
        "--cpu (weights 20% GPU / 80% CPU; KV cache and activations 100% CPU; attention on the CPU)",
        7.32,
    ),
    FlexGenCase(
        "opt-175b",
        256,
        32,
        "--percent 0 50 0 0 0 100 --gpu-batch-size 32 --num-gpu-batches 8 --cpu "
        "--pin-weight 0 (weights 50% CPU / 50% disk; KV cache 100% disk; activations 100% CPU; "
        "attention on the CPU)",
        0.69,
    ),
)


@dataclass(frozen=True)
class ScaleCase:
    model: str = "llama2-70b"
    hardware: str = "t4-16gb"
    batch: int = 8
    prompt: int = 512
    gen: int = 32
    dtype: str = "fp16"
    budget: str = "16GiB"


@dataclass(frozen=True)
class PlacementConfig:
    """What one run measures; `FULL` and `QUICK` below are the two the harness runs."""

    model: str = "gpt2-xl"
    prompt: int = 16
    gen: int = 6
    fractions: tuple[float, ...] = (0.25, 0.5)
    """Device budgets as fractions of the weight bytes."""
    cold_fractions: tuple[float, ...] = (0.25, 0.5)
    """Budgets at which accelerate also runs with its page cache dropped before every forward."""
    bw_chunk: int = 64 * MiB
    bw_limit: int = 512 * MiB
    """Bytes of the weight file read to measure its O_DIRECT bandwidth."""
    calibrate_bytes: int | None = 64 * MiB
    threads: int | None = None
    flexgen: bool = True
    scale: ScaleCase | None = ScaleCase()


FULL = PlacementConfig()
QUICK = PlacementConfig(
    model="gpt2",
    prompt=32,
    gen=8,
    fractions=(0.25, 0.4, 0.5, 0.75, 1.0),
    cold_fractions=(0.4, 0.5),
    calibrate_bytes=64 * MiB,
)
"""gpt2 at more budgets, in about 4 minutes. FULL (GPT-2 XL) takes about 13 minutes on 2 shared cores with a
~0.5 GB/s disk: each GPT-2 XL forward at 25% takes 10-20 s, so it has 6 new tokens and the 25% and 50%
budgets only."""


# ---------------------------------------------------------------------------------------------------
# One budget: memplan and accelerate on the same work


@dataclass
class Work:
    """The model, its prompt, the reference generation and the hardware memplan plans with."""

    name: str
    model: torch.nn.Module
    ids: torch.Tensor
    gen: int
    plain: dict[str, Any]
    hw: Hardware
    weight_bytes: int
    workdir: str


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _tok_s(batch: int, seconds: float) -> float:
    return batch / seconds if seconds else 0.0


def _row(work: Work, frac: float, system: str, **fields: Any) -> dict[str, Any]:
    budget = int(frac * work.weight_bytes)
    row = {
        "model": work.name,
        "budget": f"{frac:.0%} ({format_size(budget)})",
        "fraction": frac,
        "budget_bytes": budget,
        "system": system,
    } | fields
    if "peak_bytes" in row:
        row["peak_MiB"] = row["peak_bytes"] / MiB
        row["peak/budget"] = row["peak_bytes"] / budget
        row["within_budget"] = row["peak_bytes"] <= budget
    print(
        f"[placement] {work.name} {row['budget']} {system}: "
        + (
            f"decode {row['decode_tok/s']:.3g} tok/s, peak {row['peak_MiB']:.1f} MiB, tokens {row['tokens']}"
            if "decode_tok/s" in row
            else str(row.get("notes"))
        ),
        file=sys.stderr,
        flush=True,
    )
    return row


def _same(tokens: torch.Tensor, work: Work) -> str:
    return "identical" if torch.equal(tokens, work.plain["tokens"]) else "DIFFERENT"


def _planned_reads(plan: Plan) -> tuple[int, int]:
    """(bytes the plan reads from slower tiers in all, of which in decode forwards)."""
    graph = plan.graph()
    per_forward = sum(1 for op in graph.ops if op.name.startswith("prefill:"))
    total = decode = 0
    for e in plan.events:
        if e.kind == "prefetch" and e.duration_s > 0 and e.value_id is not None:
            size = graph.value(e.value_id).size_bytes
            total += size
            decode += size if e.step >= per_forward else 0
    return total, decode


def placement_bytes(plan: Plan) -> dict[str, dict[str, int]]:
    """Bytes per tier of the weights and of the KV caches (a storage the plan does not place is on the
    device)."""
    graph = plan.graph()
    tier = {p.value_id: p.tier for p in plan.decisions.placement.tensors} if plan.decisions.placement else {}
    out: dict[str, dict[str, int]] = {"weights": {}, "kv": {}}
    for v in graph.values:
        if v.alias_of is not None:
            continue
        kind = "weights" if v.role == Role.PARAMETER else "kv" if v.role == Role.KV_CACHE else None
        if kind:
            t = tier.get(v.id, "device")
            out[kind][t] = out[kind].get(t, 0) + v.size_bytes
    return out


def memplan_point(
    work: Work,
    frac: float,
    measure_bw: bool = True,
    bw_chunk: int = 64 * MiB,
    bw_limit: int | None = None,
) -> dict[str, Any]:
    """Plan at `frac` of the weight bytes and generate under the plan; with `measure_bw`, also measure the
    O_DIRECT read bandwidth of the plan's weight file right after the generation (`o_direct_bw`)."""
    budget = int(frac * work.weight_bytes)
    batch, gen = work.ids.shape[0], work.gen
    t0 = time.perf_counter()
    try:
        plan = memplan.plan(work.model, work.ids, mode="infer", budget=budget, hardware=work.hw, gen=gen)
    except InfeasibleBudget as e:
        return _row(
            work,
            frac,
            MEMPLAN,
            tokens="-",
            plan_s=time.perf_counter() - t0,
            lower_bound_bytes=e.lower_bound_bytes,
            notes=f"refused (InfeasibleBudget): lower bound {format_size(e.lower_bound_bytes)}",
            message=str(e),
        )
    plan_s = time.perf_counter() - t0
    try:
        with memplan.applied(plan, work.model) as run:
            io0 = read_bytes()
            t1 = time.perf_counter()
            out = work.model.generate(work.ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
            wall = time.perf_counter() - t1
            disk = read_bytes() - io0
            bw = odirect_read_bw(run.file.path, bw_chunk, bw_limit) if measure_bw and run.file else {}
        m = run.finish()
    except Exception as e:  # a runtime failure is a finding: record it
        return _row(
            work,
            frac,
            MEMPLAN,
            tokens="CRASH",
            plan_s=plan_s,
            notes=f"CRASH: {e!r}"[:300],
            traceback=traceback.format_exc()[-2000:],
        )
    cmp = plan.compare(m)
    planned_total, planned_decode = _planned_reads(plan)
    own = sum(m.bytes_read.values())
    decode_read = own * planned_decode / planned_total if planned_total else 0.0
    per_token_read = decode_read / max(gen - 1, 1)
    placed = placement_bytes(plan)
    streamed = sum(b for t, b in placed["weights"].items() if t != "device")
    report = next((p for p in plan.passes if p.name == "placement"), None)
    return _row(
        work,
        frac,
        MEMPLAN,
        **{"prefill_tok/s": m.prefill_tok_s, "decode_tok/s": m.decode_tok_s},
        decode_s_per_token=m.decode_per_token_s,
        prefill_s=m.prefill_s,
        decode_s=m.decode_s,
        peak_bytes=m.peak_bytes,
        disk_read_MiB=disk / MiB,
        own_read_MiB=own / MiB,
        tokens=_same(out, work),
        streamed_MiB=streamed / MiB,
        resident_weights_MiB=placed["weights"].get("device", 0) / MiB,
        decode_read_MiB_per_token=per_token_read / MiB,
        predicted_peak_MiB=cmp.predicted_peak_bytes / MiB,
        predicted_prefill_tok_s=cmp.tok_s("prefill", False),
        predicted_decode_tok_s=cmp.tok_s("decode", False),
        io_wait_s=m.io_wait_s,
        io_busy_s=m.io_busy_s,
        io_hidden_s=m.io_hidden_s,
        wall_s=wall,
        plan_s=plan_s,
        pass_s={p.name: p.time_s for p in plan.passes},
        placement_notes=list(report.notes) if report else [],
        backends=m.backends,
        peak_op=f"{run.tracker.result.peak_op} (op {run.tracker.result.peak_op_index})",
        o_direct_bw=bw,
        batch=batch,
        notes=f"streams {format_size(streamed)}/forward; predicted {cmp.tok_s('decode', False):.3g} tok/s",
    )


def accelerate_points(work: Work, frac: float, cold: bool) -> list[dict[str, Any]]:
    """accelerate at `frac` of the weight bytes: with the page cache as it is, then (if `cold`) with the
    offload files' page cache dropped before every forward; one dispatch serves both."""
    budget = int(frac * work.weight_bytes)
    batch, gen = work.ids.shape[0], work.gen
    rows = []
    folder = tempfile.mkdtemp(prefix="offload-", dir=work.workdir)
    try:
        with offloaded(work.model, budget, folder) as off:
            disk_bytes = off.placed_bytes.get("disk", 0)
            for system, drop in ((ACC_WARM, False), *(((ACC_COLD, True),) if cold else ())):
                try:
                    r = accelerate_generate(work.model, work.ids, gen, off, drop)
                except Exception as e:  # recorded like memplan's failures
                    rows.append(
                        _row(
                            work,
                            frac,
                            system,
                            tokens="CRASH",
                            notes=f"CRASH: {e!r}"[:300],
                            traceback=traceback.format_exc()[-2000:],
                        )
                    )
                    continue
                decode = sum(r["decode_s"]) / len(r["decode_s"]) if r["decode_s"] else 0.0
                cached = r["cached_before"]
                rows.append(
                    _row(
                        work,
                        frac,
                        system,
                        **{
                            "prefill_tok/s": _tok_s(batch * work.ids.shape[1], r["prefill_s"]),
                            "decode_tok/s": _tok_s(batch, decode),
                        },
                        decode_s_per_token=decode,
                        prefill_s=r["prefill_s"],
                        decode_s=r["decode_s"],
                        peak_bytes=r["peak_bytes"],
                        peak_unwrapped_MiB=r["peak_bytes_unwrapped"] / MiB,
                        disk_read_MiB=r["proc_read_bytes"] / MiB,
                        own_read_MiB=r["loaded_bytes"] / MiB,
                        tokens=_same(r["tokens"], work),
                        streamed_MiB=disk_bytes / MiB,
                        resident_weights_MiB=r["resident_bytes"] / MiB,
                        page_cached_before=cached,
                        dispatch_s=off.dispatch_s,
                        wall_s=r["wall_s"],
                        batch=batch,
                        device_map_places={k: v / MiB for k, v in off.placed_bytes.items()},
                        notes=f"offloads {format_size(disk_bytes)}; "
                        f"{cached:.0%} of its files in the page cache at the start",
                    )
                )
    except Exception as e:  # dispatch or restore failed
        rows.append(
            _row(
                work,
                frac,
                ACC_WARM,
                tokens="CRASH",
                notes=f"CRASH (dispatch): {e!r}"[:300],
                traceback=traceback.format_exc()[-2000:],
            )
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        gc.collect()
    return rows


def compare_at(
    work: Work,
    frac: float,
    cold: bool = True,
    measure_bw: bool = True,
    bw_chunk: int = 64 * MiB,
    bw_limit: int | None = None,
    accelerate_first: bool = False,
) -> list[dict[str, Any]]:
    """The benchmark's core comparison at one budget: memplan's row, then accelerate's (page cache as it
    is, then cold if `cold`); accelerate runs first with `accelerate_first` (the benchmark alternates, so
    that a drift of the machine's speed favours neither). Every row has `system`, `budget_bytes`,
    `tokens` and, when it ran, `prefill_tok/s`, `decode_tok/s`, `peak_bytes`, `within_budget`,
    `disk_read_MiB`, `own_read_MiB`."""
    acc = accelerate_points(work, frac, cold) if accelerate_first else None
    gc.collect()
    rows = [memplan_point(work, frac, measure_bw, bw_chunk, bw_limit)]
    gc.collect()
    return rows + (acc if acc is not None else accelerate_points(work, frac, cold))


def make_work(name: str, prompt: int, gen: int, hw: Hardware, workdir: str, batch: int = 1) -> Work:
    """Build the zoo model (random init, seed 0), its prompt, and the plain reference generation."""
    model = catalog.get(name).build(device="cpu")
    model.eval()
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))
    plain = plain_generate(model, ids, gen)
    return Work(name, model, ids, gen, plain, hw, weight_bytes(model), workdir)


PLAIN, PLAIN_AGAIN = "plain (all weights in memory)", "plain again (after the budgets)"


def plain_row(work: Work, again: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain generation's row; `again`: a second plain generation, run after the budgets (how much
    the machine's speed drifted during the run)."""
    p = again or work.plain
    decode = sum(p["decode_s"]) / len(p["decode_s"]) if p["decode_s"] else 0.0
    batch = work.ids.shape[0]
    row = {
        "model": work.name,
        "budget": f"- (weights {format_size(work.weight_bytes)})",
        "fraction": None,
        "system": PLAIN_AGAIN if again else PLAIN,
        "prefill_tok/s": _tok_s(batch * work.ids.shape[1], p["prefill_s"]),
        "decode_tok/s": _tok_s(batch, decode),
        "decode_s_per_token": decode,
        "prefill_s": p["prefill_s"],
        "decode_s": p["decode_s"],
        "peak_bytes": p["peak_bytes"],
        "peak_MiB": p["peak_bytes"] / MiB,
        "disk_read_MiB": p["proc_read_bytes"] / MiB,
        "tokens": _same(p["tokens"], work) if again else "reference",
        "notes": "the same work as the first plain run" if again else "reference tokens",
    }
    return row


# ---------------------------------------------------------------------------------------------------
# Planning only: FlexGen's setting and Llama-2-70B


def _plan_summary(plan: Plan, batch: int, gen: int) -> dict[str, Any]:
    graph = plan.graph()
    prefill, decode = generation_times(graph, plan.events)
    total = prefill + (gen - 1) * decode
    report = next((p for p in plan.passes if p.name == "placement"), None)
    placed = placement_bytes(plan)
    return {
        "placement_GiB": {k: {t: b / 2**30 for t, b in v.items()} for k, v in placed.items()},
        "predicted_prefill_s": prefill,
        "predicted_decode_s_per_token": decode,
        "predicted_decode_tok_s": batch / decode if decode else 0.0,
        "predicted_generation_tok_s": batch * gen / total if total else 0.0,
        "predicted_peak_GiB": plan.predictions.peak_bytes.get("device", 0) / 2**30,
        "pass_s": {p.name: p.time_s for p in plan.passes},
        "solver": f"{report.solver.status}"
        + (f", gap {report.solver.gap:.2g}" if report and report.solver.gap else "")
        if report
        else "-",
        "placement_notes": list(report.notes) if report else [],
    }


def _try_plan(
    source: str, hardware: str, budget: Any, batch: int, prompt: int, gen: int, dtype: str
) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        plan = memplan.plan(
            source,
            mode="infer",
            budget=budget,
            hardware=hardware,
            batch=batch,
            seq=prompt,
            gen=gen,
            dtype=dtype,
        )
    except InfeasibleBudget as e:
        return {
            "status": "infeasible",
            "plan_s": time.perf_counter() - t0,
            "message": str(e),
            "lower_bound_bytes": e.lower_bound_bytes,
        }
    except Exception as e:  # a planning failure is a finding too
        return {"status": "CRASH", "plan_s": time.perf_counter() - t0, "message": f"{e!r}"[:600]}
    return {"status": "planned", "plan_s": time.perf_counter() - t0} | _plan_summary(plan, batch, gen)


def flexgen_plans(workdir: str) -> dict[str, Any]:
    """FlexGen's published points planned with memplan's cost model (see the module docstring)."""
    path = os.path.join(workdir, "t4-16gb-flexgen.json")
    Path(path).write_text(json.dumps(FLEXGEN_T4, indent=2) + "\n")
    cases = []
    for c in FLEXGEN_CASES:
        out: dict[str, Any] = asdict(c)
        out["effective"] = _try_plan(f"zoo:{c.model}", path, FLEXGEN_BUDGET, c.batch, 512, 32, "fp16")
        print(
            f"[placement] flexgen {c.model} batch {c.batch}: {out['effective']['status']}",
            file=sys.stderr,
            flush=True,
        )
        batch = c.gpu_batch
        while out["effective"]["status"] != "planned" and batch >= 1:
            # refused: FlexGen's GPU batch, then halved until memplan plans one (or batch 1 is refused)
            r = _try_plan(f"zoo:{c.model}", path, FLEXGEN_BUDGET, batch, 512, 32, "fp16")
            out.setdefault("smaller", []).append(r | {"batch": batch})
            print(f"[placement] flexgen {c.model} batch {batch}: {r['status']}", file=sys.stderr, flush=True)
            if r["status"] != "infeasible":
                break
            batch //= 2
        cases.append(out)
    return {"hardware": FLEXGEN_T4, "budget": FLEXGEN_BUDGET, "prompt": 512, "gen": 32, "cases": cases}


def plan_at_scale(sc: ScaleCase) -> dict[str, Any]:
    out = _try_plan(
        f"zoo:{sc.model}", sc.hardware, {"device": sc.budget}, sc.batch, sc.prompt, sc.gen, sc.dtype
    )
    print(f"[placement] {sc.model}: {out['status']} in {out['plan_s']:.1f} s", file=sys.stderr, flush=True)
    return asdict(sc) | out


# ---------------------------------------------------------------------------------------------------
# Notes and plot


def _gib(x: float) -> str:
    return format_size(int(x * 2**30))


def _placement_text(p: dict[str, Any]) -> str:
    parts = []
    for kind in ("weights", "kv"):
        tiers = p["placement_GiB"].get(kind, {})
        parts.append(
            f"{'KV cache' if kind == 'kv' else kind}: "
            + (", ".join(f"{t} {_gib(b)}" for t, b in sorted(tiers.items())) or "none")
        )
    return "; ".join(parts)


def flexgen_notes(fx: dict[str, Any]) -> list[str]:
    notes = [
        f"FlexGen's setting planned with memplan's cost model (no run): one T4 16 GB, 208 GB host, 1.5 TB "
        f"SSD (hardware file {FLEXGEN_T4['name']}: the t4-16gb preset's speeds), prompt 512, gen 32, fp16, "
        f"budget {fx['budget']}; throughput as FlexGen counts it: generated tokens / (prefill + decode)"
    ]
    for c in fx["cases"]:
        head = (
            f"  {c['model']} at batch {c['batch']} (FlexGen: {c['published_tok_s']} tok/s, policy "
            f"{c['policy']}): "
        )
        for i, r in enumerate([c["effective"], *c.get("smaller", [])]):
            batch = r.get("batch", c["batch"])
            if r["status"] == "planned":
                ratio = r["predicted_generation_tok_s"] / c["published_tok_s"]
                text = (
                    f"planned in {r['plan_s']:.1f} s; {_placement_text(r)}; predicted "
                    f"{r['predicted_generation_tok_s']:.3g} tok/s ({ratio:.2g}x FlexGen's "
                    f"{c['published_tok_s']}; decode {r['predicted_decode_tok_s']:.3g} tok/s, prefill "
                    f"{r['predicted_prefill_s']:.1f} s), predicted device peak "
                    f"{_gib(r['predicted_peak_GiB'])}"
                )
            else:
                text = f"{r['status']} after {r['plan_s']:.1f} s: {r['message']}"
            at = (
                head
                if i == 0
                else f"    then at batch {batch}"
                + (" (FlexGen's GPU batch)" if batch == c["gpu_batch"] else "")
                + ": "
            )
            notes.append(at + text)
    return notes


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Decode tok/s versus device budget (% of the weight bytes), one line per system; atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {MEMPLAN: ("C0", "o"), ACC_WARM: ("C1", "s"), ACC_COLD: ("C3", "^")}
    for system, (color, marker) in styles.items():
        pts = sorted(
            (100 * r["fraction"], r["decode_tok/s"])
            for r in rows
            if r["system"] == system and r.get("decode_tok/s") and r.get("tokens") != "CRASH"
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=color, marker=marker, label=system)
    refused = [100 * r["fraction"] for r in rows if r["system"] == MEMPLAN and "lower_bound_bytes" in r]
    for x in refused:
        ax.axvline(x, color="C0", linestyle=":", alpha=0.6)
        ax.annotate(
            "memplan: infeasible",
            (x, 0),
            textcoords="offset points",
            xytext=(3, 5),
            fontsize=7,
            color="C0",
            rotation=90,
        )
    for r in rows:
        if r["system"] in (PLAIN, PLAIN_AGAIN):
            style = "--" if r["system"] == PLAIN else ":"
            ax.axhline(r["decode_tok/s"], color="k", linestyle=style, label=r["system"])
    ax.set_xlabel("device budget (% of the weight bytes)")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _by(rows: list[dict[str, Any]], system: str, frac: float) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["system"] == system and r.get("fraction") == frac and r.get("decode_tok/s")),
        None,
    )


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _peak_and_token_notes(rows: list[dict[str, Any]], goals: dict[str, Any]) -> list[str]:
    mp = [r for r in rows if r["system"] == MEMPLAN and "peak_bytes" in r]
    over = [r["budget"] for r in mp if not r["within_budget"]]
    goals["memplan_within_budget"] = not over and bool(mp)
    acc = [r for r in rows if r["system"].startswith("accelerate") and "peak_bytes" in r]
    acc_over = [
        f"{r['system']} {r['budget']}: {r['peak/budget']:.2f}x" for r in acc if not r["within_budget"]
    ]
    bad = [f"{r['system']} at {r['budget']}" for r in rows if r.get("tokens") in ("DIFFERENT", "CRASH")]
    ran = [r for r in rows if r.get("tokens") in ("identical", "DIFFERENT")]
    goals["tokens_identical"] = not bad and bool(ran)
    return [
        f"goal: memplan's measured device peak within its budget: {_verdict(goals['memplan_within_budget'])} "
        f"({len(mp) - len(over)} of {len(mp)} runs" + (f"; over at {', '.join(over)}" if over else "") + ")",
        "accelerate's measured peak (its max_memory bounds the weights it keeps, not what it loads, the KV "
        f"cache or activations): over the budget in {len(acc_over)} of {len(acc)} runs"
        + (f" ({'; '.join(acc_over)})" if acc_over else ""),
        f"goal: greedy tokens identical to the plain model's: {_verdict(goals['tokens_identical'])} "
        f"({len(ran) - len(bad)} of {len(ran)} runs identical)"
        + (f"; different or crashed: {', '.join(bad)}" if bad else ""),
    ]


def _speed_notes(rows: list[dict[str, Any]], cfg: PlacementConfig, goals: dict[str, Any]) -> list[str]:
    ratios: dict[str, list[float]] = {ACC_WARM: [], ACC_COLD: []}
    speed = []
    for frac in cfg.fractions:
        m = _by(rows, MEMPLAN, frac)
        for system in ratios:
            a = _by(rows, system, frac)
            if m is not None and a is not None:
                ratios[system].append(m["decode_tok/s"] / a["decode_tok/s"])
                speed.append(f"{frac:.0%} vs {system}: {ratios[system][-1]:.2f}x")
    goals["decode_2x_vs_page_cache"] = bool(ratios[ACC_WARM]) and min(ratios[ACC_WARM]) >= 2
    goals["decode_2x_vs_cold"] = bool(ratios[ACC_COLD]) and min(ratios[ACC_COLD]) >= 2
    return [
        "goal: memplan's decode throughput at least 2x accelerate's at the same budget: against accelerate "
        f"reading through a warm page cache {_verdict(goals['decode_2x_vs_page_cache'])}, against accelerate "
        f"with its page cache dropped {_verdict(goals['decode_2x_vs_cold'])} (memplan / accelerate decode "
        f"tok/s: {'; '.join(speed) or 'no pair ran'})"
    ]


def _limit_notes(rows: list[dict[str, Any]], plain: dict[str, Any], goals: dict[str, Any]) -> list[str]:
    """Each memplan row's share of what the disk allows; the goal at the lowest I/O-bound budget."""
    limits = []
    for r in rows:
        bw = r.get("o_direct_bw")
        if r["system"] != MEMPLAN or r.get("decode_read_MiB_per_token", 0) <= 0 or not bw:
            continue
        limit_s = r["decode_read_MiB_per_token"] * MiB / bw["bw"]
        r["physical_limit_tok_s"] = r["batch"] / limit_s
        r["of_physical_limit"] = r["decode_tok/s"] / r["physical_limit_tok_s"]
        r["bound"] = "I/O-bound" if limit_s > plain["decode_s_per_token"] else "compute-bound"
        busy = sum(r["io_busy_s"].values())
        r["reader_MB_s"] = r["own_read_MiB"] * MiB / busy / 1e6 if busy else 0.0
        limits.append((r, limit_s))
    if not limits:
        return []
    io_bound = [x for x in limits if x[0]["bound"] == "I/O-bound"]
    r, limit_s = min(io_bound or limits, key=lambda x: x[0]["fraction"])
    bw = r["o_direct_bw"]
    goals["of_physical_limit"] = r["of_physical_limit"]
    goals["physical_limit_80pct"] = r["of_physical_limit"] >= 0.8
    notes = [
        "goal: memplan's decode at least 80% of what the disk allows when I/O-bound (the limit: bytes read "
        "per decode token over the weight file's O_DIRECT bandwidth, measured right after each generation): "
        f"{_verdict(goals['physical_limit_80pct'])} at {r['budget']} ({r['bound']}): it reads "
        f"{r['decode_read_MiB_per_token']:.4g} MiB per decode token; its weight file reads at "
        f"{bw['bw'] / 1e6:.0f} MB/s with sequential O_DIRECT reads of {bw['chunk'] / MiB:.0f} MiB "
        f"({bw['bytes'] / MiB:.0f} MiB read), so the disk allows "
        f"{r['physical_limit_tok_s']:.3g} tok/s ({limit_s:.2f} s per token); measured "
        f"{r['decode_tok/s']:.3g} "
        f"tok/s = {r['of_physical_limit']:.0%} of it. memplan's reader thread (one pread per run of weights, "
        f"then a CRC-32 of it, serially) moved {r['reader_MB_s']:.0f} MB/s while busy; the main thread "
        "waited "
        f"{r['io_wait_s']:.1f} s for weights in all; the plain model decodes in "
        f"{plain['decode_s_per_token']:.2f} s per token with no I/O"
    ]
    others = [
        f"{x['budget']}: {x['of_physical_limit']:.0%} ({x['bound']}, disk "
        f"{x['o_direct_bw']['bw'] / 1e6:.0f} MB/s, reader {x['reader_MB_s']:.0f} MB/s while busy)"
        for x, _ in limits
        if x is not r
    ]
    if others:
        notes.append("  share of the disk's limit at the other budgets: " + "; ".join(others))
    return notes


def comparison_notes(
    rows: list[dict[str, Any]], cfg: PlacementConfig, plain: dict[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """The goals, met or not, with the physical-limit comparison; (notes, goals)."""
    goals: dict[str, Any] = {}
    notes = _peak_and_token_notes(rows, goals) + _speed_notes(rows, cfg, goals)
    notes += _limit_notes(rows, plain, goals)
    again = next((r for r in rows if r["system"] == PLAIN_AGAIN), None)
    if again is not None:
        notes.append(
            f"drift: the plain model decoded at {plain['decode_tok/s']:.3g} tok/s before the budgets and "
            f"{again['decode_tok/s']:.3g} tok/s after them (prefill {plain['prefill_tok/s']:.3g} and "
            f"{again['prefill_tok/s']:.3g} tok/s): the machine's speed changed that much during the run"
        )
    return notes, goals


def _scale_note(scale: dict[str, Any], goals: dict[str, Any]) -> str:
    ok = scale["status"] == "planned" and scale["plan_s"] < 30
    goals["scale_plan_under_30s"] = ok
    if scale["status"] == "planned":
        passes = ", ".join(f"{k} {v:.1f} s" for k, v in scale["pass_s"].items())
        text = (
            f"{_placement_text(scale)}; predicted {scale['predicted_generation_tok_s']:.3g} tok/s; "
            f"passes {passes}"
        )
    else:
        text = scale["message"]
    return (
        f"goal: planning {scale['model']} ({scale['hardware']}, batch {scale['batch']}, prompt "
        f"{scale['prompt']}, gen {scale['gen']}, {scale['dtype']}, device budget {scale['budget']}) under "
        f"30 s: {_verdict(ok)}: {scale['status']} in {scale['plan_s']:.1f} s (capture included); {text}"
    )


def _method_notes(cfg: PlacementConfig, work_bytes: int, cal: Any) -> list[str]:
    notes = []
    if cal is not None:
        ssd = next(t for t in cal.tiers if t.name == "ssd")
        notes.append(
            f"memplan planned with this machine's figures (`memplan calibrate`, {cal.seconds:.1f} s): "
            f"{cal.flops:.3g} FLOP/s, {cal.mem_bw:.3g} B/s memory, SSD tier write {ssd.write_bw:.3g} / read "
            f"{ssd.read_bw:.3g} B/s through its tier store (CRC included), compute share "
            f"{ssd.compute_share:.2f}"
        )
    threads = cfg.threads or torch.get_num_threads()
    notes += [
        f"setup: {cfg.model} (random init, seed 0), batch 1, prompt {cfg.prompt} random ids, {cfg.gen} new "
        "tokens (greedy, min_new_tokens = max_new_tokens); budgets are fractions of the "
        f"{format_size(work_bytes)} of weights; decode tok/s is the batch over the mean decode forward, "
        "prefill tok/s the prompt tokens over the first forward (memplan: its runtime's clock; accelerate "
        "and "
        "plain: the same top-level forward hooks); every peak is the live-storage tracker's (memplan: its "
        "runtime's; accelerate and plain: the same tracker, meta placeholders not counted); "
        f"{threads} torch threads on {os.cpu_count()} cores shared with other work, so times vary with the "
        "machine's load (the budgets alternate which system runs first)",
        "accelerate's peak counts the weights it loads: its hook copies each offloaded tensor out of an "
        "np.memmap on the calling thread (aten._to_copy, seen by the tracker); the memmap's tensor wrapper "
        "(aten.lift_fresh) is counted too while it lives; peak_unwrapped_MiB in the JSON leaves it out",
        "page cache: memplan reads its weight file with O_DIRECT (its disk_read_MiB equals its own count); "
        "accelerate reads np.memmaps through the page cache: 'accelerate (page cache)' found its files "
        "cached "
        "(dispatch_model had just written them and this 24 GiB machine holds them), so it read about nothing "
        "from the disk and its loads were memory copies, from page cache that no budget or tracker counts; "
        "'accelerate (cold)' dropped the files' cache before every forward (posix_fadvise DONTNEED), the "
        "fair "
        "comparison for weights that do not fit in memory",
    ]
    return notes


def run(quick: bool = False, config: PlacementConfig | None = None) -> Result:
    """Run the benchmark (`QUICK` or `FULL` unless `config` is given); writes the plot too."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    cfg = config or (QUICK if quick else FULL)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workdir = scratch_dir()
    try:
        t0 = time.perf_counter()
        hw, cal = load_hardware("cpu"), None
        if cfg.calibrate_bytes:
            hw, cal = calibrate(hw, sample_bytes=cfg.calibrate_bytes)
            print(f"[placement] calibrated in {cal.seconds:.1f} s", file=sys.stderr, flush=True)
        work = make_work(cfg.model, cfg.prompt, cfg.gen, hw, workdir)
        rows = [plain_row(work)]
        for i, frac in enumerate(sorted(cfg.fractions)):
            cold = frac in cfg.cold_fractions
            rows += compare_at(
                work, frac, cold, True, cfg.bw_chunk, cfg.bw_limit, accelerate_first=i % 2 == 1
            )
        rows.append(plain_row(work, plain_generate(work.model, work.ids, work.gen)))
        measured_s = time.perf_counter() - t0
        del work.model
        gc.collect()
        fx = flexgen_plans(workdir) if cfg.flexgen else None
        scale = plan_at_scale(cfg.scale) if cfg.scale else None
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(workdir, ignore_errors=True)
    plain = rows[0]
    title = (
        f"{cfg.model} fp32 on this CPU, prompt {cfg.prompt}, {cfg.gen} new tokens: decode throughput vs "
        "device budget"
    )
    write_plot(rows, PLOT, title)
    notes, goals = comparison_notes(rows, cfg, plain)
    notes += [f"memplan refused {r['budget']}: {r['message']}" for r in rows if "lower_bound_bytes" in r]
    notes += flexgen_notes(fx) if fx else []
    notes += [_scale_note(scale, goals)] if scale else []
    notes += _method_notes(cfg, work.weight_bytes, cal)
    extra = {
        "config": asdict(cfg),
        "goals": goals,
        "calibration": cal.to_dict() if cal else None,
        "flexgen": fx,
        "scale": scale,
        "measured_s": measured_s,
        "plot": str(PLOT),
        "weight_bytes": work.weight_bytes,
    }
    return Result(
        "placement",
        f"Generation with streamed weights: memplan vs accelerate disk offload ({cfg.model}, "
        f"{'quick' if quick else 'full'}, CPU)",
        COLUMNS,
        rows,
        notes,
        extra,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.placement [--quick] [--model M] [--fractions 0.25,0.5] [--gen N] [--prompt N] ...`"""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--fractions", help="comma-separated device budgets as fractions of the weight bytes")
    ap.add_argument("--cold", help="comma-separated fractions at which accelerate also runs cold")
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--gen", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-flexgen", action="store_true")
    ap.add_argument("--no-scale", action="store_true")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    changes: dict[str, Any] = {
        k: getattr(args, k) for k in ("model", "prompt", "gen", "threads") if getattr(args, k) is not None
    }
    if args.fractions:
        changes["fractions"] = tuple(float(x) for x in args.fractions.split(","))
    if args.cold:
        changes["cold_fractions"] = tuple(float(x) for x in args.cold.split(","))
    if args.no_flexgen:
        changes["flexgen"] = False
    if args.no_scale:
        changes["scale"] = None
    t0 = time.perf_counter()
    result = run(args.quick, replace(cfg, **changes))
    path = write(result, time.perf_counter() - t0)
    print(markdown(result))
    print(f"wrote {path} and {PLOT}")


if __name__ == "__main__":
    main()
