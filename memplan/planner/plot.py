"""The memory timeline of a plan as a PNG: live bytes per tier over the schedule, stacked by role.

One subplot per tier that holds a storage at some step. Each storage's bytes count toward its own role
(residency is per storage root, so views never add bytes). The live bytes per role come from difference
arrays built with `np.bincount` over all intervals of a tier at once, so a plan with 50k+ intervals draws
in well under a second; schedules longer than `MAX_POINTS` steps are drawn at the step of the highest
total in each of `MAX_POINTS` bins, which keeps the peak. The tier's budget is a labelled horizontal line
(a text note when it lies far above the peak, so that the stack stays readable), the peak a marker.

Rendering uses matplotlib's Agg canvas directly (no pyplot global state); the file is written to a temporary
file in the same directory and renamed, so readers never see a partial PNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from memplan.files import atomic_write
from memplan.ir.graph import Role
from memplan.planner.report import ordered_tiers
from memplan.plans.plan import Plan
from memplan.units import format_size

MAX_POINTS = 4000
"""Most x positions drawn per tier; longer schedules are binned, keeping each bin's highest step."""
BUDGET_OFF_SCALE = 3.0
"""A budget above this many times the peak is written as a note instead of stretching the y axis."""

ROLES: tuple[Role, ...] = tuple(Role)
ROLE_COLORS: dict[Role, str] = {
    Role.PARAMETER: "#4c72b0",
    Role.BUFFER: "#8172b3",
    Role.GRADIENT: "#dd8452",
    Role.OPTIMIZER_STATE: "#937860",
    Role.ACTIVATION: "#55a868",
    Role.INPUT: "#8c8c8c",
    Role.OUTPUT: "#da8bc3",
    Role.KV_CACHE: "#c44e52",
    Role.WORKSPACE: "#ccb974",
}
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


@dataclass(frozen=True, slots=True)
class TierTimeline:
    """Live bytes of one tier, per role (rows follow `ROLES`) at every schedule step."""

    tier: str
    by_role: np.ndarray
    """int64 [len(ROLES), n_steps]."""

    @property
    def total(self) -> np.ndarray:
        out: np.ndarray = self.by_role.sum(axis=0)
        return out


def role_timelines(plan: Plan) -> list[TierTimeline]:
    """Live bytes per role per step for every tier in the residency, in memory-hierarchy order."""
    n = max([len(plan.ops), *(iv.end for iv in plan.residency)], default=0)
    role_of = {v.id: ROLES.index(v.role) for v in plan.tensors}
    cols = np.array(
        [(role_of[iv.value_id], iv.start, iv.end, iv.size_bytes) for iv in plan.residency], dtype=np.int64
    ).reshape(-1, 4)
    tiers = np.array([iv.tier for iv in plan.residency], dtype=object)
    out = []
    for tier in ordered_tiers(tiers.tolist()):
        role, start, end, size = cols[tiers == tier].T
        width = n + 1
        diff = np.bincount(role * width + start, weights=size, minlength=len(ROLES) * width)
        diff -= np.bincount(role * width + end, weights=size, minlength=len(ROLES) * width)
        live = np.cumsum(np.rint(diff).astype(np.int64).reshape(len(ROLES), width), axis=1)[:, :n]
        out.append(TierTimeline(tier, live))
    return out


