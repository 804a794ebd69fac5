"""Run a model with its weights stored as a plan's bits record says: each `nn.Linear` or GPT-2 `Conv1D` whose
weight the bitwidth pass gave a format is replaced by a module that multiplies by the stored weight.

    plan = memplan.plan("zoo:tiny-lm", mode="infer", passes=["bitwidth", "allocate"], budget="4MiB")
    with memplan.applied(plan, model) as run:          # the float model; restored on exit
        logits = model(ids).logits
    run.measured().peak_bytes                          # live tensor bytes over the block

    quantize_model(plan, model, weights="model.safetensors")   # for good: float weights never kept

`QuantizedLinear` holds an integer weight as `memplan.kernels.linear` wants it (`prepare_linear`), on the
faster CPU path (bench/results/bitwidth_kernels.md): an int8 symmetric per-channel weight only in PyTorch's
int8 kernel layout, which a call of up to `NATIVE_MAX_ROWS` rows multiplies by and a larger one dequantizes
by row blocks; every other integer weight (int4 included: PyTorch's int4 kernel is faster at one row only)
as its packed codes and scales, on the reference path (dequantize by row blocks, then matmul).
`CastLinear` holds an fp16 or bf16 weight, cast to the activations' dtype per call (a transient too). A
`Conv1D` weight ([in, out], `TensorBits.transposed`) is stored as the [out, in] matrix both multiply by.

Tolerance (checked by tests/runtime/test_quantized.py): the quantized model's outputs equal those of the
float model whose weights are replaced by `dequantize(quantize(W))` (the reference) within the kernels'
per-layer `TOLERANCES` compounded over the layers: max |difference| <= 1e-4 x max |reference output| for fp32
activations. How far either is from the float model is the quantization's doing, priced by the sensitivity.

The float weights come from the module itself (random init or a checkpoint already loaded), or from
`weights`: a mapping or a `safetensors` file, read one tensor at a time, so a model built on the meta
device is materialised without its float weights ever being held all at once. Names may carry the zoo's
`model.` capture prefix or not. What the live-storage tracker of `applied` counts: the model's state as
quantized (the converted kernel weights: their fp32 scales make them a little larger than the plan's
`stored_bytes`, see `QuantizedRun.held_bytes`) and everything the block computes, as the eager model
computes it; the float weights put aside to give back on exit are not the model's and are not counted.
`memplan run` measures a single-forward plan through its captured graph instead
(`memplan.runtime.quantized_graph`): the schedule the plan priced.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from memplan.errors import InvalidInput, PlanMismatch
from memplan.ir.graph import Role
from memplan.kernels.linear import PreparedLinear, linear, prepare_linear
from memplan.kernels.quantize import QuantizedWeight, quantize
from memplan.plans.decisions import TensorBits
from memplan.plans.plan import Plan
from memplan.runtime.tracker import LiveStorageTracker, Measurement

CAST_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ZOO_PREFIX = "model."
"""The prefix the zoo's inference capture gives every parameter name (it wraps the model as `.model`)."""

Weights = Mapping[str, torch.Tensor] | str | os.PathLike[str] | None


class QuantizedLinear(nn.Module):
    """`y = x @ dequantize(W).T + b` through `memplan.kernels.linear`, for an integer-format weight."""

    def __init__(self, prepared: PreparedLinear, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.prepared = prepared
        self.bias = bias
        self.out_features, self.in_features = prepared.q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.prepared)
        return y if self.bias is None else y + self.bias

    def stored(self) -> list[torch.Tensor]:
        """The tensors that hold the weight."""
        q, native = self.prepared.q, self.prepared.native
        held = [q.payload, q.scales] + ([] if q.zeros is None else [q.zeros])
        return [t for t in held if t.numel()] + ([native.weight, native.scales] if native else [])

    def parts(self) -> list[torch.Tensor]:
        """The stored form (codes, scales, zero points when asymmetric): `TensorBits.stored_bytes` in all;
        a module made for streaming (`native=False`) holds only these."""
        q = self.prepared.q
        return [q.payload, q.scales] + ([] if q.zeros is None else [q.zeros])

    def hold(self, parts: list[torch.Tensor]) -> None:
        """Hold `parts` (shaped as `parts()`) as the stored form; empty tensors release it."""
        q = self.prepared.q
        zeros = parts[2] if q.zeros is not None else None
        self.prepared = PreparedLinear(replace(q, payload=parts[0], scales=parts[1], zeros=zeros), None,
                                       "reference")  # fmt: skip


