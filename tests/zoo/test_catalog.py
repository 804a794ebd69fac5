"""Tests of the model zoo: published sizes on the meta device, inputs, and both capture paths."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from memplan.errors import InvalidInput
from memplan.zoo import catalog as zoo

# Published parameter counts (model cards and papers), independent of the configs in zoo.py.
PUBLISHED_PARAMS = {
    "gpt2": 124e6,  # openai-community/gpt2: "124M"
    "gpt2-xl": 1.56e9,  # openai-community/gpt2-xl: "1.5B" in the paper, 1.56B on the HF model card
    "llama2-7b": 6.74e9,  # meta-llama/Llama-2-7b-hf: 6,738,415,616
    "llama2-13b": 13.0e9,  # meta-llama/Llama-2-13b-hf: 13,015,864,320
    "llama2-70b": 68.98e9,  # meta-llama/Llama-2-70b-hf: 68,976,648,192
    "llama3-8b": 8.03e9,  # meta-llama/Meta-Llama-3-8B: 8,030,261,248
    "opt-1.3b": 1.32e9,  # facebook/opt-1.3b on the HF hub: 1.32B (Zhang et al. 2022, table 1: "1.3B")
    "opt-6.7b": 6.7e9,  # Zhang et al. 2022, table 1
    "opt-30b": 30e9,  # Zhang et al. 2022, table 1
    "opt-175b": 175e9,  # Zhang et al. 2022, table 1
    "resnet50": 25.6e6,  # microsoft/resnet-50: 25.6M
}
EXPECTED_NAMES = set(PUBLISHED_PARAMS) | {"gpt2-tiny", "llama-tiny", "tiny-lm"}
TINY_LMS = ["gpt2-tiny", "llama-tiny"]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


def test_names_are_the_documented_set() -> None:
    assert set(zoo.names()) == EXPECTED_NAMES
    assert zoo.names() == sorted(zoo.names())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published_sizes(name: str) -> None:
    model = zoo.get(name).build("meta")
    assert param_count(model) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_meta_build_allocates_nothing(name: str) -> None:
    model = zoo.get(name).build("meta", torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the dtype switch did not leak


def test_architecture_details() -> None:
    llama70 = zoo.get("llama2-70b").make_config()
    assert (llama70.num_attention_heads, llama70.num_key_value_heads) == (64, 8)
    llama3 = zoo.get("llama3-8b").make_config()
    assert (llama3.vocab_size, llama3.num_key_value_heads) == (128256, 8)
    tiny = zoo.get("llama-tiny").make_config()
    assert tiny.num_key_value_heads < tiny.num_attention_heads  # GQA
    gpt2_tiny = zoo.get("gpt2-tiny").make_config()
    assert (gpt2_tiny.n_layer, gpt2_tiny.n_embd, gpt2_tiny.vocab_size, gpt2_tiny.n_head) == (2, 64, 256, 4)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES - {"resnet50"}))
def test_language_models_use_eager_attention_and_no_dropout(name: str) -> None:
    config = zoo.get(name).make_config()
    assert config._attn_implementation == "eager"
    rates = [v for k, v in config.to_dict().items() if ("drop" in k or "pdrop" in k) and isinstance(v, float)]
    assert rates and all(rate == 0.0 for rate in rates)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidInput, match="unknown zoo model 'gpt3'.*llama2-70b"):
        zoo.get("gpt3")
    assert zoo.get("zoo:gpt2").name == "gpt2"


def test_lm_inputs() -> None:
    entry = zoo.get("gpt2-tiny")
    (ids,) = entry.example_inputs(3, 17, "cpu", "infer")
    assert ids.shape == (3, 17) and ids.dtype == torch.long and int(ids.max()) < 256
    ids2, labels = entry.example_inputs(3, 17, "cpu", "train")
    assert torch.equal(ids, ids2) and torch.equal(labels, ids2)  # seeded, and causal LM labels = inputs
    (meta_ids,) = entry.example_inputs(3, 17, "meta", "infer")
    assert meta_ids.device.type == "meta" and meta_ids.shape == (3, 17)


def test_input_sizes_are_checked() -> None:
    with pytest.raises(InvalidInput, match="exceeds the model's maximum of 128"):
        zoo.get("gpt2-tiny").example_inputs(1, 129, "cpu", "infer")
    with pytest.raises(InvalidInput, match="must be positive"):
        zoo.get("llama-tiny").example_inputs(0, 8, "cpu", "train")


def test_resnet_inputs_and_forward() -> None:
    entry = zoo.get("resnet50")
    pixels, labels = entry.example_inputs(1, entry.default_seq, "cpu", "train")
    assert pixels.shape == (1, 3, 224, 224) and labels.shape == (1,) and int(labels.max()) < 1000
    model = entry.build()
    with torch.no_grad():
        assert entry.forward(model, pixels).shape == (1, 1000)
        assert entry.loss(model, pixels, labels).shape == ()


def test_build_is_reproducible_and_keeps_the_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = zoo.get("gpt2-tiny").build()
    assert torch.equal(torch.rand(1), expected_next)
    second = zoo.get("gpt2-tiny").build()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", TINY_LMS)
def test_forward_and_loss(name: str) -> None:
    entry = zoo.get(name)
    model = entry.build()
    with torch.no_grad():
        logits = entry.forward(model, *entry.example_inputs(2, 16, "cpu", "infer"))
        loss = entry.loss(model, *entry.example_inputs(2, 16, "cpu", "train"))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 16, 256)
    assert loss.shape == () and abs(float(loss) - math.log(256)) < 0.5  # random init: near uniform


@pytest.mark.parametrize("name", TINY_LMS)
def test_torch_export_of_inference(name: str) -> None:
    entry = zoo.get(name)
    model = entry.build()
    inputs = entry.example_inputs(2, 16, "cpu", "infer")
    program = torch.export.export(entry.inference_module(model), inputs)
    assert any(node.target == torch.ops.aten.softmax.int for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(*inputs), entry.forward(model, *inputs))


def test_torch_export_on_the_meta_device() -> None:
    entry = zoo.get("llama-tiny")
    model = entry.build("meta")
    program = torch.export.export(entry.inference_module(model), entry.example_inputs(1, 8, "meta", "infer"))
    (out,) = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(out.meta["val"].shape) == (1, 8, 256)


Grads = tuple[torch.Tensor, ...]
TrainStep = Callable[..., tuple[torch.Tensor, Grads]]


def _train_step(entry: zoo.ZooModel, model: nn.Module) -> TrainStep:
    """(params, buffers, *inputs) -> (loss, grads): one joint forward and backward, functionally."""

    def step(
        params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *inputs: torch.Tensor
    ) -> tuple[torch.Tensor, Grads]:
        bound = _Functional(model, {**params, **buffers})
        loss = entry.loss(bound, *inputs)
        return loss, torch.autograd.grad(loss, list(params.values()))

    return step


class _Functional(nn.Module):
    """Calls `model` with the given parameters and buffers (torch.func.functional_call)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.state = model, state

    def forward(self, **kwargs: object) -> object:
        return functional_call(self.inner, self.state, args=(), kwargs=kwargs)


@pytest.mark.parametrize("name", TINY_LMS)
def test_make_fx_of_a_training_step(name: str) -> None:
    # Fake tensors: transformers reads mask values eagerly unless it sees a fake or traced tensor.
    entry = zoo.get(name)
    model = entry.build().train()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    inputs = entry.example_inputs(2, 16, "cpu", "train")
    step = _train_step(entry, model)
    graph_module = make_fx(step, tracing_mode="fake")(params, buffers, *inputs)
    targets = {node.target for node in graph_module.graph.nodes}
    assert torch.ops.aten.mm.default in targets and torch.ops.aten.embedding_dense_backward.default in targets
    loss, grads = graph_module(params, buffers, *inputs)
    ref_loss, ref_grads = step(params, buffers, *inputs)
    torch.testing.assert_close(loss, ref_loss)
    assert len(grads) == len(params)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
