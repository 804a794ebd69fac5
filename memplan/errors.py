"""The two error families: `MemplanError` for bad input (what, why, what to do) and `InternalError` for our
bugs."""

from __future__ import annotations


class MemplanError(Exception):
    """A problem with what the user gave us. The message says what is wrong and what to do."""


class InvalidInput(MemplanError):
    """A malformed argument, file or option (bad size string, unknown preset, bad CSV row...)."""


class InfeasibleBudget(MemplanError):
    """No plan can meet the budget; the message names the lower bound and the tensors that force it."""

    def __init__(
        self,
        message: str,
        lower_bound_bytes: int,
        budget_bytes: int,
        tensors: list[str],
        reachable_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.lower_bound_bytes = lower_bound_bytes
        """Proven: no plan of the passes run goes below it."""
        self.budget_bytes = budget_bytes
        self.tensors = tensors
        self.reachable_bytes = lower_bound_bytes if reachable_bytes is None else reachable_bytes
        """The lowest peak a plan was found for (a budget that works); equal to the bound when proved."""


class PlanMismatch(MemplanError):
    """A plan that does not belong to this model, schema version or hardware, or a corrupted plan file."""


class CaptureError(MemplanError):
    """The model could not be captured into the memory IR."""


class InternalError(Exception):
    """An invariant of memplan itself was broken: a bug, please report it."""


def internal_assert(cond: bool, message: str) -> None:
    """Check one of our own invariants (never user input)."""
    if not cond:
        raise InternalError(message)
