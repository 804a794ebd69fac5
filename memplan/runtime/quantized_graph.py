"""Run a single-forward inference plan with quantized weights through its captured graph, under the tracker:
the schedule the plan priced, with every storage dropped after its last use, so the measured peak is the
predicted one (the eager model holds activations its own way; `memplan.applied` measures that).

The graph's ops read each weight as a tensor: `addmm(b, x, W)` for GPT-2's `Conv1D` (W [in, out]),
`mm(x, permute(W, [1, 0]))` or `linear(x, W, b)` for `nn.Linear` (W [out, in]). A quantized weight enters the
graph as a `Stored`: its stored module (`memplan.runtime.quantized`) and the orientation the graph sees it
in. Transposes flip the orientation; a matrix product by it calls the stored module (`memplan.kernels.linear`
for integer formats); any other op gets the float matrix, rebuilt by multiplying an identity (a transient,
as the reference path's dequantized copy is).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memplan.ir.frontends.fx_lower import Capture
from memplan.plans.plan import Plan
from memplan.runtime.quantized import CastLinear, QuantizedLinear, stored_module
from memplan.runtime.tracker import LiveStorageTracker, Measurement

aten = torch.ops.aten
FLIPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}
PRODUCTS = {aten.mm.default, aten.matmul.default}


@dataclass(frozen=True, slots=True)
class Stored:
    """A quantized weight in the graph: `in_out` when the graph sees the [in, out] matrix (`x @ it`)."""

    module: QuantizedLinear | CastLinear
    in_out: bool

    def matrix(self) -> torch.Tensor:
        """The float matrix it stands for, in the orientation the graph sees."""
        eye = torch.eye(self.module.in_features)
        out_in = self.module(eye).T  # rows of x @ W.T for x = I are the columns of W.T
        return out_in.T if self.in_out else out_in


def _flip(target: Any, args: Sequence[Any]) -> bool:
    """Whether a transposing op swaps the two dims of a matrix (`t`, `transpose(0, 1)`, `permute([1, 0])`)."""
    if target is aten.transpose.int:
        return {args[1] % 2, args[2] % 2} == {0, 1}
    if target is aten.permute.default:
        return [d % 2 for d in args[1]] == [1, 0]
    return True


def quantized_call(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The op on a `Stored` argument when it is a transpose or a product by it, else `NotImplemented`."""
    if args and isinstance(args[0], Stored) and target in FLIPS and _flip(target, args):
        return Stored(args[0].module, not args[0].in_out)
    if target is aten.alias.default and isinstance(args[0], Stored):
        return args[0]
    if target is aten._assert_tensor_metadata.default and isinstance(args[0], Stored):
        return None
    if target in PRODUCTS and isinstance(args[1], Stored) and args[1].in_out:
        return args[1].module(args[0])
    if target is aten.addmm.default and isinstance(args[2], Stored) and args[2].in_out and not kwargs:
        return args[2].module(args[1]) + args[0]
    if target is aten.linear.default and isinstance(args[1], Stored) and not args[1].in_out:
        y = args[1].module(args[0])
        return y if len(args) < 3 or args[2] is None else y + args[2]
    return NotImplemented


class _Interpreter(torch.fx.Interpreter):
    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = quantized_call(target, args, kwargs)
        if out is not NotImplemented:
            return out
        args = tuple(a.matrix() if isinstance(a, Stored) else a for a in args)
        return super().call_function(target, args, kwargs)


def bind(plan: Plan, cap: Capture, module: torch.nn.Module, inputs: Sequence[Any]) -> list[Any]:
    """Arguments for the captured graph: parameters and buffers by name, each quantized weight as a
    `Stored`, then the inputs."""
    bits = plan.decisions.bits
    chosen = {b.value_id: b for b in bits.tensors} if bits else {}
    state = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers())}
    user = iter(inputs)
    args: list[Any] = []
    for node in cap.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        vid = cap.node_values.get(node.name, (None,))[0]
        name = cap.param_names.get(vid) if vid is not None else None
        if vid in chosen and name is not None:
            spec = chosen[vid]
            args.append(Stored(stored_module(state[name], spec, None), spec.transposed))
        else:
            args.append(state[name] if name is not None else next(user))
    return args


def run_graph(cap: Capture, args: Sequence[Any]) -> Any:
    """The captured graph on `args` (from `bind`), each value dropped after its last use."""
    return _Interpreter(cap.gm).run(*args)


def run_quantized_inference(
    plan: Plan, cap: Capture, module: torch.nn.Module, inputs: Sequence[Any]
) -> Measurement:
    """Execute the captured forward with the plan's quantized weights, under the tracker (model state,
    stored weights and inputs counted as live from the start)."""
    args = bind(plan, cap, module, inputs)
    held = [t for a in args for t in (a.module.stored() if isinstance(a, Stored) else [a])]
    gc.collect()
    with torch.no_grad(), LiveStorageTracker() as tracker:
        tracker.track(held)
        out = run_graph(cap, args)
        del out
    return tracker.result
