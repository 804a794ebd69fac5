"""The public Python API: `memplan.plan(...)`, `memplan.verify(plan)`, `memplan.load(path)`,
`memplan.summary(plan)`, `memplan.run_plan(plan, ...)`.

The CLI calls these same functions; nothing here formats output for a terminal. torch is imported only by
the calls that capture or run a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from memplan.errors import InvalidInput
from memplan.ir.hardware import Hardware, load_hardware
from memplan.passes.base import PassSpec
from memplan.passes.manager import Progress, run_pipeline
from memplan.passes.registry import default_pipeline, passes_named
from memplan.plans.plan import Plan, Workload
from memplan.plans.serialize import load_plan
from memplan.plans.verify import VerifyReport, verify_plan
from memplan.units import parse_size

if TYPE_CHECKING:
    import torch

Budget = str | int | Mapping[str, str | int] | None
"""A device peak (`"16GiB"`, an int of bytes), or a peak per tier (`{"device": "6GiB", "host": "32GiB"}`)."""


def budgets_from(budget: Budget) -> dict[str, int]:
    """Tier -> bytes from what the user gave (None: every tier's capacity); the pass manager checks the
    tiers exist and the sizes are positive."""
    if budget is None:
        return {}
    given = budget if isinstance(budget, Mapping) else {"device": budget}
    return {tier: parse_size(size) for tier, size in given.items()}


def plan(
    model_or_path: str | torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    mode: str = "infer",
    budget: Budget = None,
    hardware: str | os.PathLike[str] | Hardware = "cpu",
    batch: int | None = None,
    seq: int | None = None,
    optimizer: str = "none",
    dtype: str = "fp32",
    gen: int = 0,
    passes: Sequence[PassSpec | str] | None = None,
    options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    kv_budget: str | int | float | None = None,
) -> Plan:
    """Capture the model's step, run the passes and return a plan that fits `budget` on every tier.

    `budget` is a peak in bytes on the device (`"16GiB"`, `"512MiB"`, or an int), or a dict of peaks per
    tier; a tier without one is held to its capacity. With `gen` > 0 (infer only) the plan is for a
    generation of `gen` tokens after a prompt (the shape of `example_inputs`, the input ids, or `batch` x
    `seq` for a zoo model), as `model.generate` runs it. `dtype` (fp32, bf16, fp16) is the parameter dtype of
    zoo models; `passes` names or gives the passes (default: every built pass, in pipeline order), and
    `options` maps a pass name to its options dataclass. The `bitwidth` pass (lossy: only when named) gets
    the weights' sensitivity measured here on the model (`memplan.planner.calibration`) unless its options
    carry a table. `kv_budget` (a generation's KV cache: `"2GiB"`, `"20%"`, `"96 tokens"`) runs the
    `kv_budget` pass, with the attention statistics measured here (`memplan.planner.kv_calibration`) unless
    its options carry them. Raises `InfeasibleBudget` (with the lower bound and the tensors forcing it) if no
    plan the passes make fits.
    """
    from memplan.planner.models import capture, capture_generation, load_causal_lm, load_model, parse_dtype

    if mode not in ("train", "infer"):
        raise InvalidInput(f"mode must be 'train' or 'infer', got {mode!r}")
    if optimizer not in ("none", "sgd", "adamw"):
        raise InvalidInput(f"optimizer must be none, sgd or adamw, got {optimizer!r}")
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    budgets = budgets_from(budget)
    chosen = _passes(passes)
    if gen < 0 or (gen and mode != "infer"):
        raise InvalidInput(f"gen ({gen}) plans a generation: use mode='infer' and gen >= 1")
    if progress:
        progress("capturing")
    if gen:
        loaded = load_causal_lm(model_or_path, example_inputs, batch, seq, dtype=parse_dtype(dtype))
        workload = Workload("infer", loaded.batch, loaded.seq, "none", gen)
        graph = capture_generation(loaded, gen)
    else:
        loaded = load_model(model_or_path, mode, example_inputs, batch, seq, dtype=parse_dtype(dtype))  # type: ignore[arg-type]
        graph, _ = capture(loaded, mode, optimizer)  # type: ignore[arg-type]
        workload = Workload(mode, loaded.batch, loaded.seq, optimizer if mode == "train" else "none")  # type: ignore[arg-type]
    if mode == "infer" and any(p.name == "bitwidth" for p in chosen):
        options = _with_sensitivity(options, model_or_path, loaded, gen, parse_dtype(dtype), progress)
    if kv_budget is not None and not any(p.name == "kv_budget" for p in chosen):
        raise InvalidInput("a KV budget is given but the passes leave out kv_budget: add it to the passes")
    if any(p.name == "kv_budget" for p in chosen):
        options = _with_kv(options, kv_budget, model_or_path, loaded, gen, parse_dtype(dtype), progress)
    return run_pipeline(graph, hw, workload, budgets, loaded.source, chosen, options, progress=progress)


def _with_sensitivity(
    options: Mapping[str, Any] | None, spec: Any, loaded: Any, gen: int, dtype: Any, progress: Progress | None
) -> dict[str, Any]:
    """`options` whose bitwidth entry carries a sensitivity table (measured here unless given)."""
    from memplan.passes.bitwidth import BitwidthOptions
    from memplan.planner.calibration import with_sensitivity

    out = dict(options or {})
    given = out.get("bitwidth") or BitwidthOptions()
    if isinstance(given, BitwidthOptions) and given.sensitivity is None:
        if progress:
            progress(f"measuring sensitivity ({given.estimator})")
        out["bitwidth"] = with_sensitivity(given, spec, loaded, gen, dtype)
    return out


def _with_kv(
    options: Mapping[str, Any] | None, budget: str | int | float | None, spec: Any, loaded: Any, gen: int,
    dtype: Any, progress: Progress | None,
) -> dict[str, Any]:  # fmt: skip
    """`options` whose kv_budget entry carries the budget, the model's KV geometry and, where its method
    needs them, the attention statistics (measured here unless given)."""
    from memplan.passes.kv_budget import KVBudgetOptions, check_options
    from memplan.planner.kv_calibration import with_kv_calibration

    out = dict(options or {})
    given = out.get("kv_budget") or KVBudgetOptions()
    if budget is not None:
        if given.budget is not None and given.budget != budget:
            raise InvalidInput("the KV budget is given twice (kv_budget= and the kv_budget pass's options)")
        given = replace(given, budget=budget)
    if given.budget is None:
        return out
    if not gen:
        raise InvalidInput("a KV budget plans a generation's cache: plan with mode='infer' and gen=N")
    check_options(given)
    if progress and given.calibration is None and given.method in ("memplan", "prefixkv", "zigzagkv"):
        progress("measuring attention statistics")
    out["kv_budget"] = with_kv_calibration(given, spec, loaded, dtype)
    return out


def _passes(passes: Sequence[PassSpec | str] | None) -> list[PassSpec]:
    if passes is None:
        return default_pipeline()
    names = [p for p in passes if isinstance(p, str)]
    named = iter(passes_named(names))
    return [next(named) if isinstance(p, str) else p for p in passes]


def verify(plan_or_path: Plan | str | os.PathLike[str]) -> VerifyReport:
    """Replay a plan and check its invariants (see `memplan.plans.verify`)."""
    p = plan_or_path if isinstance(plan_or_path, Plan) else load_plan(plan_or_path)
    return verify_plan(p)


def load(path: str | os.PathLike[str]) -> Plan:
    """Read a plan file (validated against the schema)."""
    return load_plan(path)


def summary(plan: Plan) -> str:
    """The plan in plain text: peaks per tier, the tensors at the device peak, each pass's solver report."""
    from memplan.planner.report import summary_text

    return summary_text(plan)
