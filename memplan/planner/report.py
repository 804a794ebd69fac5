"""What a plan says, for people: a plain-text summary (`Plan.summary()`) and the same as rich tables.

Both renderers draw from one `PlanSummary`, built once by `summarize`: the header (model, workload,
hardware), the peak of every tier with its budget, the step and op where it happens and its ratio to the
two lower bounds (`predictions.max_load_bytes`, the live-bytes peak of the schedule with everything on the
device, and `predictions.working_set_bytes`, the largest single-op working set), the largest tensors live
at the device peak, the bytes at that peak by role, one row per pass with its solver's status, objective,
bound and gap, the passes' decision summaries, the format of every weight the bitwidth pass priced (when it
ran), and the plan's warnings.

Residency is per storage root (views own 0 bytes), so the tensors at a peak are the storages that make it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memplan.ir.analysis import live_at
from memplan.ir.hardware import TIER_ORDER
from memplan.plans.decisions import (
    PASS_OF_FIELD,
    AllocateDecision,
    BitsDecision,
    Candidate,
    KVDecision,
    OrderDecision,
    PlacementDecision,
    RematDecision,
)
from memplan.plans.plan import PassReport, Plan
from memplan.units import format_size

TOP_TENSORS = 10
_DECISION_WIDTH = 100


@dataclass(frozen=True, slots=True)
class TierPeak:
    """One tier's predicted peak and where it happens. Ratios are None where the bound does not apply."""

    tier: str
    peak_bytes: int
    budget_bytes: int | None
    step: int | None
    op: str
    """`name (target)` of the op at the peak step ("" when the tier is unused)."""
    vs_max_load: float | None
    vs_working_set: float | None


@dataclass(frozen=True, slots=True)
class LiveTensor:
    """A storage live at the device peak."""

    name: str
    role: str
    size_bytes: int
    module_path: str
    layer: int | None


@dataclass(frozen=True, slots=True)
class PassRow:
    """One `PassReport` flattened for a table."""

    name: str
    solver: str
    status: str
    objective: float | None
    bound: float | None
    gap: float | None
    time_s: float
    notes: str


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """Every number the renderers show, computed once."""

    header: tuple[tuple[str, str], ...]
    tiers: tuple[TierPeak, ...]
    device_step: int | None
    top_tensors: tuple[LiveTensor, ...]
    live_tensor_count: int
    role_bytes: tuple[tuple[str, int], ...]
    passes: tuple[PassRow, ...]
    decisions: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]
    bits: tuple[tuple[str, ...], ...] | None = None
    """With a bits decision: per quantizable weight, its format, bytes stored and captured, and cost."""
    schedule: tuple[tuple[str, str, str], ...] | None = None
    """When the schedule pass ran: (quantity, captured order, this plan) rows (`schedule_rows`)."""


def summarize(plan: Plan, top: int = TOP_TENSORS) -> PlanSummary:
    """The numbers of the summary: peaks, the tensors and roles at the device peak, passes, decisions."""
    device_step = plan.predictions.peak_step.get("device")
    live = live_at(plan.residency, device_step, "device") if device_step is not None else []
    by_id = {v.id: v for v in plan.tensors}
    tensors = [
        LiveTensor(
            by_id[iv.value_id].name,
            str(by_id[iv.value_id].role),
            iv.size_bytes,
            by_id[iv.value_id].module_path,
            by_id[iv.value_id].layer,
        )
        for iv in live
    ]
    roles: dict[str, int] = defaultdict(int)
    for t in tensors:
        roles[t.role] += t.size_bytes
    return PlanSummary(
        header=_header(plan),
        tiers=tuple(_tier_peak(plan, tier) for tier in _tiers(plan)),
        device_step=device_step,
        top_tensors=tuple(tensors[:top]),
        live_tensor_count=len(tensors),
        role_bytes=tuple(sorted(roles.items(), key=lambda kv: -kv[1])),
        passes=tuple(_pass_row(p) for p in plan.passes),
        decisions=tuple(
            (PASS_OF_FIELD[f.name], _describe(getattr(plan.decisions, f.name)))
            for f in fields(plan.decisions)
            if getattr(plan.decisions, f.name) is not None
        ),
        warnings=plan.warnings,
        bits=_bits_rows(plan),
        schedule=schedule_rows(plan),
    )


