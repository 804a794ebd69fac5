"""Prediction against reality: a plan's predicted device peak and time next to what a run measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from memplan.plans.plan import Plan
from memplan.units import format_size


class Measured(Protocol):
    """What a run measured (see `memplan.runtime.tracker.Measurement`)."""

    peak_bytes: int
    wall_s: float


@dataclass(frozen=True, slots=True)
class Comparison:
    """Predicted vs measured device peak (bytes) and step time (s), with the budget they answer to."""

    predicted_peak_bytes: int
    measured_peak_bytes: int
    budget_bytes: int
    predicted_time_s: float
    measured_time_s: float

    @property
    def peak_error(self) -> float:
        """(predicted - measured) / measured: negative when the plan under-predicts."""
        return (self.predicted_peak_bytes - self.measured_peak_bytes) / max(self.measured_peak_bytes, 1)

    @property
    def within_budget(self) -> bool:
        return self.measured_peak_bytes <= self.budget_bytes

    def describe(self) -> str:
        verdict = "within" if self.within_budget else "OVER"
        return (
            f"device peak: predicted {format_size(self.predicted_peak_bytes)}, measured "
            f"{format_size(self.measured_peak_bytes)} ({self.peak_error:+.2%}); {verdict} the budget of "
            f"{format_size(self.budget_bytes)}. Step time: measured {self.measured_time_s:.3f} s "
            f"(roofline prediction on the plan's hardware: {self.predicted_time_s:.4f} s)."
        )


def compare(plan: Plan, measured: Measured) -> Comparison:
    """Line up the plan's predictions with a measurement of the same step."""
    return Comparison(
        predicted_peak_bytes=plan.predictions.peak_bytes.get("device", 0),
        measured_peak_bytes=measured.peak_bytes,
        budget_bytes=plan.budget_bytes["device"],
        predicted_time_s=plan.predictions.time_s,
        measured_time_s=measured.wall_s,
    )
