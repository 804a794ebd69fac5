"""What several exporters read from a plan."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import InvalidInput
from memplan.plans.decisions import BitsDecision, RematDecision, TensorBits
from memplan.plans.plan import Plan


def remat_decision(plan: Plan, fmt: str) -> RematDecision:
    """The `remat_swap` decision record; a clear error for a plan without one."""
    remat = plan.decisions.remat
    if plan.workload.mode != "train" or remat is None:
        raise InvalidInput(
            f"plan of {plan.model.name} ({plan.workload.mode}) has no remat_swap decisions: the {fmt} "
            "export needs a training plan (memplan plan MODEL --mode train --budget ...)"
        )
    return remat


ZOO_PREFIX = "model."
"""The prefix a zoo model's single-forward capture gives every name (it wraps the model as `.model`); a
generation plan names the model's own parameters."""


@dataclass(frozen=True, slots=True)
class StoredWeight:
    """A weight of a plan's bits record: the fully qualified name of the module that multiplies by it (as
    the model itself names it) and its format."""

    module: str
    bits: TensorBits


def bits_decision(plan: Plan, fmt: str) -> BitsDecision:
    """The `bitwidth` decision record; a clear error for a plan without one."""
    if plan.decisions.bits is None:
        raise InvalidInput(
            f"plan of {plan.model.name} has no bits decision: the {fmt} export needs a plan made with the "
            "bitwidth pass (memplan plan MODEL --passes bitwidth,allocate --budget ...)"
        )
    return plan.decisions.bits


def stored_weights(plan: Plan, fmt: str) -> tuple[list[StoredWeight], list[str]]:
    """The quantized weights by module, and the modules whose weight the pass could quantize but kept."""
    bits = bits_decision(plan, fmt)
    names = {v.id: v.name for v in plan.tensors}
    strip = plan.model.source.startswith("zoo:") and plan.workload.gen == 0  # the capture's wrapper

    def module(vid: int) -> str:
        name = names[vid].removesuffix(".weight")
        return name.removeprefix(ZOO_PREFIX) if strip else name

    quantized = [StoredWeight(module(b.value_id), b) for b in bits.tensors]
    chosen = {b.value_id for b in bits.tensors}
    kept = [module(t.value_id) for t in bits.candidates if t.value_id not in chosen]
    return quantized, kept
