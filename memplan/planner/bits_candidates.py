"""The ways each weight of a model may be stored, for a joint bits-and-placement plan: per candidate
format its sensitivity cost and stored bytes (`memplan.passes.placement_joint.Candidate`).

The cost is the quantization error the format makes on that weight, ||W - dequantize(quantize(W))||^2
(the unweighted part of HAWQ's Omega = Tr(H)/n * ||dW||^2), optionally multiplied by a per-tensor weight
(a Hessian-trace or Fisher estimate). Formats the kernels cannot store for a tensor are skipped; every
tensor keeps its captured format as a candidate of cost 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from memplan.errors import InvalidInput
from memplan.ir.graph import Role
from memplan.kernels.quantize import dequantize, quantize
from memplan.kernels.scheme import UnsupportedBits
from memplan.passes.placement_joint import Candidate
from memplan.plans.decisions import TensorBits
from memplan.plans.plan import Plan

DEFAULT_FORMATS: tuple[tuple[str, int | None, str], ...] = (
    ("int8", None, "per-channel"),
    ("int4", 64, "per-group"),
    ("int2", 64, "per-group"),
)
"""(format, group size, scale layout) tried for every 2-D weight."""


def quantization_candidates(
    plan: Plan,
    model: torch.nn.Module,
    formats: Sequence[tuple[str, int | None, str]] = DEFAULT_FORMATS,
    weight: Mapping[str, float] | None = None,
) -> dict[int, tuple[Candidate, ...]]:
    """Value id -> candidates for every 2-D weight of `plan` (named as in `model`)."""
    params = dict(model.named_parameters())
    out: dict[int, tuple[Candidate, ...]] = {}
    for v in plan.tensors:
        if v.role != Role.PARAMETER or v.alias_of is not None or len(v.shape) != 2:
            continue
        if v.name not in params:
            raise InvalidInput(f"the plan's weight {v.name} is not a parameter of the model given")
        w = params[v.name].detach().float()
        scale = (weight or {}).get(v.name, 1.0)
        cands = [Candidate(None, 0.0, v.size_bytes)]
        for fmt, group, layout in formats:
            spec = TensorBits(v.id, fmt, group, True, layout)  # type: ignore[arg-type]
            try:
                err = float((w - dequantize(quantize(w, spec)).float()).pow(2).sum())
            except UnsupportedBits:
                continue
            cands.append(Candidate(spec, scale * err, spec.stored_bytes(v.shape)))
        out[v.id] = tuple(cands)
    return out
