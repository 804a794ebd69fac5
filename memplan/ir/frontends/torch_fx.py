"""Frontend: a `torch.fx.GraphModule` (from `symbolic_trace`, `make_fx` or a compiler pass) into the IR.

An ATen-level graph whose nodes already carry tensors in `meta["val"]` is lowered as it is. Any other
graph (e.g. `symbolic_trace` output, whose `call_module` nodes hide the ops inside each module, and which
carries no shapes) is first captured with `torch.export` on the example inputs, which inlines the modules
and lowers to core ATen; the FX module is an `nn.Module`, so this is the same path as an inference forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from memplan.ir.frontends.fx_lower import Capture, lower_fx
from memplan.ir.frontends.torch_export import capture_inference
from memplan.ir.graph import Role


def _is_aten_with_meta(gm: torch.fx.GraphModule) -> bool:
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    return all(n.op == "call_function" and "val" in n.meta for n in calls) and all(
        "val" in n.meta for n in gm.graph.nodes if n.op == "placeholder"
    )


def from_fx(
    gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], name: str | None = None
) -> Capture:
    """Lower `gm` into the IR (directly if it is ATen-level with metadata, else through torch.export)."""
    name = name or type(gm).__name__
    if not _is_aten_with_meta(gm):
        return capture_inference(gm, example_inputs, name=name)
    params = dict(gm.named_parameters())
    roles: dict[str, Role] = {}
    state: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            roles[node.name] = Role.PARAMETER if str(node.target) in params else Role.BUFFER
            state[node.name] = str(node.target)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_roles = [Role.OUTPUT] * len(torch.utils._pytree.tree_leaves(output.args))
    return lower_fx(gm, name, roles, state, out_roles)