def schedule_rows(plan: Plan) -> tuple[tuple[str, str, str], ...] | None:
    """Before (captured order, Belady's replacement at this plan's device peak when the plan replaces) and
    after (this plan): the peak with every tensor on the device, the device peak, and the bytes moved off
    and back onto the device beyond the compulsory (reloads and write-outs: `swap_in` events and `evict`
    events that take time; evictions of a clean copy are free)."""
    if not any(p.name == "schedule" for p in plan.passes):
        return None
    from memplan.passes.schedule_model import build_problem
    from memplan.solvers.schedule_problem import belady, compulsory_bytes, peak

    captured, _ = build_problem(plan.captured_graph(), plan.workload.mode)
    ordered, roots = build_problem(plan.graph(), plan.workload.mode)
    size = dict(zip(roots, ordered.sizes, strict=True))
    moves = [e for e in plan.events if e.kind == "swap_in" or (e.kind == "evict" and e.duration_s > 0)]
    rows = [("peak, every tensor on the device", format_size(peak(captured, list(range(captured.n_ops)))),
             format_size(peak(ordered, list(range(ordered.n_ops)))))]  # fmt: skip
    if not moves:
        return (*rows, ("device peak", "-", format_size(plan.predictions.peak_bytes.get("device", 0))),
                ("off-device bytes", "0 B", "0 B"))  # fmt: skip
    after = sum(size.get(e.value_id, 0) for e in moves if e.value_id is not None)
    base = belady(captured, list(range(captured.n_ops)), plan.predictions.peak_bytes["device"])
    comp = compulsory_bytes(ordered)
    return (
        *rows,
        ("device peak", format_size(base.peak_bytes), format_size(plan.predictions.peak_bytes["device"])),
        ("off-device bytes, compulsory", format_size(comp), format_size(comp)),
        ("off-device bytes, beyond the compulsory", format_size(base.moved_bytes),
         format_size(max(after - comp, 0))),
    )  # fmt: skip


def _bits_rows(plan: Plan) -> tuple[tuple[str, ...], ...] | None:
    """One row per weight the bitwidth pass priced: name, chosen label, stored / captured bytes, cost."""
    bits = plan.decisions.bits
    if bits is None:
        return None
    by_id = {v.id: v for v in plan.tensors}
    rows = []
    for t in bits.candidates:
        chosen = bits.of(t.value_id)
        pick = next((c for c in t.candidates if c.bits == chosen), t.candidates[0])
        v = by_id[t.value_id]
        size = f"{format_size(pick.stored_bytes)} of {format_size(v.size_bytes)}"
        b = pick.bits
        label = Candidate(b.format, b.symmetric, b.scale_layout, b.group_size, b.scale_dtype).label
        rows.append((v.name, label, size, f"{pick.cost:.3g}", f"{t.curvature:.3g} ({t.estimator})"))
    return tuple(rows)


def _header(plan: Plan) -> tuple[tuple[str, str], ...]:
    m, w, hw = plan.model, plan.workload, plan.hardware
    seq = "" if w.seq is None else f", seq {w.seq}"
    return (
        ("model", f"{m.name} ({m.source}), {m.parameters:,} parameters, {m.fingerprint}"),
        (
            "workload",
            f"generation, batch {w.batch}, prompt {w.seq}, gen {w.gen}"
            if w.gen
            else f"{w.mode}, batch {w.batch}{seq}, optimizer {w.optimizer}",
        ),
        (
            "hardware",
            f"{hw.name} ({hw.device_kind}), tiers {', '.join(t.name for t in hw.tiers)}"
            + (f"; EMULATED: {', '.join(hw.emulated)} (backed by host memory)" if hw.emulated else ""),
        ),
        (
            "schedule",
            f"{len(plan.ops)} ops, {len(plan.tensors)} tensors, {len(plan.events)} events, "
            f"predicted step time {plan.predictions.time_s * 1e3:.3f} ms",
        ),
        (
            "memplan",
            f"{plan.memplan_version or '?'}, schema {plan.schema_version}, created {plan.created or '?'}",
        ),
    )