class CastLinear(nn.Module):
    """`y = x @ W.T + b` for a weight stored in fp16 or bf16 ([out, in]), cast to x's dtype per call."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def stored(self) -> list[torch.Tensor]:
        return [self.weight]

    def parts(self) -> list[torch.Tensor]:
        return [self.weight]

    def hold(self, parts: list[torch.Tensor]) -> None:
        self.weight = parts[0]


def stored_module(
    weight: torch.Tensor, spec: TensorBits, bias: nn.Parameter | None, native: bool = True
) -> QuantizedLinear | CastLinear:
    """The module that stores `weight` (as the model holds it) in `spec`'s format; `native` False keeps
    the stored form even where a PyTorch CPU kernel would take the weight (a weight that is streamed)."""
    matrix = weight.detach().T if spec.transposed else weight.detach()  # [out, in]
    if spec.format in CAST_DTYPES:
        return CastLinear(matrix.to(CAST_DTYPES[spec.format]).contiguous(), bias)
    q = quantize(matrix, spec)
    prepared = prepare_linear(q) if native else PreparedLinear(q, None, "reference")
    if prepared.native is not None and prepared.native.kind == "int4pack":
        # PyTorch's int4 kernel beats the reference at one row only (NATIVE_MAX_ROWS); the codes stay
        prepared = PreparedLinear(q, None, "reference")
    elif prepared.native is not None:  # int8: keep the kernel's layout only; each call picks its path
        empty = torch.empty(0, dtype=torch.uint8)
        bare = QuantizedWeight(empty, empty.to(q.scales.dtype), None, q.shape, q.spec)
        prepared = PreparedLinear(bare, prepared.native, None)
    return QuantizedLinear(prepared, bias)


@dataclass
class QuantizedRun:
    """What `quantize_model` did: the modules replaced (by path), the plan's bytes for each weight and
    the bytes its module holds; under `applied`, the tracker of the block."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    by_value: dict[int, QuantizedLinear | CastLinear] = field(default_factory=dict)
    """The plan's value id of each weight -> the module that stores it."""
    planned_bytes: dict[str, int] = field(default_factory=dict)
    held_bytes: dict[str, int] = field(default_factory=dict)
    tracker: LiveStorageTracker | None = None

    def measured(self) -> Measurement:
        """The block's live-storage measurement (after the `applied` block)."""
        if self.tracker is None:
            raise InvalidInput("nothing was measured: measurements come from memplan.applied(plan, model)")
        return self.tracker.result


def quantize_model(plan: Plan, model: nn.Module, weights: Weights = None) -> QuantizedRun:
    """Store the weights of `model` as `plan.decisions.bits` says, in place and for good (see the module
    docstring); with `weights`, also load every other parameter the mapping or file holds."""
    run, _ = swap_modules(plan, model, weights)
    return run


def swap_modules(
    plan: Plan, model: nn.Module, weights: Weights, streamed: frozenset[int] = frozenset()
) -> tuple[QuantizedRun, list[tuple[Any, ...]]]:
    """Replace the modules (those of the `streamed` value ids keep the stored form only); returns the run
    and (parent, attribute, original module) for each."""
    bits = plan.decisions.bits
    if bits is None:
        raise InvalidInput(
            "this plan has no bits decision: plan it with the bitwidth pass (passes=['bitwidth'])"
        )
    names = _resolve(plan, model)
    source = _Source(weights) if weights is not None else None
    slots = _slots(model)
    run, undo = QuantizedRun(), []
    params = dict(model.named_parameters(remove_duplicate=False))
    by_id = {v.id: v for v in plan.tensors}
    for spec in bits.tensors:
        name = names[by_id[spec.value_id].name]
        aliases = [n for _, _, n in slots[id(params[name])]]
        float_weight = source.read(aliases) if source else params[name]
        if float_weight is None:
            raise PlanMismatch(f"the weights given hold no tensor {name!r}")
        if float_weight.device.type == "meta":
            raise InvalidInput(f"{name} is on the meta device: give its float weights (weights=...)")
        replaced: QuantizedLinear | CastLinear | None = None
        for path, parent, attr, module in _users(model, params[name]):
            bias = getattr(module, "bias", None)
            replaced = replaced or stored_module(float_weight, spec, bias, spec.value_id not in streamed)
            undo.append((parent, attr, module))
            setattr(parent, attr, replaced)
            run.modules[path] = replaced
        if replaced is None:
            raise PlanMismatch(f"{name}: no nn.Linear or Conv1D of the model multiplies by it")
        run.by_value[spec.value_id] = replaced
        run.planned_bytes[name] = spec.stored_bytes(by_id[spec.value_id].shape)
        run.held_bytes[name] = sum(t.numel() * t.element_size() for t in replaced.stored())
    if source:
        _load_rest(model, source)
    return run, undo


