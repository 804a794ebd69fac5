"""The model zoo: named model configurations that memplan can plan without downloading anything.

`memplan plan zoo:NAME` looks a model up here. Every entry is built from a Hugging Face `transformers`
config written in code (no weights leave the hub, none are needed): on the meta device a 70B-shaped
model is built in milliseconds and allocates nothing, so it can be captured and planned on a laptop;
on a real device it gets a reproducible random init (seed 0, without touching the caller's RNG). The
one exception is `tiny-lm`, a small byte-level model that memplan trains itself (see `tiny_lm.py`).

Each `ZooModel` also says how to call its model with plain tensors, so that every capture path
(`torch.export`, `make_fx` of a joint training step) sees the same thing:

- `forward(model, *inputs)` is the inference forward and returns the logits tensor (no KV cache, no
  `ModelOutput`);
- `loss(model, *inputs)` is the scalar training loss;
- `example_inputs(batch, seq, device, mode)` makes those inputs: `(input_ids,)` or
  `(input_ids, labels)` for language models, `(pixel_values,)` or `(pixel_values, labels)` for ResNet.

All configs use eager attention and zero dropout, so that captures are plain aten graphs and training
steps are deterministic. `torch.export` works on real and on meta weights. `make_fx` of a training step
needs `tracing_mode="fake"` (or "symbolic"): in real mode transformers' mask code reads tensor values
(a packed-sequence check) and tracing stops on a data-dependent `.all()`. Parameter counts match
the published sizes (see `tests/planner/test_zoo.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
)

from memplan.errors import InvalidInput
from memplan.zoo import tiny_lm

Mode = Literal["infer", "train"]
Family = Literal["gpt2", "llama", "opt", "resnet"]
DeviceLike = str | torch.device

IMAGE_SIZE = 224
"""Side of the square images ResNet-50 is planned for (ImageNet resolution)."""

INPUT_SEED = 0
"""Seed of the example inputs and of random weight init, so two builds or two batches are identical."""


class Builder(Protocol):
    """Builds the model on `device` in `dtype` (meta: shapes only, nothing allocated)."""

    def __call__(self, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module: ...


class InputMaker(Protocol):
    """Makes example inputs of a batch (and, for language models, a sequence length)."""

    def __call__(self, batch: int, seq: int, device: DeviceLike, mode: Mode) -> tuple[torch.Tensor, ...]: ...


class ModelCall(Protocol):
    """Calls the model on plain tensors and returns one tensor (logits, or the scalar loss)."""

    def __call__(self, model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class ZooModel:
    """One zoo entry: how to build the model, feed it, and call it for inference or training."""

    name: str
    """The name used on the command line as `zoo:NAME`."""
    family: Family
    """The architecture family (which `transformers` class builds it)."""
    description: str
    """One line for listings: what the model is and its published size."""
    make_config: Callable[[], PretrainedConfig]
    """A fresh `transformers` config of the model (eager attention, zero dropout)."""
    build: Builder
    """Builds the module; see `Builder`."""
    example_inputs: InputMaker
    """Makes inputs for `forward` (mode "infer") or `loss` (mode "train")."""
    forward: ModelCall
    """Inference forward: returns the logits, `[batch, seq, vocab]` or `[batch, classes]`."""
    loss: ModelCall
    """Training loss: returns a scalar tensor."""
    default_batch: int
    """The batch to plan for when the user gives none."""
    default_seq: int
    """The sequence length to plan for when the user gives none (ignored by ResNet)."""

    def inference_module(self, model: nn.Module) -> nn.Module:
        """Wrap `model` so that `module(*inputs)` is `self.forward(model, *inputs)`, for `torch.export`."""
        return _CallModule(model, self.forward)

    def loss_module(self, model: nn.Module) -> nn.Module:
        """Wrap `model` so that `module(*inputs)` is `self.loss(model, *inputs)`."""
        return _CallModule(model, self.loss)


class _CallModule(nn.Module):
    """An `nn.Module` whose forward is `call(model, *inputs)`; `model` stays a registered submodule."""

    def __init__(self, model: nn.Module, call: ModelCall) -> None:
        super().__init__()
        self.model = model
        self._call = call

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._call(self.model, *inputs)


# ---------------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make `dtype` the default, so parameters are created in it (no float32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_from_config(
    model_cls: type[PreTrainedModel], config: PretrainedConfig, device: DeviceLike, dtype: torch.dtype
) -> nn.Module:
    """Construct `model_cls(config)` directly on `device` in `dtype`, in eval mode.

    On the meta device nothing is allocated. Elsewhere the init is random but reproducible (seed
    `INPUT_SEED`), and the caller's global RNG state is left as it was.
    """
    if not dtype.is_floating_point:
        raise InvalidInput(f"model dtype must be a floating point type, got {dtype}")
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
        torch.manual_seed(INPUT_SEED)
        model = model_cls(config)
    return model.eval()


def _builder(model_cls: type[PreTrainedModel], make_config: Callable[[], PretrainedConfig]) -> Builder:
    def build(device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        return build_from_config(model_cls, make_config(), device, dtype)

    return build


# ---------------------------------------------------------------------------------------------------
# Inputs and calls


def _randint(high: int, shape: tuple[int, ...], device: DeviceLike) -> torch.Tensor:
    """Seeded random integers in `[0, high)`; an empty tensor of that shape on the meta device."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=torch.long, device="meta")
    gen = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randint(0, high, shape, generator=gen).to(device)


