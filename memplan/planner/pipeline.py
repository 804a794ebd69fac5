"""The pass pipeline: baseline plan, then each pass in order, verified after each, then the budget check.

A failing pass is re-raised with its name and the passes before it. A budget that the final plan cannot
meet raises `InfeasibleBudget` naming the lower bound and the tensors that force it, never a silent plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from memplan.errors import InfeasibleBudget, InternalError, MemplanError
from memplan.ir.analysis import live_at, persistent_bytes
from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.passes.base import Pass
from memplan.planner.baseline import baseline_plan
from memplan.planner.plan import Plan, Workload
from memplan.planner.sizes import format_size
from memplan.planner.verify import verify_plan

Progress = Callable[[str], None]


def run_pipeline(
    graph: Graph,
    hardware: Hardware,
    workload: Workload,
    budget_bytes: int,
    source: str,
    passes: Sequence[Pass] = (),
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    check_every_pass: bool = True,
) -> Plan:
    """Plan `graph` on `hardware` for `workload` under a device budget of `budget_bytes`."""
    budgets = {t.name: t.capacity_bytes for t in hardware.tiers} | {"device": budget_bytes}
    plan = baseline_plan(graph, hardware, workload, budgets, source)
    done = ["baseline"]
    for p in passes:
        if progress:
            progress(f"pass {p.name}")
        try:
            out = p(graph, hardware, plan, (options or {}).get(p.name))
        except MemplanError:
            raise
        except Exception as e:
            raise InternalError(
                f"pass {p.name!r} failed (after {', '.join(done)}): {type(e).__name__}: {e}"
            ) from e
        plan = out.plan.with_(passes=(*out.plan.passes, out.report))
        done.append(p.name)
        if check_every_pass:
            _check(plan, p.name)
    check_budget(plan, graph)
    return plan


def _check(plan: Plan, after: str) -> None:
    report = verify_plan(plan)
    bad = [v for v in report.violations if v.kind != "over-capacity"]
    if bad:
        listed = "; ".join(f"{v.kind}: {v.message}" for v in bad[:5])
        raise InternalError(f"plan invalid after pass {after!r}: {listed}")


def check_budget(plan: Plan, graph: Graph, top: int = 8) -> None:
    """Raise `InfeasibleBudget` if the plan's device peak exceeds the budget, with the bound and tensors."""
    budget = plan.budget_bytes["device"]
    peak = plan.predictions.peak_bytes.get("device", 0)
    if peak <= budget:
        return
    step = plan.predictions.peak_step["device"]
    live = live_at(plan.residency, step, "device")
    names = [
        f"{graph.value(iv.value_id).name} ({graph.value(iv.value_id).role}, {format_size(iv.size_bytes)})"
        for iv in live[:top]
    ]
    ws = plan.predictions.working_set_bytes
    passes = ", ".join(p.name for p in plan.passes)
    op = graph.ops[step].name if graph.ops else "-"
    msg = (
        f"budget {format_size(budget)} is infeasible for {plan.model.name} ({plan.workload.mode}, batch "
        f"{plan.workload.batch}, seq {plan.workload.seq}): with the passes run ({passes}) the device peak is "
        f"{format_size(peak)} at step {step} ({op}), and the lower bound for this schedule with every tensor "
        "kept "
        f"on the device (max load) is {format_size(plan.predictions.max_load_bytes)}.\n"
        f"Tensors live at that step, largest first ({len(live)} in all): " + "; ".join(names) + ".\n"
        "Model state (parameters, buffers, optimizer state) alone is "
        f"{format_size(persistent_bytes(graph))}. "
        f"No plan of any kind can go below {format_size(ws)} (the largest single op's operands). "
        f"Raise the budget to at least {format_size(peak)}, or lower the batch or sequence length."
    )
    raise InfeasibleBudget(msg, peak, budget, names)
