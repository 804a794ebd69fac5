"""What the torch mechanism installs for a plan (`eager.py` installs it): the model's repeated blocks, the
SAC table of each checkpointed block, the swaps of the others, and what the mechanism will not honour.

`prepare` checks that the plan fits the model (its blocks, parameters and buffers) and derives the
`Mechanism`; the tensors the plan swaps inside a checkpointed block are recomputed there (SAC cannot swap;
saving them would keep on the device what the plan sends away).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from memplan.errors import InvalidInput, PlanMismatch
from memplan.ir.frontends.fx_lower import layer_of
from memplan.ir.graph import Role
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan
from memplan.runtime.sac_policy import (
    SacTable,
    checkpoint_layers,
    occurrence_keys,
    sac_table,
)

SwapSpec = dict[tuple[str, int], list[int]]
"""(aten op, occurrence in the block's forward) -> positions, among the op's tensor outputs, to swap."""


@dataclass
class EagerInfo:
    """What the torch mechanism did (counters grow while the `applied` block runs)."""

    checkpointed: list[int]
    """Layers run under SAC."""
    swap_layers: list[int]
    """Layers whose swapped tensors go through `saved_tensors_hooks`."""
    tier: str | None
    sac: Counter[str] = field(default_factory=Counter)
    """SAC policy answers in forward: "save", "recompute", "unlisted" (an op the plan does not list)."""
    swapped_tensors: int = 0
    """Storages sent to the tier (one per storage per forward, however many saved views share it)."""
    swapped_bytes: int = 0
    loaded_tensors: int = 0
    """Storages read back from the tier in backward."""
    prefetched_tensors: int = 0
    held_on_device: int = 0
    """Swapped storages still held on the device by something else when backward needed them: used there,
    not read back (swapping them saved no device memory)."""
    missed_swaps: int = 0
    """Swapped outputs whose op the block's forward did not run as the plan lists it (not swapped)."""
    swaps_recomputed: list[str] = field(default_factory=list)
    """Plan tensors the plan swaps inside a checkpointed block: SAC recomputes them (it cannot swap)."""
    swaps_outside_blocks: list[str] = field(default_factory=list)
    """Plan tensors the plan swaps outside any repeated block: autograd saves them on the device."""
    predicted_peak_bytes: int | None = None
    """The step's device peak predicted at entry by a dry run on fake tensors (`eager_peak`)."""


@dataclass
class Mechanism:
    """What applying a plan to a model takes: its blocks, SAC tables, checkpointed layers, swaps."""

    blocks: list[tuple[str, torch.nn.Module]]
    table: SacTable
    checkpointed: set[int]
    specs: dict[int, SwapSpec]
    tier: str | None


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of the repeated blocks in layer order: modules whose path ends in a layer index
    (`layer_of` finds one) while their parent's does not."""
    found: dict[int, tuple[str, torch.nn.Module]] = {}
    for path, module in model.named_modules():
        index = layer_of(path)
        if index is None or layer_of(path.rpartition(".")[0]) is not None:
            continue
        if index in found:
            raise InvalidInput(
                f"memplan.applied(mechanism='torch'): two blocks claim layer {index} "
                f"({found[index][0]!r} and {path!r}); the plan's layer indices would be ambiguous"
            )
        found[index] = (path, module)
    return [found[i] for i in sorted(found)]


def check_state(plan: Plan, model: torch.nn.Module) -> None:
    """Refuse a model whose parameters and buffers (names, shapes, dtypes) differ from those the plan was
    made for: the half of the plan's fingerprint that needs no capture (the graph mechanism checks it all)."""
    planned = {
        (v.name, tuple(v.shape), v.dtype)
        for v in plan.graph().values
        if v.role in (Role.PARAMETER, Role.BUFFER)
    }
    state = [*model.named_parameters(), *model.named_buffers()]
    actual = {(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in state}
    if planned != actual:
        missing, extra = sorted(planned - actual)[:3], sorted(actual - planned)[:3]
        raise PlanMismatch(
            f"memplan.applied(mechanism='torch'): the model's parameters and buffers are not those the plan "
            f"was made for (in the plan only: {missing}; in the model only: {extra}); re-plan this model"
        )


def plan_layers(plan: Plan) -> list[int]:
    """The layer indices the plan's ops refer to, sorted."""
    return sorted({op.layer for op in plan.graph().ops if op.layer is not None})


def swap_specs(plan: Plan, checkpointed: set[int], info: EagerInfo) -> dict[int, SwapSpec]:
    """Layer -> the op outputs to swap there; swaps the mechanism cannot honour are noted in `info`."""
    graph = plan.graph()
    keys = occurrence_keys(graph)
    out: dict[int, SwapSpec] = {}
    for t in _tensors(plan):
        if t.decision != "swap":
            continue
        p = graph.producer(t.value_id)
        key = keys.get(p) if p is not None else None
        if key is None:
            info.swaps_outside_blocks.append(t.name)
            continue
        layer, target, occurrence = key
        if layer in checkpointed:
            info.swaps_recomputed.append(t.name)
            continue
        position = graph.ops[p].outputs.index(t.value_id)
        out.setdefault(layer, {}).setdefault((target, occurrence), []).append(position)
    return out


def recompute_swaps(plan: Plan, table: SacTable, checkpointed: set[int]) -> SacTable:
    """`table` with the ops whose outputs the plan swaps inside a checkpointed block set to "recompute":
    SAC cannot swap, and saving them would hold on the device what the plan sends away; recomputed, they
    leave the device after forward like the plan's swaps (at recompute's cost, not the link's)."""
    graph = plan.graph()
    keys = occurrence_keys(graph)
    out = {layer: dict(entries) for layer, entries in table.items()}
    for t in _tensors(plan):
        p = graph.producer(t.value_id) if t.decision == "swap" else None
        key = keys.get(p) if p is not None else None
        if key is not None and key[0] in checkpointed and key[1:] in out.get(key[0], {}):
            out[key[0]][key[1:]] = "recompute"
    return out


def _tensors(plan: Plan) -> tuple[TensorRemat, ...]:
    return plan.decisions.remat.tensors if plan.decisions.remat else ()


def prepare(plan: Plan, model: torch.nn.Module) -> tuple[Mechanism, EagerInfo]:
    """Check that the plan fits the model's blocks and state, and derive what to install (and a fresh
    `EagerInfo` saying what the mechanism will do)."""
    blocks = find_blocks(model)
    layers = plan_layers(plan)
    if layers != list(range(len(blocks))):
        paths = [p for p, _ in blocks]
        raise InvalidInput(
            f"memplan.applied(mechanism='torch'): the plan has {len(layers)} repeated layers "
            f"but the model has {len(blocks)} blocks at paths like '...h.<i>' or '...layers.<i>' "
            f"({paths[:4]}{' ...' if len(paths) > 4 else ''}); plan this model, or use mechanism='graph'"
        )
    check_state(plan, model)
    tier = plan.decisions.remat.tier if plan.decisions.remat else None
    checkpointed = set(checkpoint_layers(plan))
    info = EagerInfo(sorted(checkpointed), [], tier)
    specs = swap_specs(plan, checkpointed, info)
    info.swap_layers = sorted(specs)
    if specs and tier is None:
        raise InvalidInput("memplan.applied: the plan swaps tensors but names no tier to swap to")
    table = recompute_swaps(plan, sac_table(plan), checkpointed)
    return Mechanism(blocks, table, checkpointed, specs, tier), info
