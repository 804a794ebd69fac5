"""Which passes exist and the order the default pipeline runs them in."""

from __future__ import annotations

from memplan.passes.base import Pass


def default_pipeline() -> list[Pass]:
    """Passes in pipeline order. Only passes that are implemented are listed."""
    return []