def _users(model: nn.Module, weight: nn.Parameter) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent, attribute, module) of every Linear / Conv1D whose weight is `weight`."""
    out = []
    for path, parent in model.named_modules():
        for attr, module in parent.named_children():
            if getattr(module, "weight", None) is weight and _is_linear(module):
                out.append((f"{path}.{attr}" if path else attr, parent, attr, module))
    return out


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _resolve(plan: Plan, model: nn.Module) -> dict[str, str]:
    """Plan parameter name -> the model's; PlanMismatch listing names, shapes or dtypes that differ."""
    have = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    want = {v.name: v for v in plan.tensors if v.role == Role.PARAMETER and v.alias_of is None}
    strip = not all(n in have for n in want) and all(n.startswith(ZOO_PREFIX) for n in want)
    names = {n: n.removeprefix(ZOO_PREFIX) if strip else n for n in want}
    missing = sorted(n for n, m in names.items() if m not in have)
    differ = [
        f"{m}: plan {want[n].shape} {want[n].dtype}, model {tuple(have[m].shape)} {_dtype(have[m])}"
        for n, m in names.items()
        if m in have and (tuple(have[m].shape) != want[n].shape or _dtype(have[m]) != want[n].dtype)
    ]
    if missing or differ:
        parts = ([f"missing from the model: {', '.join(missing[:5])}"] if missing else []) + differ[:5]
        raise PlanMismatch(f"the plan was made for another model ({plan.model.name}): " + "; ".join(parts))
    return names


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class _Source:
    """Float tensors from a mapping or a `safetensors` file (read one at a time), found under any of a
    tensor's names (a tied weight is saved under one of them), with or without the zoo prefix."""

    def __init__(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike[str]) -> None:
        if isinstance(weights, (str, os.PathLike)):
            from safetensors import safe_open

            handle = safe_open(os.fspath(weights), framework="pt")
            self.keys, self.get = set(handle.keys()), handle.get_tensor
        else:
            self.keys, self.get = set(weights), weights.__getitem__

    def read(self, names: list[str]) -> torch.Tensor | None:
        for name in names:
            for key in (name, name.removeprefix(ZOO_PREFIX), ZOO_PREFIX + name):
                if key in self.keys:
                    return self.get(key)
        return None


Slot = tuple[nn.Module, str, str]
"""(module, attribute, full name) of one place a parameter or buffer is held."""


def _slots(model: nn.Module) -> dict[int, list[Slot]]:
    """Every parameter and buffer of `model`, by tensor identity, with every place it is held."""
    out: dict[int, list[Slot]] = {}
    for path, module in model.named_modules():
        held = [*module._parameters.items(), *module._buffers.items()]
        for attr, t in held:
            if t is not None:
                out.setdefault(id(t), []).append((module, attr, f"{path}.{attr}" if path else attr))
    return out


def _load_rest(model: nn.Module, source: _Source) -> None:
    """Every parameter and buffer `source` holds, into all its places (a model on the meta device gets
    real tensors); InvalidInput for one left on the meta device."""
    for slots in _slots(model).values():
        module, attr, name = slots[0]
        old = {**module._parameters, **module._buffers}[attr]
        value = source.read([n for _, _, n in slots])
        if value is None:
            if old.device.type == "meta":
                raise InvalidInput(f"{name} is on the meta device and the weights given do not hold it")
            continue
        new = value.to(old.dtype)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)  # one object: tied stay tied
        for m, a, _ in slots:
            (m._parameters if a in m._parameters else m._buffers)[a] = new


@contextmanager
def applied_bits(plan: Plan, model: nn.Module, weights: Weights = None) -> Iterator[QuantizedRun]:
    """The model with its weights stored as the plan says inside the block, its float modules back after;
    a live-storage tracker counts the quantized model's state and what the block computes."""
    placement = plan.decisions.placement
    if placement is not None and placement.tensors:
        raise InvalidInput(
            "this single-forward plan streams weights between tiers (placement); streaming runs in a "
            "generation only (memplan.runtime.generation): plan with gen=N, or without placement"
        )
    was_training = model.training
    model.eval()
    run, undo = swap_modules(plan, model, weights)
    run.tracker = LiveStorageTracker(record_timeline=False)
    try:
        with torch.no_grad(), run.tracker:
            run.tracker.track(model_state(model))
            yield run
    finally:
        for parent, attr, module in reversed(undo):
            setattr(parent, attr, module)
        model.train(was_training)


def model_state(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the (quantized) model holds: parameters, buffers, stored weights."""
    held = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, CastLinear)):
            held += m.stored()
    return held


def describe(run: QuantizedRun) -> str:
    """One line: weights replaced, bytes held against the plan's."""
    planned, held = sum(run.planned_bytes.values()), sum(run.held_bytes.values())
    return (
        f"{len(run.planned_bytes)} weights stored quantized in {len(run.modules)} modules: {held} bytes held "
        f"({planned} in the plan, {100 * (held - planned) / max(planned, 1):+.1f}%)"
    )
