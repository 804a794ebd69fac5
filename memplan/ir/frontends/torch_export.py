"""Frontend: an inference forward captured with `torch.export`, lowered to core ATen, into the memory IR.

Works on real, fake or meta-device models (a meta model allocates nothing, so a 70B-shaped model can be
captured on a laptop). The graph signature says which placeholders are parameters, buffers and inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from memplan.errors import CaptureError
from memplan.ir.frontends.fx_lower import Capture, lower_fx, tied_state
from memplan.ir.graph import Role

_INPUT_ROLES = {
    InputKind.PARAMETER: Role.PARAMETER,
    InputKind.BUFFER: Role.BUFFER,
    InputKind.CONSTANT_TENSOR: Role.BUFFER,
    InputKind.USER_INPUT: Role.INPUT,
}


def export_program(model: torch.nn.Module, example_inputs: Sequence[Any]) -> ExportedProgram:
    """`torch.export` the model's forward on `example_inputs` and decompose it to core ATen."""
    try:
        ep = torch.export.export(model, tuple(example_inputs), strict=False)
        return ep.run_decompositions()
    except Exception as e:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {str(e)[:500]}\n"
            "Check that the forward runs on the example inputs and has no data-dependent Python control "
            "flow; "
            "or pass an ONNX file instead."
        ) from e


def from_exported(ep: ExportedProgram, name: str, state_ties: dict[str, str] | None = None) -> Capture:
    """Lower an exported program (already decomposed) into the IR. `state_ties` (from `tied_state`) maps a
    parameter name to the earlier name of the same tensor, so tied weights are counted once."""
    roles: dict[str, Role] = {}
    state: dict[str, str] = {}
    for spec in ep.graph_signature.input_specs:
        arg_name = getattr(spec.arg, "name", None)
        if arg_name is None:
            continue
        roles[arg_name] = _INPUT_ROLES.get(spec.kind, Role.INPUT)
        if spec.target is not None:
            state[arg_name] = spec.target
    out_roles = [
        Role.OUTPUT if s.kind == OutputKind.USER_OUTPUT else None for s in ep.graph_signature.output_specs
    ]
    by_target = {t: n for n, t in state.items()}
    ties = {
        by_target[a]: by_target[b] for a, b in (state_ties or {}).items() if a in by_target and b in by_target
    }
    return lower_fx(ep.graph_module, name, roles, state, out_roles, ties)


def capture_inference(
    model: torch.nn.Module, example_inputs: Sequence[Any], name: str | None = None
) -> Capture:
    """Capture one inference forward of `model` on `example_inputs` (no autograd) into the IR."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = export_program(model, example_inputs)
    finally:
        model.train(was_training)
    return from_exported(ep, name or type(model).__name__, tied_state(model))
