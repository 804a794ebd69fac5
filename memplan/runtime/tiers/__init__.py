"""Memory tiers the runtime moves tensors through: host DRAM, CXL memory (a NUMA node), SSD files.

Every tier offers the same asynchronous `TierStore` API (`put`, `prefetch`, `get`, `free`, `flush`,
`stats`, `close`), built by `open_tier(hardware, name, emulate=...)`. `api.py` holds the handles,
counters and protocols, `store.py` the machinery all tiers share (workers, capacity, cleanup);
`host.py`, `cxl.py` (with `numa.py`) and `ssd.py` (with `direct_io.py`) what each tier is made
of; `tensor_bytes.py` the byte-exact conversions and the CUDA copies.
"""

from memplan.runtime.tiers.api import Backend, Handle, TierStats, TierStore
from memplan.runtime.tiers.errors import TierCorrupt, TierError, TierFull, TierIOError, TierUnavailable
from memplan.runtime.tiers.factory import EMULATABLE, mark_emulated, open_tier
from memplan.runtime.tiers.numa import NumaNode, numa_nodes
from memplan.runtime.tiers.ssd import SsdOptions
from memplan.runtime.tiers.store import AsyncTierStore

__all__ = [
    "EMULATABLE",
    "AsyncTierStore",
    "Backend",
    "Handle",
    "NumaNode",
    "SsdOptions",
    "TierCorrupt",
    "TierError",
    "TierFull",
    "TierIOError",
    "TierStats",
    "TierStore",
    "TierUnavailable",
    "mark_emulated",
    "numa_nodes",
    "open_tier",
]
