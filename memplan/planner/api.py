"""The public Python API: `memplan.plan(...)`, `memplan.verify(plan)`, `memplan.load(path)`.

The CLI calls these same functions; nothing here formats output for a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from memplan.errors import InvalidInput
from memplan.ir.hardware import Hardware, load_hardware
from memplan.passes.base import Pass
from memplan.planner.models import Mode, capture, load_model, parse_dtype
from memplan.planner.pipeline import Progress, run_pipeline
from memplan.planner.plan import Plan, Workload
from memplan.planner.plan_io import load_plan
from memplan.planner.sizes import parse_size
from memplan.planner.verify import VerifyReport, verify_plan


def default_passes() -> list[Pass]:
    """The passes that exist today, in pipeline order."""
    from memplan.passes import registry

    return registry.default_pipeline()


def plan(
    model_or_path: str | torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    mode: Mode = "infer",
    budget: str | int | None = None,
    hardware: str | os.PathLike[str] | Hardware = "cpu",
    batch: int | None = None,
    seq: int | None = None,
    optimizer: str = "none",
    dtype: str = "fp32",
    passes: Sequence[Pass] | None = None,
    progress: Progress | None = None,
) -> Plan:
    """Capture the model's step, run the passes and return a plan that fits `budget` on the device tier.

    `budget` is a peak in bytes on the device (`"16GiB"`, `"512MiB"`, or an int); None means the device
    tier's capacity. `dtype` (fp32, bf16, fp16) is the parameter dtype of zoo models. Raises
    `InfeasibleBudget` (with the lower bound and the tensors forcing it) if no plan the passes make fits.
    """
    if mode not in ("train", "infer"):
        raise InvalidInput(f"mode must be 'train' or 'infer', got {mode!r}")
    if optimizer not in ("none", "sgd", "adamw"):
        raise InvalidInput(f"optimizer must be none, sgd or adamw, got {optimizer!r}")
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    budget_bytes = hw.tier("device").capacity_bytes if budget is None else parse_size(budget)
    if budget_bytes <= 0:
        raise InvalidInput("budget must be a positive size, e.g. 16GiB")
    if progress:
        progress("capturing")
    loaded = load_model(model_or_path, mode, example_inputs, batch, seq, dtype=parse_dtype(dtype))
    graph, _ = capture(loaded, mode, optimizer)
    workload = Workload(mode, loaded.batch, loaded.seq, optimizer if mode == "train" else "none")
    chosen = default_passes() if passes is None else list(passes)
    return run_pipeline(graph, hw, workload, budget_bytes, loaded.source, chosen, progress=progress)


def verify(plan_or_path: Plan | str | os.PathLike[str]) -> VerifyReport:
    """Replay a plan and check its invariants (see `memplan.planner.verify`)."""
    p = plan_or_path if isinstance(plan_or_path, Plan) else load_plan(plan_or_path)
    return verify_plan(p)


def load(path: str | os.PathLike[str]) -> Plan:
    """Read a plan file (validated against the schema)."""
    return load_plan(path)
