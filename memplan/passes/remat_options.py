"""The options of the `remat_swap` pass: every technique it may use is a switch (benchmarks turn each off)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RematSwapOptions:
    """Switches for benchmarks and ablations; defaults are what `memplan plan` uses."""

    time_limit_s: float = 30.0
    mip_rel_gap: float = 1e-3
    allow_swap: bool = True
    allow_recompute: bool = True
    allow_split: bool = True
    """Allow splitting a tensor by rows between swap and recompute (needs both allowed)."""
    allow_blocks: bool = True
    """Allow re-running a whole layer's forward once to rebuild its activations (needs recompute allowed)."""
    checkpoint_blocks: bool = False
    """Checkpoint every block that can be (as `torch.utils.checkpoint` per block), deciding only the rest."""
    swap_tier: str | None = None
    """Tier to swap to; None: the fastest tier after the device that the hardware has."""
    per_layer: bool | None = None
    """Share decisions across repeated layers; None: only when there are more than `exact_limit`
    candidates."""
    exact_limit: int = 600
