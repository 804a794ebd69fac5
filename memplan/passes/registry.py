"""The passes that exist, by name, and the order the default pipeline runs them in.

Each pass module defines its `PASS` (a `PassSpec`: function, options type with the pass's defaults,
requirements and guarantees); this module only lists them. The pipeline order is the architecture's:
schedule, bitwidth, kv_budget, remat_swap, placement, allocate — of which remat_swap, placement and allocate
are built.
"""

from __future__ import annotations

from memplan.errors import InvalidInput
from memplan.passes import allocate, placement, remat_swap
from memplan.passes.base import PassSpec

PASSES: dict[str, PassSpec] = {p.name: p for p in (remat_swap.PASS, placement.PASS, allocate.PASS)}
"""Every built pass, in pipeline order."""


def default_pipeline() -> list[PassSpec]:
    """Passes in pipeline order."""
    return list(PASSES.values())


def passes_named(names: list[str]) -> list[PassSpec]:
    """The passes `names` lists (as `--passes remat_swap,allocate` gives them), in the order given."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise InvalidInput(
            f"unknown pass {', '.join(map(repr, unknown))}; the built passes are {', '.join(PASSES)} "
            "(schedule, bitwidth and kv_budget are not built yet)"
        )
    return [PASSES[n] for n in names]
