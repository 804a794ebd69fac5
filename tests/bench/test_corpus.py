"""The corpus's test subset (bench/corpus.py runs all of it): an encoder (BERT), a decoder (GPT-2), a CNN
(transformers' ResNet) and the hand-written model (custom autograd.Function, tied weights, in-place add),
library defaults left on (dropout, `use_cache`, `return_dict`). Two AdamW steps under `memplan.applied` at
70% of the plain peak and at the lowest feasible budget: the measured peak holds the budget, and loss,
gradients and parameters after `opt.step()` are bitwise equal to the plain steps'. Correctness only, no
timings."""

import copy

import pytest
import torch

from bench.corpus import lowest_budget, per_block_checkpoint, plan_budget, run_budget, train_steps
from bench.corpus_models import CorpusModel, HandLM, get
from memplan.ir.hardware import load_hardware


@pytest.fixture(scope="module")
def hw():
    return load_hardware("cpu")


def _check(point, plain):
    if point.outcome == "infeasible":  # an honest refusal at plan time, with the bound
        assert point.lower_bound is not None and point.lower_bound > point.budget
        return
    assert point.outcome == "planned", point.outcome
    assert point.run is not None
    assert point.run.equal == "bitwise", f"{point.label}: {point.run.equal}"
    assert point.run.peak_bytes <= point.budget, f"{point.label}: {point.run.peaks} > {point.budget}"
    assert point.run.peak_bytes < plain.peak_bytes


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet", "handmade"])
def test_trains_under_plans_bitwise_within_budget(name, hw):
    cm = get(name)
    base, inputs = cm.build(), cm.inputs()
    assert base.training
    plain = train_steps(copy.deepcopy(base), inputs)
    assert plain.equal == "-" and len(plain.kept) == 2
    at70 = plan_budget(base, inputs, int(0.7 * plain.peak_bytes), hw, "70%")
    lowest = lowest_budget(base, inputs, hw)
    assert lowest.outcome == "planned", lowest.outcome  # every model of the subset can be planned
    for point in (at70, lowest):
        _check(run_budget(cm, base, inputs, point, plain, 2), plain)


def test_plain_runs_repeat_and_detect_a_difference():
    """The reference is reproducible (same seed, dropout on) and a changed step is caught."""
    cm = get("handmade")
    base, inputs = cm.build(), cm.inputs()
    plain = train_steps(copy.deepcopy(base), inputs)
    assert train_steps(copy.deepcopy(base), inputs, reference=plain).equal == "bitwise"
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.norm.weight.add_(1e-3)
    assert train_steps(other, inputs, reference=plain).equal.startswith("DIFFERENT (loss at step 1")


def test_handmade_has_its_patterns_and_blocks():
    model = get("handmade").build()
    assert isinstance(model, HandLM)
    assert model.head.weight is model.embed.weight
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    assert len(get("handmade").blocks(model)) == 2
    assert len(get("gpt2").blocks(get("gpt2").build())) == 2


def test_per_block_checkpoint_switches_back():
    cm: CorpusModel = get("gpt2")
    model = cm.build()
    with per_block_checkpoint(cm, model) as n:
        assert n == 2 and all(b.gradient_checkpointing for b in cm.blocks(model))
    assert not any(b.gradient_checkpointing for b in cm.blocks(model))