def _check_sizes(batch: int, seq: int, max_seq: int | None) -> None:
    if batch < 1 or seq < 1:
        raise InvalidInput(f"batch and sequence length must be positive, got batch={batch}, seq={seq}")
    if max_seq is not None and seq > max_seq:
        raise InvalidInput(f"sequence length {seq} exceeds the model's maximum of {max_seq} positions")


def _lm_inputs(vocab: int, max_seq: int) -> InputMaker:
    def make(batch: int, seq: int, device: DeviceLike, mode: Mode) -> tuple[torch.Tensor, ...]:
        _check_sizes(batch, seq, max_seq)
        input_ids = _randint(vocab, (batch, seq), device)  # [batch, seq] token ids
        # The model shifts labels by one itself, so the labels of a causal LM are its inputs.
        return (input_ids,) if mode == "infer" else (input_ids, input_ids.clone())

    return make


def _lm_forward(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    (input_ids,) = inputs
    logits: torch.Tensor = model(input_ids=input_ids, use_cache=False).logits  # [batch, seq, vocab]
    return logits


def _lm_loss(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    input_ids, labels = inputs
    loss: torch.Tensor = model(input_ids=input_ids, labels=labels, use_cache=False).loss  # scalar, nats
    return loss


def _image_inputs(classes: int) -> InputMaker:
    def make(batch: int, seq: int, device: DeviceLike, mode: Mode) -> tuple[torch.Tensor, ...]:
        _check_sizes(batch, 1, None)  # seq has no meaning for an image model
        shape = (batch, 3, IMAGE_SIZE, IMAGE_SIZE)
        if torch.device(device).type == "meta":
            pixels = torch.empty(shape, device="meta")
        else:
            pixels = torch.randn(shape, generator=torch.Generator().manual_seed(INPUT_SEED)).to(device)
        return (pixels,) if mode == "infer" else (pixels, _randint(classes, (batch,), device))

    return make


def _image_forward(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    (pixels,) = inputs
    logits: torch.Tensor = model(pixel_values=pixels).logits  # [batch, classes]
    return logits


def _image_loss(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    pixels, labels = inputs
    loss: torch.Tensor = model(pixel_values=pixels, labels=labels).loss
    return loss


# ---------------------------------------------------------------------------------------------------
# Configs (published architectures; sources in each function's docstring)


def gpt2_config(
    n_layer: int, n_embd: int, n_head: int, vocab: int = 50257, n_positions: int = 1024
) -> GPT2Config:
    """A GPT-2 config (OpenAI's sizes: small 12x768x12, XL 48x1600x25), eager attention, no dropout."""
    return GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        attn_implementation="eager", bos_token_id=min(50256, vocab - 1), eos_token_id=min(50256, vocab - 1),
    )  # fmt: skip


def llama_config(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
    vocab: int = 32000, max_positions: int = 4096, rope_theta: float = 10000.0,
) -> LlamaConfig:  # fmt: skip
    """A Llama config (Llama 2: vocab 32000, 4096 positions; Llama 3: vocab 128256, theta 5e5), eager."""
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attention_dropout=0.0, attn_implementation="eager",
        bos_token_id=min(1, vocab - 1), eos_token_id=min(2, vocab - 1),
    )  # fmt: skip


def opt_config(hidden: int, layers: int, heads: int) -> OPTConfig:
    """An OPT config (Zhang et al. 2022, table 1: ffn = 4 x hidden, vocab 50272, 2048 positions)."""
    return OPTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
        word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
        attn_implementation="eager",
    )  # fmt: skip


def resnet50_config() -> ResNetConfig:
    """ResNet-50 v1.5 as in microsoft/resnet-50: bottleneck stages [3, 4, 6, 3], 1000 ImageNet classes."""
    return ResNetConfig(
        embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
        layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
        id2label={i: f"LABEL_{i}" for i in range(1000)},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The registry


def _lm(
    name: str, family: Family, description: str, model_cls: type[PreTrainedModel],
    make_config: Callable[[], PretrainedConfig], batch: int, seq: int,
) -> ZooModel:  # fmt: skip
    config = make_config()
    return ZooModel(
        name=name, family=family, description=description, make_config=make_config,
        build=_builder(model_cls, make_config),
        example_inputs=_lm_inputs(config.vocab_size, config.max_position_embeddings),
        forward=_lm_forward, loss=_lm_loss, default_batch=batch, default_seq=seq,
    )  # fmt: skip


def _gpt2(name: str, description: str, layers: int, width: int, heads: int, batch: int) -> ZooModel:
    def make_config() -> GPT2Config:
        return gpt2_config(layers, width, heads)

    return _lm(name, "gpt2", description, GPT2LMHeadModel, make_config, batch, 1024)


def _llama(name: str, description: str, make_config: Callable[[], LlamaConfig], seq: int) -> ZooModel:
    return _lm(name, "llama", description, LlamaForCausalLM, make_config, 1, seq)


def _opt(name: str, description: str, hidden: int, layers: int, heads: int) -> ZooModel:
    return _lm(name, "opt", description, OPTForCausalLM, lambda: opt_config(hidden, layers, heads), 1, 2048)


def _resnet50() -> ZooModel:
    return ZooModel(
        name="resnet50", family="resnet", description="ResNet-50 v1.5 image classifier, 25.6M parameters",
        make_config=resnet50_config, build=_builder(ResNetForImageClassification, resnet50_config),
        example_inputs=_image_inputs(1000), forward=_image_forward, loss=_image_loss,
        default_batch=32, default_seq=1,
    )  # fmt: skip


def build_tiny_lm(device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """tiny-lm with its trained weights when they are cached, else with random init (seed 0).

    On the meta device the cache is never read. Use `tiny_lm.is_cached()` to know which you get, or
    `tiny_lm.load_tiny_lm()` to insist on trained weights.
    """
    if torch.device(device).type != "meta" and tiny_lm.is_cached():
        return tiny_lm.load_tiny_lm(device, dtype=dtype)
    return build_from_config(GPT2LMHeadModel, tiny_lm.tiny_lm_config(), device, dtype)


def _tiny_lm() -> ZooModel:
    config = tiny_lm.tiny_lm_config()
    return ZooModel(
        name="tiny-lm", family="gpt2",
        description="byte-level GPT, 4x256, trained by memplan on stdlib sources (random init if not cached)",
        make_config=tiny_lm.tiny_lm_config, build=build_tiny_lm,
        example_inputs=_lm_inputs(config.vocab_size, config.n_positions),
        forward=_lm_forward, loss=_lm_loss, default_batch=16, default_seq=config.n_positions,
    )  # fmt: skip


def _entries() -> list[ZooModel]:
    return [
        _gpt2("gpt2", "GPT-2 small, 124M parameters", 12, 768, 12, batch=8),
        _gpt2("gpt2-xl", "GPT-2 XL, 1.56B parameters", 48, 1600, 25, batch=1),
        _lm("gpt2-tiny", "gpt2", "test-size GPT-2: 2 layers, width 64, vocab 256", GPT2LMHeadModel,
            lambda: gpt2_config(2, 64, 4, vocab=256, n_positions=128), 2, 32),
        _llama("llama2-7b", "Llama 2 7B, 6.74B parameters",
               lambda: llama_config(4096, 11008, 32, 32, 32), 4096),
        _llama("llama2-13b", "Llama 2 13B, 13.0B parameters",
               lambda: llama_config(5120, 13824, 40, 40, 40), 4096),
        _llama("llama2-70b", "Llama 2 70B, 69.0B parameters, GQA with 8 KV heads",
               lambda: llama_config(8192, 28672, 80, 64, 8), 4096),
        _llama("llama3-8b", "Llama 3 8B, 8.03B parameters, GQA with 8 KV heads, vocab 128256",
               lambda: llama_config(4096, 14336, 32, 32, 8, vocab=128256, max_positions=8192,
                                    rope_theta=500000.0), 8192),
        _lm("llama-tiny", "llama", "test-size Llama: 2 layers, width 64, 4 heads, 2 KV heads (GQA)",
            LlamaForCausalLM, lambda: llama_config(64, 128, 2, 4, 2, vocab=256, max_positions=128), 2, 32),
        _opt("opt-1.3b", "OPT 1.3B, 1.32B parameters", 2048, 24, 32),
        _opt("opt-6.7b", "OPT 6.7B, 6.66B parameters", 4096, 32, 32),
        _opt("opt-30b", "OPT 30B, 30.0B parameters", 7168, 48, 56),
        _opt("opt-175b", "OPT 175B, 175B parameters (FlexGen's largest setting)", 12288, 96, 96),
        _resnet50(),
        _tiny_lm(),
    ]  # fmt: skip


_REGISTRY: dict[str, ZooModel] = {entry.name: entry for entry in _entries()}


def names() -> list[str]:
    """The names of all zoo models, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> ZooModel:
    """The zoo model called `name` (a leading `zoo:` is accepted); `InvalidInput` if there is none."""
    key = name.removeprefix("zoo:")
    if key not in _REGISTRY:
        raise InvalidInput(f"unknown zoo model {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[key]
