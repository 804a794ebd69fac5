"""The CXL tier: tensors swapped into CXL-attached memory, which Linux shows as a NUMA node.

The hardware's `cxl` tier names its node (`numa_node`); each tensor gets a buffer bound to that node
(`numa.numa_allocator`: libnuma, else `mbind`) and copies work as for the host tier (`MemoryBackend`).
If the node does not exist, `open_cxl` refuses, naming the nodes that do, and suggests `--emulate cxl`.

Emulation (`emulate=True`, or `"cxl"` in `Hardware.emulated`) backs the tier with ordinary host memory,
so plans that use CXL can be run and checked on any machine. An emulated store says so everywhere it
reports: `TierStats.emulated` is true and its backend description says "emulated"; `mark_emulated` (in
the factory) records it in the `Hardware` a report prints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memplan.ir.hardware import Hardware, Tier
from memplan.runtime.tiers.errors import TierUnavailable
from memplan.runtime.tiers.host import HostAllocator, MemoryBackend
from memplan.runtime.tiers.numa import NumaNode, numa_allocator, numa_nodes
from memplan.runtime.tiers.store import AsyncTierStore


def open_cxl(
    hardware: Hardware,
    *,
    emulate: bool = False,
    workers: int = 2,
    nodes: Sequence[NumaNode] | None = None,
) -> AsyncTierStore[torch.Tensor]:
    """A store on the hardware's `cxl` tier (`nodes`: this machine's NUMA nodes, read from sysfs if None)."""
    tier = hardware.tier("cxl")
    if emulate or "cxl" in hardware.emulated:
        allocator = HostAllocator("host memory emulating CXL (emulated)")
        backend = MemoryBackend(allocator, emulated=True)
    else:
        node = cxl_node(tier, numa_nodes() if nodes is None else nodes)
        backend = MemoryBackend(numa_allocator(node.id))
    return AsyncTierStore("cxl", backend, tier.capacity_bytes, workers=workers)


def cxl_node(tier: Tier, nodes: Sequence[NumaNode]) -> NumaNode:
    """The NUMA node the CXL tier names, or a `TierUnavailable` saying which nodes exist."""
    have = ", ".join(n.describe() for n in nodes) or "none: this machine reports no NUMA nodes"
    if tier.numa_node is None:
        raise TierUnavailable(
            "the 'cxl' tier names no numa_node: set it to the node of the CXL memory (usually a "
            f"memory-only node; this machine has {have}), or run with --emulate cxl"
        )
    for node in nodes:
        if node.id == tier.numa_node:
            return node
    raise TierUnavailable(
        f"the 'cxl' tier is on NUMA node {tier.numa_node}, which does not exist on this machine (it has "
        f"{have}); set numa_node to one of those, or run with --emulate cxl to back the tier with host memory"
    )
