"""The pass manager: baseline plan, then each pass in order, checked before and after each, then the budgets.

Before a pass: the decisions it `requires` are made, the ones it must come `before` are not, and its
options are of its own options type. After it: no tier but the device is over its budget (passes only add
to those, so an excess cannot be undone later: `InfeasibleBudget` at once), `verify_plan` finds nothing
wrong (uses after defs, offsets, arrivals, decision consistency), and every guarantee the pass `ensures`
holds (the device within its budget; every storage with an offset). A failing pass is
re-raised naming it and the passes before it. At the end every tier's peak must be within its budget,
else `InfeasibleBudget` names the tier, the lower bound and the tensors that force it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from memplan.errors import InfeasibleBudget, InternalError, InvalidInput, MemplanError
from memplan.ir.analysis import live_at, persistent_bytes
from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.passes.base import PassSpec, workload_kind
from memplan.passes.baseline import baseline_plan
from memplan.plans.plan import Plan, Workload
from memplan.plans.verify import missing_offsets, verify_plan
from memplan.units import format_size

Progress = Callable[[str], None]


def run_pipeline(
    graph: Graph,
    hardware: Hardware,
    workload: Workload,
    budget_bytes: int | Mapping[str, int],
    source: str,
    passes: Sequence[PassSpec] = (),
    options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    check_every_pass: bool = True,
) -> Plan:
    """Plan `graph` on `hardware` for `workload` under `budget_bytes` (tier -> peak bytes, or an int: the
    device's; a tier not named is held to its capacity)."""
    given = {"device": budget_bytes} if isinstance(budget_bytes, int) else budget_bytes
    budgets = _budgets(hardware, given)
    opts = dict(options or {})
    unknown = sorted(set(opts) - {p.name for p in passes})
    if unknown:
        raise InvalidInput(f"options given for passes not in the pipeline: {', '.join(unknown)}")
    plan = baseline_plan(graph, hardware, workload, budgets, source)
    done = ["baseline"]
    for spec in passes:
        if workload_kind(workload.mode, workload.gen) not in spec.modes:
            continue
        if progress:
            progress(f"pass {spec.name}")
        plan = _run_one(spec, plan, hardware, opts.get(spec.name), done, check_every_pass)
        done.append(spec.name)
    check_budgets(plan)
    return plan


def _budgets(hardware: Hardware, given: Mapping[str, int]) -> dict[str, int]:
    for tier, n in given.items():
        if not hardware.has_tier(tier):
            names = ", ".join(t.name for t in hardware.tiers)
            raise InvalidInput(f"budget for tier {tier!r}, which {hardware.name} lacks (it has: {names})")
        if n <= 0:
            raise InvalidInput(f"the {tier} budget must be a positive size, e.g. 16GiB (got {n})")
    return {t.name: t.capacity_bytes for t in hardware.tiers} | dict(given)


def _run_one(
    spec: PassSpec, plan: Plan, hardware: Hardware, options: Any, done: list[str], check: bool
) -> Plan:
    made = plan.decisions.made()
    missing, early = spec.requires - made, spec.before & made
    if missing or early:
        why = f"needs {', '.join(sorted(missing))} decided first" if missing else ""
        why += f"{'; ' if why else ''}must run before {', '.join(sorted(early))} is decided" if early else ""
        raise InvalidInput(f"pass {spec.name!r} cannot run after {', '.join(done)}: it {why}")
    if options is not None and not isinstance(options, spec.options):
        raise InvalidInput(
            f"options for pass {spec.name!r} must be a {spec.options.__name__}, got {type(options).__name__}"
        )
    try:
        out = spec.run(plan.graph(), hardware, plan, options if options is not None else spec.options())
    except MemplanError:
        raise
    except Exception as e:
        raise InternalError(
            f"pass {spec.name!r} failed (after {', '.join(done)}): {type(e).__name__}: {e}"
        ) from e
    new = out.plan.with_(passes=(*out.plan.passes, out.report))
    if check:
        check_after(new, spec)
    return new


def check_after(plan: Plan, spec: PassSpec) -> None:
    """The checks the manager runs after `spec` (see the module docstring)."""
    others = [t for t in plan.budget_bytes if t != "device"]
    check_budgets(plan, tiers=[*others, "device"] if "device-budget" in spec.ensures else others)
    report = verify_plan(plan)
    bad = [v for v in report.violations if v.kind != "over-capacity"]  # budgets: just checked
    if "offsets" in spec.ensures:
        bad += missing_offsets(plan, every_tier=True)
    if bad:
        listed = "; ".join(f"{v.kind}: {v.message}" for v in bad[:5])
        raise InternalError(f"plan invalid after pass {spec.name!r}: {listed}")


def check_budgets(plan: Plan, tiers: Sequence[str] | None = None, top: int = 8) -> None:
    """Raise `InfeasibleBudget` if a tier's predicted peak exceeds its budget (all tiers, or `tiers`), with
    the bound and the tensors live at the peak."""
    for tier, budget in plan.budget_bytes.items():
        if tiers is not None and tier not in tiers:
            continue
        peak = plan.predictions.peak_bytes.get(tier, 0)
        if peak > budget:
            raise _infeasible(plan, tier, budget, peak, top)


def _infeasible(plan: Plan, tier: str, budget: int, peak: int, top: int) -> InfeasibleBudget:
    graph = plan.graph()
    step = plan.predictions.peak_step[tier]
    live = live_at(plan.residency, step, tier)
    names = [
        f"{graph.value(iv.value_id).name} ({graph.value(iv.value_id).role}, {format_size(iv.size_bytes)})"
        for iv in live[:top]
    ]
    passes = ", ".join(p.name for p in plan.passes)
    op = graph.ops[step].name if graph.ops else "-"
    head = (
        f"{tier} budget {format_size(budget)} is infeasible for {plan.model.name} ({plan.workload.mode}, "
        f"batch {plan.workload.batch}, seq {plan.workload.seq}): with the passes run ({passes}) the {tier} "
        f"peak is {format_size(peak)} at step {step} ({op})"
    )
    tensors = (
        f"Tensors live there at that step, largest first ({len(live)} in all): " + "; ".join(names) + "."
    )
    if tier != "device":
        msg = f"{head}.\n{tensors}\nRaise the {tier} budget to at least {format_size(peak)}."
        return InfeasibleBudget(msg, peak, budget, names)
    msg = (
        f"{head}, and the lower bound for this schedule with every tensor kept on the device (max load) is "
        f"{format_size(plan.predictions.max_load_bytes)}.\n{tensors}\n"
        "Model state (parameters, buffers, optimizer state) alone is "
        f"{format_size(persistent_bytes(graph))}. "
        f"No plan of any kind can go below {format_size(plan.predictions.working_set_bytes)} (the largest "
        f"single op's operands). Raise the budget to at least {format_size(peak)}, or lower the batch or "
        "sequence length."
    )
    return InfeasibleBudget(msg, peak, budget, names)
