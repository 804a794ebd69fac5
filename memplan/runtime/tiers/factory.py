"""Open the store of one memory tier of a `Hardware`, emulating the tiers the user asked to emulate.

`open_tier(hw, "ssd")` is what the executor calls for each tier a plan uses. `emulate` names tiers to
back with something else than they claim (today: `cxl`, with host memory), as `--emulate cxl` does on
the command line; `mark_emulated` records the same set in the `Hardware`, so that every report built
from it says which tiers were not real.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import replace

from memplan.ir.hardware import TIER_ORDER, Hardware
from memplan.runtime.tiers.api import TierStore
from memplan.runtime.tiers.cxl import open_cxl
from memplan.runtime.tiers.errors import TierError
from memplan.runtime.tiers.host import open_host
from memplan.runtime.tiers.ssd import DEFAULT_SSD_OPTIONS, SsdOptions, open_ssd

EMULATABLE: frozenset[str] = frozenset({"cxl"})
"""Tiers that can be emulated."""


def open_tier(
    hardware: Hardware,
    tier: str,
    *,
    emulate: Set[str] = frozenset(),
    workers: int = 2,
    ssd: SsdOptions = DEFAULT_SSD_OPTIONS,
) -> TierStore:
    """The store of `hardware`'s tier `tier` (`host`, `cxl` or `ssd`); close it, or use it in `with`."""
    unknown = set(emulate) - EMULATABLE
    if unknown:
        raise TierError(f"cannot emulate {sorted(unknown)}: only {sorted(EMULATABLE)} can be emulated")
    if tier == "host":
        return open_host(hardware, workers=workers)
    if tier == "cxl":
        return open_cxl(hardware, emulate="cxl" in emulate, workers=workers)
    if tier == "ssd":
        return open_ssd(hardware, options=ssd, workers=workers)
    if tier == "device":
        raise TierError("the device tier is where tensors are computed on: swap to 'host', 'cxl' or 'ssd'")
    raise TierError(f"unknown tier {tier!r}: tiers are {', '.join(TIER_ORDER)}")


def mark_emulated(hardware: Hardware, emulate: Set[str]) -> Hardware:
    """`hardware` with the tiers in `emulate` added to its `emulated` list (in tier order)."""
    names = set(hardware.emulated) | set(emulate)
    return replace(hardware, emulated=tuple(t for t in TIER_ORDER if t in names))
