"""What the bitwidth pass solves: the sensitivity it is given, and the multiple-choice problem built from it.

The pass cannot measure sensitivity itself (that needs the model's weights and data, which a pass never
touches): the planner measures it (`memplan.planner.sensitivity`) and hands it over as a
`SensitivityTable` in the pass's options, one `TensorSensitivity` per quantizable weight, by the name the
plan gives that parameter. Here each such weight becomes one layer of a `ChoiceProblem`
(`memplan.solvers.multiple_choice`), with one choice per candidate format:

    choice      its own dtype (cost 0, its captured bytes), and every candidate narrower than that dtype
    cost        curvature / 2 * squared error of the format: HAWQ-V2's Omega = Tr(H)/n * ||W - Q(W)||^2,
                halved, so that it reads as the second-order estimate of the loss increase, in nats
    size        the stored bytes of the format (`TensorBits.stored_bytes`: payload, scales, zero points)
    bops        MACs x weight bits x activation bits; MACs = elements x tokens the weight multiplies
    latency     per read of the weight (one per forward), the roofline of that read alone on the plan's
                hardware: max(stored bytes / memory bandwidth, 2 x elements x tokens / FLOP/s)

Ties: the weights of sibling modules whose names a `fused` group lists (q/k/v projections, gate and up
projections under one parent) must share a format, as fused kernels (vLLM, compressed-tensors checkpoints)
need.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from memplan.errors import InvalidInput
from memplan.ir.graph import Graph, Role, Value
from memplan.ir.hardware import Hardware
from memplan.plans.decisions import (
    DTYPE_FORMAT,
    FORMAT_BITS,
    Candidate,
    CandidateCost,
    TensorBits,
    TensorCandidates,
)
from memplan.plans.plan import Workload
from memplan.solvers.multiple_choice import Choice, ChoiceProblem, Layer


@dataclass(frozen=True, slots=True)
class TensorSensitivity:
    """What the planner measured for one quantizable weight: `name` as in the plan, `transposed` when it is
    stored [in, out] (GPT-2's Conv1D), the curvature estimate (mean Hessian diagonal Tr(H)/n, or the mean
    squared gradient, see `estimator`), and per candidate label its squared quantization error
    ||W - dequantize(quantize(W))||^2."""

    name: str
    curvature: float
    errors: dict[str, float]
    transposed: bool = False
    estimator: str = "hutchinson"


@dataclass(frozen=True, slots=True)
class SensitivityTable:
    """Every quantizable weight's sensitivity, and how it was measured (in words, kept in the plan)."""

    tensors: tuple[TensorSensitivity, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class BitsProblem:
    """The problem and what its layers are: the weight of each layer, the spec of each of its choices."""

    problem: ChoiceProblem
    values: tuple[Value, ...]
    specs: tuple[tuple[TensorBits, ...], ...]
    tables: tuple[TensorSensitivity, ...]
    ties: tuple[tuple[int, ...], ...]
    """Groups of value ids that must share a format."""

    def candidates(self) -> tuple[TensorCandidates, ...]:
        """The priced candidates of every weight, for the plan's bits record."""
        out = []
        for layer, specs, t, v in zip(self.problem.layers, self.specs, self.tables, self.values, strict=True):
            priced = tuple(
                CandidateCost(c.format, spec, c.cost, int(c.size))
                for c, spec in zip(layer.choices, specs, strict=True)
            )
            out.append(TensorCandidates(v.id, max(t.curvature, 0.0), t.estimator, priced))
        return tuple(out)


def build_problem(
    graph: Graph,
    hardware: Hardware,
    workload: Workload,
    table: SensitivityTable,
    candidates: tuple[Candidate, ...],
    fused: tuple[tuple[str, ...], ...],
) -> BitsProblem:
    """One layer per weight of `table`, one choice per format it may take (see the module docstring)."""
    by_name = {v.name: v for v in graph.values if v.role == Role.PARAMETER}
    layers, values, specs = [], [], []
    for t in table.tensors:
        v = _weight(by_name, t)
        own = TensorBits(v.id, DTYPE_FORMAT[v.dtype], transposed=t.transposed)
        options = [(own.format, own, 0.0)]
        for c in candidates:
            if c.scale_layout != "none" or FORMAT_BITS[c.format] < own.bits:
                if c.label not in t.errors:
                    raise InvalidInput(f"the sensitivity of {t.name} has no error for candidate {c.label}")
                cost = max(t.curvature, 0.0) / 2 * t.errors[c.label]
                options.append((c.label, c.for_tensor(v.id, v.shape, t.transposed), cost))
        choices = tuple(
            Choice(label, cost, *_resources(graph, hardware, workload, v, spec))
            for label, spec, cost in options
        )
        layers.append(Layer(t.name, choices))
        values.append(v)
        specs.append(tuple(spec for _, spec, _ in options))
    index = {v.id: i for i, v in enumerate(values)}
    groups = fused_groups(values, fused)
    ties = tuple((index[g[0]], index[j]) for g in groups for j in g[1:])
    problem = ChoiceProblem(tuple(layers), ties)
    return BitsProblem(problem, tuple(values), tuple(specs), table.tensors, groups)


ESTIMATORS = ("hutchinson", "fisher", "given")
"""How a curvature may have been measured (`given`: by the caller, some other way)."""


def _weight(by_name: dict[str, Value], t: TensorSensitivity) -> Value:
    if t.estimator not in ESTIMATORS or not math.isfinite(t.curvature):
        raise InvalidInput(
            f"the sensitivity of {t.name}: estimator {t.estimator!r} must be one of {', '.join(ESTIMATORS)} "
            f"and curvature {t.curvature} a finite number"
        )
    v = by_name.get(t.name)
    if v is None or v.alias_of is not None or len(v.shape) < 2:
        raise InvalidInput(
            f"the sensitivity table names {t.name!r}, which is no 2-D weight storage of this plan; measure "
            "it on the model the plan was made for (memplan.planner.sensitivity)"
        )
    if v.dtype not in DTYPE_FORMAT:
        raise InvalidInput(f"{t.name} is {v.dtype}: the bitwidth pass quantizes float weights only")
    return v


def reads(graph: Graph, vid: int) -> list[int]:
    """The steps that read storage `vid` (through any alias of it), in order."""
    return sorted(s for v in graph.values if graph.storage_of(v.id) == vid for s in graph.consumers(v.id))


def _resources(
    graph: Graph, hw: Hardware, w: Workload, v: Value, spec: TensorBits
) -> tuple[float, float, float]:
    """(stored bytes, BOPs, latency seconds) of weight `v` stored as `spec`; see the module docstring."""
    size = spec.stored_bytes(v.shape)
    numel = 1
    for d in v.shape:
        numel *= d
    steps = reads(graph, v.id) or [0]
    prompt = w.batch * (w.seq or 1)
    tokens = [prompt] + [w.batch] * (len(steps) - 1) if w.gen else [prompt] * len(steps)
    act_bits = FORMAT_BITS.get(DTYPE_FORMAT.get(v.dtype, "fp32"), 32)
    bops = float(numel * sum(tokens) * spec.bits * act_bits)
    latency = sum(max(size / hw.mem_bw, 2.0 * numel * n / hw.flops) for n in tokens)
    return float(size), bops, latency


def fused_groups(values: list[Value], fused: tuple[tuple[str, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Value ids of sibling weights (`parent.q_proj.weight`, `parent.k_proj.weight`...) that one group of
    `fused` names together, for every parent with at least two of them."""
    found: dict[tuple[int, str], list[int]] = defaultdict(list)
    for v in values:
        module, _, _ = v.name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for g, names in enumerate(fused):
            if leaf in names:
                found[(g, parent)].append(v.id)
    return tuple(tuple(ids) for ids in found.values() if len(ids) > 1)
