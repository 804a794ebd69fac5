"""The `bitwidth` pass: a storage format per weight (fp16, int8 per channel, int4/int3/int2 per group,
symmetric or not) for the least predicted loss increase under a limit on the weights' bytes, BOPs or
latency: HAWQ-V3's integer program (Yao et al., ICML 2021) over HAWQ-V2's Hessian-trace sensitivity.

    sensitivity (planner) ──► one layer per weight, one choice per format ──► solve_multiple_choice
    (options.sensitivity)     (`bitwidth_problem`: cost, bytes, BOPs, latency)   (exact MILP, HiGHS)
                                                                                       │
    plan: BitsDecision (chosen formats + every priced candidate + ties) ◄──────────────┘
          residency, events, predictions derived afresh over the effective graph (`rebased`)

The limit: `size_limit_bytes` bounds the stored bytes of the weights the table names; by default it is
what makes the plan fit the device budget: the budget minus the device peak of everything else (exact
while those weights are live at every step, as weights are before any placement). `bops_limit` and
`latency_limit_s` bound the other two resources (see `bitwidth_problem`). A limit no choice meets raises
`InfeasibleBudget` with the least bytes (or BOPs, or seconds) any choice reaches.

The sensitivity comes in the options: a pass never touches weights or data, so `memplan.plan` measures it
on the model when the pipeline holds this pass (`memplan.planner.sensitivity`), and a caller may give
its own table. Without one the pass refuses. The pass is lossy, so it runs only when named
(`passes=["bitwidth", ...]`, `--passes bitwidth,allocate`); it plans inference (one forward or a
generation); combining it with weight streaming is the placement pass's to price.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Literal

from memplan.errors import InfeasibleBudget, InvalidInput
from memplan.ir.analysis import peaks
from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.passes.base import PassOutput, PassSpec
from memplan.passes.baseline import rebased
from memplan.passes.bitwidth_problem import BitsProblem, SensitivityTable, build_problem
from memplan.plans.decisions import BitsDecision, Candidate
from memplan.plans.plan import PassReport, Plan, SolverReport
from memplan.solvers.multiple_choice import ChoiceSolution, Usage, solve_multiple_choice
from memplan.units import format_size

NAME = "bitwidth"

DEFAULT_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("fp16"),
    Candidate("int8", True, "per-channel"),
    Candidate("int4", True, "per-group"),
    Candidate("int4", False, "per-group"),
    Candidate("int3", True, "per-group"),
    Candidate("int3", False, "per-group"),
    Candidate("int2", False, "per-group"),
)
"""The formats tried by default (group sizes come from `BitwidthOptions.group_size`). int2 is asymmetric
only: symmetric int2 has three levels."""

FUSED: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling modules that fused kernels run as one matrix (Llama's names); their weights share a format."""


@dataclass(frozen=True, slots=True)
class BitwidthOptions:
    """`candidates`: the formats a weight may take besides its own dtype; a per-group candidate without a
    group size gets `group_size` (fitted per tensor to the largest divisor of its rows at most that).
    Limits (None: none; the size limit's None means "what fits the device budget"): `size_limit_bytes` on
    the stored bytes of the quantizable weights, `bops_limit`, `latency_limit_s`. `fused`: sibling module
    names whose weights share a format. `sensitivity`: the measured table (None: `memplan.plan` measures
    it, by `estimator`: `hutchinson` (Hessian trace, a few Rademacher probes) or `fisher` (mean squared
    gradient, one backward per batch))."""

    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES
    group_size: int = 128
    size_limit_bytes: int | None = None
    bops_limit: float | None = None
    latency_limit_s: float | None = None
    time_limit_s: float = 10.0
    fused: tuple[tuple[str, ...], ...] = FUSED
    estimator: Literal["hutchinson", "fisher"] = "hutchinson"
    sensitivity: SensitivityTable | None = None

    def resolved_candidates(self) -> tuple[Candidate, ...]:
        """The candidates with `group_size` filled in where they leave it open; InvalidInput if malformed."""
        out = []
        for c in self.candidates:
            if c.format.startswith("int") and c.scale_layout not in ("per-channel", "per-group"):
                raise InvalidInput(
                    f"candidate {c.label}: integer formats need per-channel or per-group scales"
                )
            if c.scale_layout == "per-group" and c.group_size is None:
                c = Candidate(c.format, c.symmetric, c.scale_layout, self.group_size, c.scale_dtype)
            out.append(c)
        labels = Counter(c.label for c in out)
        if dup := [k for k, n in labels.items() if n > 1]:
            raise InvalidInput(f"bitwidth candidates repeat: {', '.join(dup)}")
        return tuple(out)


