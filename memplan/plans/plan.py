"""The `Plan`: what the passes decided for one model, workload and machine, as data.

A plan is self-contained: it carries the tensor table and the op schedule it was made for (so a runtime
without memplan can read it), where each storage lives over which schedule steps (`residency`), offsets in
each tier's arena, the event schedule, the predicted peaks and time, and the provenance of every pass
(solver, status, objective, bound, gap, time). Its JSON form is versioned and validated against
`plan.schema.json` on load; writes are atomic. See docs/plan-format.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from memplan.ir.analysis import Interval
from memplan.ir.graph import Graph, Op, Role, Value
from memplan.ir.hardware import Hardware
from memplan.plans.decisions import Decisions

SCHEMA_VERSION = 2

EventKind = Literal["compute", "prefetch", "evict", "swap_out", "swap_in", "recompute", "free"]


@dataclass(frozen=True, slots=True)
class Workload:
    """What the plan is for: a training step, an inference forward, or (infer with `gen` > 0) a generation
    of `gen` tokens after a prompt of `seq` tokens, at this batch."""

    mode: Literal["train", "infer"]
    batch: int
    seq: int | None = None
    optimizer: str = "none"
    gen: int = 0
    """Tokens generated (0: one forward, no generation)."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Which model: a display name, where it came from, and its fingerprint (see `fingerprint`)."""

    name: str
    source: str
    fingerprint: str
    parameters: int
    """Number of parameter elements."""


@dataclass(frozen=True, slots=True)
class Event:
    """One thing the runtime does at schedule `step` (a position in the plan's op order, not an op id): run
    op `op_id`, or move / drop / rebuild storage `value_id`."""

    kind: EventKind
    step: int
    op_id: int | None = None
    value_id: int | None = None
    src_tier: str | None = None
    dst_tier: str | None = None
    start_s: float = 0.0
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SolverReport:
    """What a solver did. `status` is one of optimal, feasible, infeasible, timeout, heuristic, trivial."""

    solver: str
    status: str
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    time_s: float = 0.0
    time_limit_s: float | None = None


@dataclass(frozen=True, slots=True)
class PassReport:
    """One pass's run: its name, wall time, solver report, and what it predicts it changed."""

    name: str
    time_s: float
    solver: SolverReport
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Predictions:
    """What the plan predicts: per-tier peaks (bytes, step), step time, and the lower bounds it is held to."""

    peak_bytes: dict[str, int]
    peak_step: dict[str, int]
    time_s: float
    max_load_bytes: int
    """Peak of the live timeline in this schedule: no offset assignment can use less arena on the device."""
    working_set_bytes: int
    """Largest single-op working set: no plan of any kind can put less on the device."""
    arena_bytes: dict[str, int] = field(default_factory=dict)
    """Arena size per tier after offsets were assigned (empty until the allocate pass has run)."""


@dataclass(frozen=True)
class Plan:
    """A complete plan. `tensors` and `ops` are the model as captured (ops in captured order, sizes as
    captured); `decisions` say what the passes changed (order, bits, tiers, remat, offsets), and
    `effective_graph(plan)` applies them. `residency` says where each storage is over `[start, end)`
    schedule steps of that effective order."""

    model: ModelInfo
    hardware: Hardware
    workload: Workload
    budget_bytes: dict[str, int]
    tensors: tuple[Value, ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    residency: tuple[Interval, ...]
    events: tuple[Event, ...]
    predictions: Predictions
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    """tier -> value id -> byte offset in that tier's arena (filled by the allocate pass)."""
    decisions: Decisions = field(default_factory=Decisions)
    """One typed record per pass that has run (see `memplan.plans.decisions`)."""
    passes: tuple[PassReport, ...] = ()
    warnings: tuple[str, ...] = ()
    memplan_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def captured_graph(self) -> Graph:
        """The IR this plan was made for, as captured (rebuilt from its own tables)."""
        return Graph(self.model.name, self.tensors, self.ops, self.outputs, self.warnings)

    def graph(self) -> Graph:
        """The IR under the passes so far: ops in the plan's order, sizes as its bits make them."""
        from memplan.plans.effective import effective_graph

        return effective_graph(self)

    def with_(self, **changes: Any) -> Plan:
        """A copy with some fields replaced (plans are immutable)."""
        return replace(self, **changes)

    # Thin conveniences over the functions of the planner, so that `plan.save(...)` reads naturally.
    def save(self, path: str) -> None:
        from memplan.plans.serialize import save_plan

        save_plan(self, path)

    @staticmethod
    def load(path: str) -> Plan:
        from memplan.plans.serialize import load_plan

        return load_plan(path)

    def compare(self, measured: Any) -> Any:
        """Predicted vs measured: a `Comparison` for a `memplan.runtime.tracker.Measurement`, a
        `GenerationComparison` for a generation's `GenerationMeasurement`."""
        from memplan.plans.compare import compare, compare_generation

        if hasattr(measured, "decode_s"):
            return compare_generation(self, measured)
        return compare(self, measured)

    def to_dict(self) -> dict[str, Any]:
        from memplan.plans.serialize import plan_to_dict

        return plan_to_dict(self)


def fingerprint(graph: Graph) -> str:
    """Hash of the parameter and buffer names, shapes and dtypes and the captured op list (by op id, so the
    order a `schedule` pass chose does not change it): binds a plan to a model."""
    h = hashlib.sha256()
    state = sorted(
        (v.name, v.shape, v.dtype) for v in graph.values if v.role in (Role.PARAMETER, Role.BUFFER)
    )
    h.update(json.dumps([[n, list(s), d] for n, s, d in state]).encode())
    h.update(json.dumps([op.target for op in sorted(graph.ops, key=lambda o: o.id)]).encode())
    return "sha256:" + h.hexdigest()[:32]


def jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and int-keyed dicts as plain JSON values."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
