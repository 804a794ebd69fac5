"""Resolve what the user names as a model into something we can capture and run.

MODEL is one of:
- `zoo:NAME`: a model of the zoo (`memplan.zoo.catalog`), built from its config on the meta device for
  planning (nothing allocated) and on the CPU for running;
- a path to an `.onnx` file;
- `package.module:factory`: `factory()` returns `(module, example_inputs)`; in train mode
  `module(*example_inputs)` must return the loss;
- in the Python API, an `nn.Module` together with `example_inputs`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from memplan.errors import InvalidInput
from memplan.ir.frontends.fx_lower import Capture
from memplan.ir.graph import Graph

Mode = Literal["train", "infer"]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to capture: the module whose forward is the step (loss in train mode), and its inputs."""

    name: str
    source: str
    module: torch.nn.Module | None
    example_inputs: tuple[Any, ...]
    onnx_path: Path | None = None
    batch: int = 1
    seq: int | None = None


def load_model(
    spec: str | torch.nn.Module,
    mode: Mode,
    example_inputs: Sequence[Any] | None = None,
    batch: int | None = None,
    seq: int | None = None,
    device: str = "meta",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Resolve `spec` (see module docstring). `device="meta"` builds zoo models without allocating;
    `dtype` is the parameter dtype of zoo models."""
    if isinstance(spec, torch.nn.Module):
        if example_inputs is None:
            raise InvalidInput(
                "planning an nn.Module needs example_inputs (a tuple of tensors for its forward)"
            )
        inputs = tuple(example_inputs)
        b = batch or (
            inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        )
        return LoadedModel(
            type(spec).__name__, f"module:{type(spec).__qualname__}", spec, inputs, None, b, seq
        )
    if spec.startswith("zoo:"):
        return _load_zoo(spec, mode, batch, seq, device, dtype)
    if spec.endswith(".onnx"):
        path = Path(spec)
        if not path.exists():
            raise InvalidInput(f"no ONNX file at {path}")
        return LoadedModel(path.stem, str(path), None, (), path, batch or 1, seq)
    if ":" in spec:
        return _load_factory(spec, batch, seq)
    raise InvalidInput(
        f"cannot tell what model {spec!r} is: give zoo:NAME (see `memplan zoo`), a path ending in .onnx, "
        "or package.module:factory"
    )


def _load_zoo(
    spec: str, mode: Mode, batch: int | None, seq: int | None, device: str, dtype: torch.dtype
) -> LoadedModel:
    from memplan.zoo import catalog as zoo

    entry = zoo.get(spec)
    b, s = batch or entry.default_batch, seq or entry.default_seq
    model = entry.build(device=device, dtype=dtype)
    model.train(mode == "train")
    inputs = entry.example_inputs(b, s, device, mode)
    module = entry.loss_module(model) if mode == "train" else entry.inference_module(model)
    return LoadedModel(entry.name, spec, module, inputs, None, b, s if entry.family != "resnet" else None)


def _load_factory(spec: str, batch: int | None, seq: int | None) -> LoadedModel:
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidInput(f"cannot load factory {spec!r}: {e}; give package.module:function") from e
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise InvalidInput(
            f"factory {spec!r} must return (module, example_inputs), got {type(made).__name__}"
        )
    module, inputs = made
    return LoadedModel(attr, spec, module, tuple(inputs), None, batch or 1, seq)


def capture(model: LoadedModel, mode: Mode, optimizer: str = "none") -> tuple[Graph, Capture | None]:
    """The memory IR of the model's step: the inference forward, or the whole training step."""
    if model.onnx_path is not None:
        if mode == "train":
            raise InvalidInput("ONNX files hold an inference graph; plan them with --mode infer")
        from memplan.ir.frontends.onnx_frontend import from_onnx

        return from_onnx(model.onnx_path, batch=model.batch, seq=model.seq), None
    assert model.module is not None
    if mode == "train":
        from memplan.ir.frontends.train_step import capture_train_step

        cap = capture_train_step(model.module, model.example_inputs, optimizer=optimizer, name=model.name)  # type: ignore[arg-type]
    else:
        from memplan.ir.frontends.torch_export import capture_inference

        cap = capture_inference(model.module, model.example_inputs, name=model.name)
    return cap.graph, cap


def load_causal_lm(
    spec: str | torch.nn.Module,
    example_inputs: Any = None,
    batch: int | None = None,
    prompt: int | None = None,
    device: str = "meta",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """A causal LM to generate with: a zoo language model (built on `device`), or an `nn.Module` with its
    `input_ids` (a tensor, or a tuple whose first item is one). Batch and prompt come from the inputs."""
    if isinstance(spec, torch.nn.Module):
        ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise InvalidInput("generation needs input_ids: a [batch, prompt] tensor of token ids")
        name = type(spec).__name__
        return LoadedModel(
            name, f"module:{type(spec).__qualname__}", spec, (ids,), None, ids.shape[0], ids.shape[1]
        )
    if not spec.startswith("zoo:"):
        raise InvalidInput(f"generation plans a causal LM: give zoo:NAME or an nn.Module, not {spec!r}")
    from memplan.zoo import catalog as zoo

    entry = zoo.get(spec)
    if entry.family == "resnet":
        raise InvalidInput(f"{spec} is not a language model; generation needs a causal LM")
    b, s = batch or entry.default_batch, prompt or min(entry.default_seq, 512)
    model = entry.build(device=device, dtype=dtype)
    model.eval()
    return LoadedModel(entry.name, spec, model, entry.example_inputs(b, s, device, "infer"), None, b, s)


def capture_generation(model: LoadedModel, gen: int) -> Graph:
    """The unit-level IR of generating `gen` tokens after the model's prompt (see `causal_lm`)."""
    from memplan.ir.frontends.causal_lm import generation_graph, profile_generation

    assert model.module is not None and model.seq is not None
    profile = profile_generation(model.module, model.batch, model.seq, model.name)
    return generation_graph(profile, gen)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """`fp32`, `bf16` or `fp16` as a torch dtype."""
    if name not in DTYPES:
        raise InvalidInput(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
