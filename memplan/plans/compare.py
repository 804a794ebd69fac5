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


class GenerationMeasured(Protocol):
    """What a planned generation measured (see `memplan.runtime.generation.GenerationMeasurement`)."""

    peak_bytes: int
    prefill_s: float
    bytes_read: dict[str, int]
    io_wait_s: float
    tier_peak_bytes: dict[str, int]
    kv_peak_bytes: int | None

    @property
    def decode_per_token_s(self) -> float: ...

    @property
    def io_hidden_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class GenerationComparison:
    """A generation's predicted vs measured device peak, prefill and decode speed, and bytes read per tier."""

    predicted_peak_bytes: int
    measured_peak_bytes: int
    budget_bytes: int
    batch: int
    prompt: int
    predicted_prefill_s: float
    measured_prefill_s: float
    predicted_decode_s: float
    measured_decode_s: float
    predicted_read_bytes: dict[str, int]
    measured_read_bytes: dict[str, int]
    io_hidden_s: float
    io_exposed_s: float
    tier_peaks: dict[str, tuple[int, int, int]]
    """Other tiers: (predicted, measured, budget) peak bytes."""
    kv: tuple[int, int, int] | None = None
    """With KV budgets: (planned, measured, budget) KV cache bytes (measured: the compressed cache's
    storages at their most)."""

    @property
    def within_budget(self) -> bool:
        """The device, every other tier and the KV budget held."""
        others = all(m <= b for _, m, b in self.tier_peaks.values())
        kv = self.kv is None or self.kv[1] <= self.kv[2]
        return self.measured_peak_bytes <= self.budget_bytes and others and kv

    def tok_s(self, which: str, measured: bool) -> float:
        """Tokens per second of the prefill or of decoding (one token per sequence per forward)."""
        if which == "prefill":
            s = self.measured_prefill_s if measured else self.predicted_prefill_s
            return self.batch * self.prompt / s if s else 0.0
        s = self.measured_decode_s if measured else self.predicted_decode_s
        return self.batch / s if s else 0.0

    def describe(self) -> str:
        verdict = "within" if self.within_budget else "OVER"
        err = (self.predicted_peak_bytes - self.measured_peak_bytes) / max(self.measured_peak_bytes, 1)
        tiers = sorted(set(self.predicted_read_bytes) | set(self.measured_read_bytes))
        reads = "; ".join(
            f"{t} predicted {format_size(self.predicted_read_bytes.get(t, 0))}, measured "
            f"{format_size(self.measured_read_bytes.get(t, 0))}"
            for t in tiers
        )
        tier_text = "".join(
            f" {t} peak: predicted {format_size(p)}, measured {format_size(m)} (budget {format_size(b)})."
            for t, (p, m, b) in sorted(self.tier_peaks.items())
        )
        if self.kv is not None:
            planned, held, budget = self.kv
            tier_text += (
                f" KV cache: planned {format_size(planned)}, measured {format_size(held)} (budget "
                f"{format_size(budget)})."
            )
        return (
            f"device peak: predicted {format_size(self.predicted_peak_bytes)}, measured "
            f"{format_size(self.measured_peak_bytes)} ({err:+.2%}); {verdict} the budget of "
            f"{format_size(self.budget_bytes)}.{tier_text}\n"
            f"prefill: predicted {self.tok_s('prefill', False):.1f} tok/s, measured "
            f"{self.tok_s('prefill', True):.1f} tok/s; decode: predicted {self.tok_s('decode', False):.2f} "
            f"tok/s, measured {self.tok_s('decode', True):.2f} tok/s (batch {self.batch}).\n"
            f"bytes read: {reads or 'none'}; I/O hidden behind compute {self.io_hidden_s:.3f} s, exposed "
            f"(waited for) {self.io_exposed_s:.3f} s."
        )


def compare_generation(plan: Plan, measured: GenerationMeasured) -> GenerationComparison:
    """Line up a generation plan's predictions (its events) with a measured generation."""
    from memplan.plans.effective import generation_times

    graph = plan.graph()
    prefill, decode = generation_times(graph, plan.events)
    reads: dict[str, int] = {}
    for e in plan.events:
        if e.kind == "prefetch" and e.src_tier and e.duration_s > 0 and e.value_id is not None:
            reads[e.src_tier] = reads.get(e.src_tier, 0) + graph.value(e.value_id).size_bytes
    return GenerationComparison(
        predicted_peak_bytes=plan.predictions.peak_bytes.get("device", 0),
        measured_peak_bytes=measured.peak_bytes,
        budget_bytes=plan.budget_bytes["device"],
        batch=plan.workload.batch,
        prompt=plan.workload.seq or 0,
        predicted_prefill_s=prefill,
        measured_prefill_s=measured.prefill_s,
        predicted_decode_s=decode,
        measured_decode_s=measured.decode_per_token_s,
        predicted_read_bytes=reads,
        measured_read_bytes=dict(measured.bytes_read),
        io_hidden_s=measured.io_hidden_s,
        io_exposed_s=measured.io_wait_s,
        tier_peaks={
            t: (plan.predictions.peak_bytes.get(t, 0), m, plan.budget_bytes.get(t, 0))
            for t, m in measured.tier_peak_bytes.items()
        },
        kv=(plan.decisions.kv.planned_bytes, measured.kv_peak_bytes, plan.decisions.kv.budget_bytes)
        if plan.decisions.kv is not None and measured.kv_peak_bytes is not None
        else None,
    )