def tier_rank(tier: str) -> tuple[int, str]:
    """Sort key for tiers: memory-hierarchy order (device, host, cxl, ssd), unknown names last."""
    rank: dict[str, int] = {t: i for i, t in enumerate(TIER_ORDER)}
    return rank.get(tier, len(rank)), tier


def ordered_tiers(tiers: Iterable[str]) -> list[str]:
    """The distinct tiers in memory-hierarchy order."""
    return sorted(set(tiers), key=tier_rank)


def _tiers(plan: Plan) -> list[str]:
    """Tiers with a peak, a budget or a residency."""
    used = (iv.tier for iv in plan.residency)
    return ordered_tiers([*plan.predictions.peak_bytes, *plan.budget_bytes, *used])


def _tier_peak(plan: Plan, tier: str) -> TierPeak:
    pred = plan.predictions
    peak = pred.peak_bytes.get(tier, 0)
    step = pred.peak_step.get(tier) if peak > 0 else None
    op = ""
    ops = plan.graph().ops  # steps are positions in the plan's order
    if step is not None and 0 <= step < len(ops):
        op = f"{ops[step].name} ({ops[step].target})"
    on_device = tier == "device"
    return TierPeak(
        tier=tier,
        peak_bytes=peak,
        budget_bytes=plan.budget_bytes.get(tier),
        step=step,
        op=op,
        vs_max_load=peak / pred.max_load_bytes if on_device and pred.max_load_bytes else None,
        vs_working_set=peak / pred.working_set_bytes if on_device and pred.working_set_bytes else None,
    )


def _pass_row(p: PassReport) -> PassRow:
    s = p.solver
    return PassRow(p.name, s.solver, s.status, s.objective, s.bound, s.gap, p.time_s, "; ".join(p.notes))


def _describe(record: Any) -> str:
    """A one-line digest of a pass's decision record."""
    text = _digest(record)
    return text if len(text) <= _DECISION_WIDTH else text[: _DECISION_WIDTH - 1] + "…"


def _digest(record: Any) -> str:
    if isinstance(record, RematDecision):
        count = Counter(t.decision for t in record.tensors)
        kinds = ", ".join(f"{k} {count[k]}" for k in ("keep", "swap", "recompute", "split"))
        return f"{kinds}; {len(record.blocks)} checkpointed blocks; swap tier {record.tier or 'none'}"
    if isinstance(record, AllocateDecision):
        return "; ".join(
            f"{p.tier} arena {format_size(p.arena_bytes)} "
            f"(bound {format_size(p.lower_bound_bytes)}, {p.status})"
            for p in record.packings
        )
    if isinstance(record, OrderDecision):
        moved = sum(a != b for a, b in zip(record.op_ids, sorted(record.op_ids), strict=True))
        return f"{len(record.op_ids)} ops, {moved} away from their captured position"
    if isinstance(record, BitsDecision):
        count = Counter(b.format for b in record.tensors)
        return f"{len(record.tensors)} tensors: " + ", ".join(f"{f} {n}" for f, n in sorted(count.items()))
    if isinstance(record, KVDecision):
        return f"{len(record.budgets)} budgets, {sum(b.tokens for b in record.budgets)} tokens in all"
    if isinstance(record, PlacementDecision):
        count = Counter(p.tier for p in record.tensors)
        return "off the device: " + ", ".join(f"{t} {n}" for t, n in sorted(count.items()))
    return str(record)


