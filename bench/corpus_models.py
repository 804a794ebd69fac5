"""The models of `bench/corpus.py`: real architectures from their libraries' configs, random init.

Every entry builds a module whose `module(*inputs)` is the loss a user writes, with the library's defaults
left alone (dropout as configured, `use_cache` and `return_dict` as the library sets them, the attention
implementation the library picks):

- transformers (small configs, seeded random init): `model(input_ids=x, labels=x).loss` for the language
  models (masked LM for the encoders, causal LM for the decoders, seq2seq with `labels` for T5 and BART),
  `model(pixel_values=..., labels=...).loss` for ViT, `model(input_features=..., labels=...).loss` for
  Whisper;
- torchvision (`torchvision==0.28.0`, the release built for torch 2.13; the architectures at their real
  sizes, CNNs on 224-pixel images, ViT-B/16 on 128): `F.cross_entropy(model(x), y)`;
- `handmade`: a small language model written here with a custom `autograd.Function`, tied input and output
  embeddings and an in-place op, the three patterns a library model rarely has all of.

`CorpusModel.blocks(module)` names the repeated blocks (what per-block `torch.utils.checkpoint` wraps).
Inputs come from a fixed seed, and every build forks the RNG, so a build never moves the caller's seed.

torchvision on this CPU build of torch: PyPI's torchvision 0.28.0 is built against torch's CUDA build, so
its C extension (`_C.so`, which needs `libtorch_cuda.so`) cannot load beside the CPU torch. torchvision
tolerates a missing extension (its ops raise when called), except that `_meta_registrations.py`
registers fake kernels for `torchvision::nms` and `torchvision::qnms` unconditionally, which fails on an
operator that was never defined ("operator torchvision::nms does not exist"; upstream pytorch/vision
issue 9337, fixed by guarding the registration with `extension._has_ops()`). `import_torchvision` defines
those two operators' schemas (no kernel) when the extension does not load, so the import succeeds; the
classification models use no torchvision operator, and `torchvision.ops.nms` still refuses with
torchvision's own "Couldn't load custom C++ ops" error.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torchvision first: see the module docstring

_SCHEMAS: list[torch.library.Library] = []
"""The operator definitions made by `prepare_torchvision` (a `Library` deregisters them when collected)."""


def _extension_loads() -> bool:
    """Whether torchvision's C extension loads beside this torch (checked before torchvision is imported,
    whose import fails without it)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    lib = next(Path(spec.origin).parent.glob("_C*.so"), None)
    if lib is None:
        return False
    try:
        torch.ops.load_library(str(lib))
    except OSError:
        return False
    return True


def prepare_torchvision() -> None:
    """Make torchvision importable beside a CPU torch build whose torchvision C extension does not load
    (see the module docstring): define the two operators torchvision's import registers fake kernels for,
    schema only. Runs when this module is imported, before anything imports transformers, which imports
    torchvision whenever it is installed (and so fails with it the same way); does nothing when torchvision
    is not installed, is imported already, or its extension loads."""
    if _SCHEMAS or "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    if not _extension_loads():
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SCHEMAS.append(lib)


prepare_torchvision()


def import_torchvision() -> ModuleType:
    """`torchvision.models` (raises ImportError, with the pip line, if torchvision is not installed)."""
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed: pip install torchvision==0.28.0 (`vision` extra)")
    prepare_torchvision()
    import torchvision.models

    return torchvision.models


SEED = 0
"""Seed of every build's random init and of the inputs."""
BATCH, SEQ, VOCAB = 4, 128, 1000
"""Text inputs: `BATCH` x `SEQ` tokens of a `VOCAB`-token vocabulary. The configs are small (a CPU shared by
many), the inputs large enough that activations, not weights, make most of the peak."""
IMAGE, IMAGE_BATCH, CLASSES = 224, 8, 10
"""torchvision's CNNs: `IMAGE_BATCH` RGB images at ImageNet's `IMAGE` x `IMAGE` pixels, `CLASSES` labels."""
VIT_IMAGE = 128
"""ViT-B/16 sees `BATCH` images of `VIT_IMAGE` pixels (64 patches): its 86M weights and their gradients
make most of its peak at any batch this CPU trains in seconds, so a larger input would add time, not a
different answer."""
SMALL_IMAGE = 64
"""transformers' ViT and ResNet (small configs) see `SMALL_IMAGE` x `SMALL_IMAGE` images."""