def sample_steps(total: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Steps to draw: all of them, or the step of the highest total in each of `max_points` bins."""
    n = len(total)
    if n <= max_points:
        return np.arange(n)
    edges = np.linspace(0, n, max_points + 1).astype(np.int64)
    bins = zip(edges[:-1], edges[1:], strict=True)
    picks = [lo + int(np.argmax(total[lo:hi])) for lo, hi in bins if hi > lo]
    return np.array(picks, dtype=np.int64)


def _unit(max_bytes: float) -> tuple[str, int]:
    for name, scale in _UNITS:
        if max_bytes >= scale:
            return name, scale
    return "B", 1


def _draw_tier(ax: Axes, plan: Plan, tl: TierTimeline) -> None:
    total = tl.total
    n = len(total)
    peak_step = int(np.argmax(total)) if n else 0
    peak = int(total[peak_step]) if n else 0
    budget = plan.budget_bytes.get(tl.tier)
    on_scale = budget if budget is not None and budget <= BUDGET_OFF_SCALE * max(peak, 1) else None
    unit, scale = _unit(max(peak, on_scale or 0))
    xs = sample_steps(total)
    used = [i for i in range(len(ROLES)) if tl.by_role[i].any()]
    # step="post": step s covers [s, s + 1); repeat the last sample at x = n so the last step is drawn too.
    ys = [np.append(tl.by_role[i, xs], tl.by_role[i, -1]) / scale for i in used]
    ax.stackplot(
        np.append(xs, n),
        *ys,
        step="post",
        labels=[str(ROLES[i]) for i in used],
        colors=[ROLE_COLORS[ROLES[i]] for i in used],
        alpha=0.85,
    )
    _mark_peak(ax, plan, peak_step, peak, scale, n)
    top = _draw_budget(ax, budget, peak, scale) if budget is not None else 0.0
    ax.set_ylim(0, max(top, peak / scale * 1.2) or 1)
    ax.set_xlim(0, max(n, 1))
    ax.set_ylabel(f"live {unit}")
    over = budget is not None and peak > budget
    title = f"{tl.tier}: peak {format_size(peak)}"
    if budget is not None and over:
        title += f", over budget by {format_size(peak - budget)}"
    ax.set_title(title, loc="left", fontsize=10, color="#c44e52" if over else "black")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, title="role", title_fontsize=8)


def _draw_budget(ax: Axes, budget: int, peak: int, scale: int) -> float:
    """The budget as a labelled dashed line, or a note when far above the peak; returns the y it needs."""
    if budget > BUDGET_OFF_SCALE * max(peak, 1):
        note = f"budget {format_size(budget)} (off scale: {budget / max(peak, 1):.3g}x the peak)"
        ax.text(0.99, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=8, color="#c44e52")
        return 0.0
    ax.axhline(budget / scale, color="#c44e52", linestyle="--", linewidth=1.2)
    ax.annotate(
        f"budget {format_size(budget)}",
        (1, budget / scale),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(-4, 3),
        ha="right",
        fontsize=8,
        color="#c44e52",
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
    )
    return budget / scale * 1.1


def _mark_peak(ax: Axes, plan: Plan, step: int, peak: int, scale: int, n: int) -> None:
    """A marker in the middle of the peak step, labelled on the side with more room."""
    x, y = step + 0.5, peak / scale
    ax.plot([x], [y], marker="v", color="black", markersize=8, zorder=5)
    right_half = step > 0.6 * n
    label = f"peak {format_size(peak)} at step {step}{_op_at(plan, step)}"
    ax.annotate(
        label,
        (x, y),
        textcoords="offset points",
        xytext=(-6 if right_half else 6, 6),
        ha="right" if right_half else "left",
        fontsize=8,
    )


def _op_at(plan: Plan, step: int) -> str:
    ops = plan.graph().ops  # steps are positions in the plan's order
    return f" ({ops[step].name})" if 0 <= step < len(ops) else ""


def plot_timeline(plan: Plan, path: str) -> None:
    """Write the plan's memory timeline to `path` as a PNG, atomically (temp file, then rename)."""
    timelines = role_timelines(plan)
    fig = Figure(figsize=(12, 1.0 + 3.2 * max(len(timelines), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(timelines), 1), 1, squeeze=False, sharex=True)[:, 0]
    for ax, tl in zip(axes, timelines, strict=False):
        _draw_tier(ax, plan, tl)
    if not timelines:
        axes[0].text(0.5, 0.5, "no storage is resident on any tier", ha="center", va="center")
    axes[-1].set_xlabel("schedule step (op index)")
    w = plan.workload
    fig.suptitle(
        f"{plan.model.name}: {w.mode}, batch {w.batch}"
        f"{'' if w.seq is None else f', seq {w.seq}'} on {plan.hardware.name}"
    )
    _save_png(fig, path)


def _save_png(fig: Figure, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