# -- cell formatting shared by both renderers ---------------------------------------------------------


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _gap(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _tier_cells(t: TierPeak) -> list[str]:
    budget = "-" if t.budget_bytes is None else format_size(t.budget_bytes)
    used = "-" if not t.budget_bytes else f"{100 * t.peak_bytes / t.budget_bytes:.1f}%"
    step = "-" if t.step is None else str(t.step)
    return [
        t.tier,
        format_size(t.peak_bytes),
        budget,
        used,
        step,
        t.op or "-",
        _ratio(t.vs_max_load),
        _ratio(t.vs_working_set),
    ]


def _tensor_cells(t: LiveTensor) -> list[str]:
    layer = "-" if t.layer is None else str(t.layer)
    return [t.name, t.role, format_size(t.size_bytes), t.module_path or "-", layer]


def _pass_cells(p: PassRow) -> list[str]:
    return [
        p.name,
        p.solver,
        p.status,
        _num(p.objective),
        _num(p.bound),
        _gap(p.gap),
        f"{p.time_s:.3f}s",
        p.notes or "-",
    ]


def _role_cells(s: PlanSummary) -> list[list[str]]:
    total = sum(b for _, b in s.role_bytes) or 1
    return [[role, format_size(b), f"{100 * b / total:.1f}%"] for role, b in s.role_bytes]


TIER_HEADERS = ["tier", "peak", "budget", "of budget", "step", "op at peak", "/max-load", "/working-set"]
TENSOR_HEADERS = ["tensor", "role", "size", "module", "layer"]
ROLE_HEADERS = ["role", "bytes", "share"]
PASS_HEADERS = ["pass", "solver", "status", "objective", "bound", "gap", "time", "notes"]
BITS_HEADERS = ["weight", "format", "stored", "cost (nats)", "curvature"]


def _sections(s: PlanSummary) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of every table, in the order both renderers print them."""
    at = "" if s.device_step is None else f" (step {s.device_step})"
    shown = f"top {len(s.top_tensors)} of {s.live_tensor_count}"
    bits = [] if s.bits is None else [("Stored formats (bitwidth)", BITS_HEADERS, [list(r) for r in s.bits])]
    if s.schedule is not None:
        rows = [list(r) for r in s.schedule]
        bits.append(("Schedule (order and replacement)", ["quantity", "captured order", "this plan"], rows))
    return [
        ("Peak per tier", TIER_HEADERS, [_tier_cells(t) for t in s.tiers]),
        (
            f"Tensors live at the device peak{at}, {shown}",
            TENSOR_HEADERS,
            [_tensor_cells(t) for t in s.top_tensors],
        ),
        (f"Bytes by role at the device peak{at}", ROLE_HEADERS, _role_cells(s)),
        ("Passes", PASS_HEADERS, [_pass_cells(p) for p in s.passes]),
        ("Decisions", ["pass", "summary"], [[n, d] for n, d in s.decisions]),
        *bits,
    ]


# -- renderers ---------------------------------------------------------------------------------------


def summary_text(plan: Plan) -> str:
    """The summary as plain text: a header, then one aligned table per section, then the warnings."""
    s = summarize(plan)
    width = max(len(k) for k, _ in s.header)
    lines = [f"{k.ljust(width)}  {v}" for k, v in s.header]
    for title, headers, rows in _sections(s):
        lines += ["", f"{title}:"]
        lines += _text_table(headers, rows) if rows else ["  (none)"]
    lines += ["", f"Warnings ({len(s.warnings)}):"]
    lines += [f"  - {w}" for w in s.warnings] or ["  (none)"]
    return "\n".join(lines) + "\n"


def _text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render_summary(plan: Plan, console: Console) -> None:
    """The summary as rich tables on `console`."""
    s = summarize(plan)
    head = Table(show_header=False, box=None, title="memplan plan", title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    for k, v in s.header:
        head.add_row(k, Text(v))
    console.print(head)
    for title, headers, rows in _sections(s):
        table = Table(title=title, title_justify="left")
        for h in headers:
            table.add_column(h, overflow="fold")
        for r in rows:
            table.add_row(*(Text(c) for c in r))
        console.print(table if rows else f"{title}: (none)")
    if s.warnings:
        console.print(f"[yellow]Warnings ({len(s.warnings)}):[/yellow]")
        for w in s.warnings:
            console.print(f"  - {w}", markup=False)
    else:
        console.print("Warnings: (none)")