def run(graph: Graph, hardware: Hardware, plan: Plan, options: BitwidthOptions | None = None) -> PassOutput:
    """Choose every weight's format (see the module docstring)."""
    opts = options or BitwidthOptions()
    t0 = time.perf_counter()
    _check(opts)
    if opts.sensitivity is None:
        raise InvalidInput(
            "the bitwidth pass needs the weights' sensitivity: plan with memplan.plan (it measures it on "
            "the model), or give BitwidthOptions(sensitivity=...) from memplan.planner.sensitivity"
        )
    built = build_problem(graph, hardware, plan.workload, opts.sensitivity, opts.resolved_candidates(),
                          opts.fused)  # fmt: skip
    size_limit, rest = _size_limit(plan, built, opts)
    limits = Usage(size_limit, opts.bops_limit, opts.latency_limit_s)
    solution = solve_multiple_choice(replace(built.problem, limits=limits), opts.time_limit_s)
    if solution.choice is None:
        raise _refusal(plan, built, solution, rest, opts)
    # choice 0 of every weight is its own dtype: the others are what the pass quantized
    quantized = tuple(specs[k] for specs, k in zip(built.specs, solution.choice, strict=True) if k)
    record = BitsDecision(quantized, built.candidates(), built.ties, opts.sensitivity.description)
    new_plan = rebased(plan.with_(decisions=plan.decisions.with_(bits=record)))
    report = SolverReport(
        "highs-milp", solution.status, solution.objective, solution.bound, solution.gap, solution.time_s,
        opts.time_limit_s,
    )  # fmt: skip
    notes = _notes(built, solution, size_limit, opts)
    return PassOutput(new_plan, PassReport(NAME, time.perf_counter() - t0, report, notes))


def _check(opts: BitwidthOptions) -> None:
    if not opts.time_limit_s > 0:
        raise InvalidInput(f"bitwidth time limit {opts.time_limit_s}: must be a positive number of seconds")
    if opts.group_size < 1:
        raise InvalidInput(f"bitwidth group size {opts.group_size}: must be at least 1")
    if opts.estimator not in ("hutchinson", "fisher"):
        raise InvalidInput(f"unknown sensitivity estimator {opts.estimator!r}; use hutchinson or fisher")
    for name in ("size_limit_bytes", "bops_limit", "latency_limit_s"):
        value = getattr(opts, name)
        if value is not None and not value > 0:
            raise InvalidInput(f"bitwidth {name} = {value}: must be positive (or None: no limit)")


def _size_limit(plan: Plan, built: BitsProblem, opts: BitwidthOptions) -> tuple[float | None, int]:
    """The limit on the weights' stored bytes, and the device peak of everything else (see the module
    docstring): the given limit, or the device budget minus that peak."""
    weights = {v.id for v in built.values}
    others = [iv for iv in plan.residency if iv.tier == "device" and iv.value_id not in weights]
    peak = peaks(others, max(len(plan.ops), 1)).get("device")
    rest = (peak.bytes if peak else 0) + _dequant_reserve(plan, built)
    if opts.size_limit_bytes is not None:
        return float(opts.size_limit_bytes), rest
    return float(max(plan.budget_bytes["device"] - rest, 0)), rest


