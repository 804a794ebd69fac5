"""Which passes exist and the order the default pipeline runs them in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memplan.ir.graph import Graph
from memplan.ir.hardware import Hardware
from memplan.passes import allocate, remat_swap
from memplan.passes.base import Pass, PassOutput
from memplan.planner.plan import Plan


@dataclass(frozen=True)
class RematSwap:
    """The `remat_swap` pass (keep / swap / recompute saved activations); training plans only."""

    name: str = "remat_swap"

    def __call__(self, graph: Graph, hardware: Hardware, plan: Plan, options: Any) -> PassOutput:
        return remat_swap.run(graph, hardware, plan, options)


@dataclass(frozen=True)
class Allocate:
    """The `allocate` pass (offsets of every storage in its tier's arena), last: it packs what the others
    decided."""

    name: str = "allocate"

    def __call__(self, graph: Graph, hardware: Hardware, plan: Plan, options: Any) -> PassOutput:
        return allocate.run(graph, hardware, plan, options or allocate.AllocateOptions(timeout_s=5.0))


def default_pipeline() -> list[Pass]:
    """Passes in pipeline order. Only passes that are implemented are listed."""
    return [RematSwap(), Allocate()]
