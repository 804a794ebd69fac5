"""The passes that exist, by name, and the order the default pipeline runs them in.

Each pass module defines its `PASS` (a `PassSpec`: function, options type with the pass's defaults,
requirements and guarantees); this module only lists them. The pipeline order is the architecture's:
schedule, bitwidth, kv_budget, remat_swap, placement, allocate, all built. `bitwidth` changes the model's
numbers (it quantizes weights), so it runs only when named (`OPT_IN`); so does `schedule`, which spends its
whole time limit (2 s) on most graphs for a peak 0.2% lower on average over bench/schedule's graphs: name
it (`--passes schedule,...`) where order matters. The default pipeline is every other pass. `kv_budget` is
lossy too, but does nothing unless given a budget (`--kv-budget`), which is asking for it.
"""

from __future__ import annotations

from memplan.errors import InvalidInput
from memplan.passes import allocate, bitwidth, kv_budget, placement, remat_swap, schedule
from memplan.passes.base import PassSpec

PASSES: dict[str, PassSpec] = {
    p.name: p
    for p in (schedule.PASS, bitwidth.PASS, kv_budget.PASS, remat_swap.PASS, placement.PASS, allocate.PASS)
}
"""Every built pass, in pipeline order."""

OPT_IN: frozenset[str] = frozenset({"bitwidth", "schedule"})
"""Passes left out of the default pipeline, run when named: lossy (bitwidth) or costly for what they gain
by default (schedule)."""


def default_pipeline() -> list[PassSpec]:
    """The passes that are not opt-in, in pipeline order."""
    return [p for p in PASSES.values() if p.name not in OPT_IN]


def passes_named(names: list[str]) -> list[PassSpec]:
    """The passes `names` lists (as `--passes bitwidth,allocate` gives them), in the order given."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise InvalidInput(
            f"unknown pass {', '.join(map(repr, unknown))}; the passes are {', '.join(PASSES)}"
        )
    return [PASSES[n] for n in names]