def _dequant_reserve(plan: Plan, built: BitsProblem) -> int:
    """What quantized weights add to a generation's unit workspaces at most (`dequant_workspace_bytes` of
    the worst candidate of any weight): the device budget keeps it free, since the formats are not known
    before the solve. Single-forward graphs price no such transient."""
    if not plan.ops or not all(op.target.startswith("unit:") for op in plan.ops):
        return 0
    return max(
        (spec.dequant_workspace_bytes(v.shape) for v, specs in zip(built.values, built.specs, strict=True)
         for spec in specs[1:]),
        default=0,
    )  # fmt: skip


def _refusal(
    plan: Plan, built: BitsProblem, sol: ChoiceSolution, rest: int, opts: BitwidthOptions
) -> Exception:
    """InfeasibleBudget naming the least each limited resource can be (or InvalidInput on a timeout)."""
    n = len(built.values)
    if sol.status == "timeout":
        return InvalidInput(
            f"bitwidth: no choice of formats for the {n} weights found in {opts.time_limit_s} s; raise "
            "BitwidthOptions.time_limit_s"
        )
    least = int(sol.minimum.size or 0)
    budget = plan.budget_bytes["device"]
    largest = sorted(built.values, key=lambda v: -v.size_bytes)[:8]
    names = [f"{v.name} ({format_size(v.size_bytes)})" for v in largest]
    short = {s.resource: s for s in sol.shortfalls}
    smallest = min((c for layer in built.problem.layers for c in layer.choices), key=lambda c: c.size).format
    at_least = f"{format_size(least)} (each at its smallest candidate, e.g. {smallest})"
    if "size" in short and opts.size_limit_bytes is None:
        msg = (
            f"device budget {format_size(budget)} is infeasible with any storage format: the {n} quantizable "
            f"weights take at least {at_least} and the rest of the plan peaks at {format_size(rest)} on the "
            f"device. Raise the budget to at least {format_size(least + rest)}, or stream weights (placement)"
        )
        return InfeasibleBudget(msg, least + rest, budget, names)
    if "size" in short:
        limit = int(short["size"].limit)
        msg = (
            f"bitwidth: the size limit {format_size(limit)} for the {n} quantizable weights is below the "
            f"least any choice of formats reaches, {at_least}; raise it to at least {format_size(least)}"
        )
        return InfeasibleBudget(msg, least, limit, names)
    for s in sol.shortfalls:
        unit = "BOPs" if s.resource == "bops" else "s"
        msg = (
            f"bitwidth: the {s.resource} limit {s.limit:.6g} {unit} is below the least any choice of "
            f"formats for the {n} weights reaches, {s.minimum:.6g} {unit}; raise it to at least that"
        )
        return InfeasibleBudget(msg, least + rest, budget, names)
    msg = (
        f"bitwidth: each limit (size, BOPs, latency) can be met, but no choice of formats for the {n} "
        "weights meets them together; raise one of them"
    )
    return InfeasibleBudget(msg, least + rest, budget, names)


def _notes(
    built: BitsProblem, sol: ChoiceSolution, limit: float | None, opts: BitwidthOptions
) -> tuple[str, ...]:
    labels = Counter(sol.formats or ())
    before = sum(v.size_bytes for v in built.values)
    after = int(sol.usage.size) if sol.usage and sol.usage.size is not None else before
    where = "given" if opts.size_limit_bytes is not None else "the device budget less everything else"
    mean_bits = 8 * after / max(sum(_numel(v.shape) for v in built.values), 1)
    return (
        f"{len(built.values)} weights: " + ", ".join(f"{k} {n}" for k, n in sorted(labels.items())),
        f"weights {format_size(before)} -> {format_size(after)} ({100 * after / max(before, 1):.1f}%, "
        f"{mean_bits:.2f} bits per element with scales) under a size limit of "
        + (f"{format_size(int(limit))} ({where})" if limit is not None else "none"),
        f"predicted loss increase {sol.objective or 0.0:.4g} nats"
        + (f" (sensitivity: {opts.sensitivity.description})" if opts.sensitivity else ""),
        f"{len(built.ties)} tied groups" if built.ties else "no tied weights",
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


PASS = PassSpec(
    NAME, run, BitwidthOptions, before=frozenset({"bits", "remat", "placement", "allocate"}),
    modes=frozenset({"infer", "generate"}),
)  # fmt: skip