@dataclass(frozen=True)
class CorpusModel:
    """One architecture: how to build its loss module and its inputs, and which modules are its blocks."""

    name: str
    library: str
    """'transformers', 'torchvision' or 'hand-written'."""
    build: Callable[[], nn.Module]
    """The loss module in train mode, seeded random init (a fresh one per call)."""
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    """Seeded example inputs of `build()`'s forward."""
    block_types: tuple[str, ...] = ()
    """Class names of the repeated blocks; empty: transformers' `GradientCheckpointingLayer`s."""

    def blocks(self, module: nn.Module) -> tuple[nn.Module, ...]:
        """The repeated blocks of `module` (outermost only: a block inside a block is not listed)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        found: list[nn.Module] = []
        inside: set[int] = set()
        for m in module.modules():
            if id(m) in inside:
                continue
            named = type(m).__name__ in self.block_types
            if named or (not self.block_types and isinstance(m, GradientCheckpointingLayer)):
                found.append(m)
                inside.update(id(s) for s in m.modules())
        return tuple(found)


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    """`make()` under seed `SEED` without touching the caller's RNG, in train mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        module = make()
    return module.train()


def _tokens(shape: tuple[int, ...], high: int = VOCAB, low: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(low, high, shape, generator=gen)


def _floats(shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(shape, generator=gen)


# ---------------------------------------------------------------------------------------------------
# transformers


class KeywordLoss(nn.Module):
    """`module(*tensors)` is `model(**dict(zip(keys, tensors))).loss`: a library call with keywords, made
    positional for `memplan.plan` (which takes a module and a tuple of example inputs)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.model(**dict(zip(self.keys, tensors, strict=True))).loss
        return loss


def _hf(name: str, model_cls: str, config_cls: str, keys: tuple[str, ...],
        inputs: Callable[[], tuple[torch.Tensor, ...]], blocks: tuple[str, ...] = (),
        **config: Any) -> CorpusModel:
    """A transformers model `model_cls(config_cls(**config))` called with `keys`; `blocks` as in
    `CorpusModel.block_types`."""

    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return _seeded(lambda: KeywordLoss(getattr(transformers, model_cls)(cfg), keys))

    return CorpusModel(name, "transformers", build, inputs, blocks)


def _lm_inputs() -> tuple[torch.Tensor, ...]:
    ids = _tokens((BATCH, SEQ), low=3)  # above the special tokens (padding would change the positions)
    return ids, ids.clone()


def _seq2seq_inputs() -> tuple[torch.Tensor, ...]:
    return _tokens((BATCH, SEQ), low=3), _tokens((BATCH, SEQ // 2), low=3).flip(0)


WHISPER_MELS, WHISPER_FRAMES = 16, 256
"""Whisper's log-mel input: its encoder wants exactly 2 x `max_source_positions` frames."""


def _whisper_inputs() -> tuple[torch.Tensor, ...]:
    return _floats((BATCH, WHISPER_MELS, WHISPER_FRAMES)), _tokens((BATCH, SEQ // 2), low=3)


def _vit_inputs() -> tuple[torch.Tensor, ...]:
    return _floats((BATCH, 3, SMALL_IMAGE, SMALL_IMAGE)), _tokens((BATCH,), high=CLASSES)


_TEXT = {"vocab_size": VOCAB, "max_position_embeddings": 2 * SEQ}
_DEC = _TEXT | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_ENC = _DEC | {"pad_token_id": 1}
_BART = {"vocab_size": VOCAB, "max_position_embeddings": 2 * SEQ, "d_model": 64, "encoder_layers": 2,
         "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
         "encoder_ffn_dim": 128, "decoder_ffn_dim": 128}
_WHISPER_TOKENS = {"pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}


def transformers_models() -> list[CorpusModel]:
    """The transformers rows: 2-layer, 64-wide configs of each architecture (and a 3-stage ResNet, the CNN
    the test subset runs without torchvision), library defaults otherwise."""
    lm = mlm = ("input_ids", "labels")
    return [
        _hf("bert", "BertForMaskedLM", "BertConfig", mlm, _lm_inputs, **_ENC),
        _hf("roberta", "RobertaForMaskedLM", "RobertaConfig", mlm, _lm_inputs,
            **_ENC | {"max_position_embeddings": 2 * SEQ + 2}),
        _hf("distilbert", "DistilBertForMaskedLM", "DistilBertConfig", mlm, _lm_inputs,
            vocab_size=VOCAB, max_position_embeddings=2 * SEQ, dim=64, hidden_dim=128, n_layers=2, n_heads=4),
        _hf("t5", "T5ForConditionalGeneration", "T5Config", lm, _seq2seq_inputs,
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
        _hf("bart", "BartForConditionalGeneration", "BartConfig", lm, _seq2seq_inputs, **_BART),
        _hf("gpt2", "GPT2LMHeadModel", "GPT2Config", lm, _lm_inputs,
            vocab_size=VOCAB, n_positions=2 * SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
            eos_token_id=0),
        _hf("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", lm, _lm_inputs, **_DEC),
        _hf("opt", "OPTForCausalLM", "OPTConfig", lm, _lm_inputs, vocab_size=VOCAB,
            max_position_embeddings=2 * SEQ, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=64),
        _hf("llama", "LlamaForCausalLM", "LlamaConfig", lm, _lm_inputs, **_DEC),
        _hf("mistral", "MistralForCausalLM", "MistralConfig", lm, _lm_inputs,
            **_DEC | {"num_key_value_heads": 2}),
        _hf("qwen2", "Qwen2ForCausalLM", "Qwen2Config", lm, _lm_inputs, **_DEC | {"num_key_value_heads": 2}),
        _hf("phi", "PhiForCausalLM", "PhiConfig", lm, _lm_inputs, **_DEC),
        _hf("vit", "ViTForImageClassification", "ViTConfig", ("pixel_values", "labels"), _vit_inputs,
            image_size=SMALL_IMAGE, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_labels=CLASSES),
        _hf("whisper", "WhisperForConditionalGeneration", "WhisperConfig", ("input_features", "labels"),
            _whisper_inputs, vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, d_model=64, encoder_layers=2,
            decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_source_positions=WHISPER_FRAMES // 2, max_target_positions=SEQ,
            **_WHISPER_TOKENS),
        _hf("resnet", "ResNetForImageClassification", "ResNetConfig", ("pixel_values", "labels"),
            _vit_inputs, ("ResNetBasicLayer",), embedding_size=16, hidden_sizes=[16, 32, 64],
            depths=[1, 1, 1], layer_type="basic", num_labels=CLASSES),
    ]


# ---------------------------------------------------------------------------------------------------
# torchvision

class CrossEntropyLoss(nn.Module):
    """`module(x, y)` is `F.cross_entropy(model(x), y)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


def _tv(name: str, factory: str, blocks: tuple[str, ...], image: int = IMAGE, batch: int = IMAGE_BATCH,
        **kw: Any) -> CorpusModel:
    def build() -> nn.Module:
        make = getattr(import_torchvision(), factory)
        return _seeded(lambda: CrossEntropyLoss(make(weights=None, num_classes=CLASSES, **kw)))

    def inputs() -> tuple[torch.Tensor, ...]:
        return _floats((batch, 3, image, image)), _tokens((batch,), high=CLASSES)

    return CorpusModel(name, "torchvision", build, inputs, blocks)


def torchvision_models() -> list[CorpusModel]:
    """ResNet-18, MobileNetV3 (large), ConvNeXt-T and ViT-B/16 at their real sizes (see `IMAGE`)."""
    return [
        _tv("resnet18", "resnet18", ("BasicBlock",)),
        _tv("mobilenet_v3_large", "mobilenet_v3_large", ("InvertedResidual",)),
        _tv("convnext_tiny", "convnext_tiny", ("CNBlock",)),
        _tv("vit_b_16", "vit_b_16", ("EncoderBlock",), VIT_IMAGE, BATCH, image_size=VIT_IMAGE),
    ]


# ---------------------------------------------------------------------------------------------------
# The hand-written model


class ScaledSquare(torch.autograd.Function):
    """`x * relu(x) * scale`, with a hand-written backward (a custom `autograd.Function` saving its
    input)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.scale = scale
        return x * torch.relu(x) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * 2 * torch.relu(x) * ctx.scale, None


class HandBlock(nn.Module):
    """Pre-norm attention and MLP; the MLP's activation is `ScaledSquare`, its residual add in place."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(w // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = self.drop(att.masked_fill(causal, float("-inf")).softmax(-1))
        y = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, w)
        x = x + self.drop(self.proj(y))
        h = self.down(ScaledSquare.apply(self.up(self.norm2(x)), 0.5))
        return h.add_(x)  # in place: the residual joins the MLP's output buffer


class HandLM(nn.Module):
    """A causal LM whose output head is the input embedding (weight tying); `module(ids, labels)` is the
    next-token cross-entropy."""

    def __init__(self, vocab: int = VOCAB, width: int = 64, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(2 * SEQ, width) * 0.02)
        self.blocks = nn.ModuleList(HandBlock(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def handmade_model() -> CorpusModel:
    return CorpusModel("handmade", "hand-written", lambda: _seeded(HandLM), _lm_inputs, ("HandBlock",))


def corpus() -> list[CorpusModel]:
    """Every model of the corpus, in table order."""
    return [*transformers_models(), *torchvision_models(), handmade_model()]


def get(name: str) -> CorpusModel:
    """The corpus model called `name`."""
    for m in corpus():
        if m.name == name:
            return m
    raise KeyError(f"no corpus model {name!r}; known: {', '.join(m.name for m in corpus())}")
