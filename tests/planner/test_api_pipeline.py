"""The Python API and the pipeline, end to end on a tiny zoo model."""

from dataclasses import replace

import pytest

import memplan
from memplan.errors import InfeasibleBudget, InvalidInput, PlanMismatch
from memplan.planner.run import run_plan


@pytest.fixture(scope="module")
def train_plan():
    return memplan.plan("zoo:gpt2-tiny", mode="train", budget="64MiB", batch=2, seq=32, optimizer="adamw")


def test_plan_fits_and_verifies(train_plan, tmp_path):
    assert train_plan.predictions.peak_bytes["device"] <= train_plan.budget_bytes["device"]
    assert memplan.verify(train_plan).ok
    path = tmp_path / "plan.json"
    train_plan.save(str(path))
    assert memplan.load(str(path)) == train_plan
    assert memplan.verify(str(path)).ok
    assert train_plan.passes[0].solver.status == "trivial"
    assert train_plan.workload.optimizer == "adamw"


def test_run_matches_prediction(train_plan):
    measured, cmp = run_plan(train_plan)
    assert cmp.within_budget
    assert abs(cmp.peak_error) <= 0.05
    assert measured.peak_bytes > 0


def test_infeasible_budget_names_bound_and_tensors(train_plan):
    with pytest.raises(InfeasibleBudget) as err:
        memplan.plan("zoo:gpt2-tiny", mode="train", budget="100KiB", batch=2, seq=32)
    e = err.value
    assert e.lower_bound_bytes > e.budget_bytes == 100 * 1024
    assert e.tensors and "lower bound" in str(e) and "Raise the budget to at least" in str(e)


def test_plan_for_another_model_is_refused(train_plan):
    other = train_plan.with_(model=replace(train_plan.model, fingerprint="sha256:" + "0" * 32))
    with pytest.raises(PlanMismatch, match="fingerprint"):
        run_plan(other)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "eval"}, "mode must be"),
        ({"optimizer": "lion"}, "optimizer must be"),
        ({"budget": "lots"}, "cannot read size"),
        ({"budget": 0}, "positive"),
        ({"hardware": "cray-1"}, "unknown hardware"),
        ({"dtype": "fp8"}, "unknown dtype"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        memplan.plan("zoo:gpt2-tiny", **kwargs)


def test_bad_model_specs(tmp_path):
    with pytest.raises(InvalidInput, match="unknown zoo model"):
        memplan.plan("zoo:gpt5")
    with pytest.raises(InvalidInput, match="no ONNX file"):
        memplan.plan(str(tmp_path / "absent.onnx"))
    with pytest.raises(InvalidInput, match="cannot tell what model"):
        memplan.plan("resnet")
    with pytest.raises(InvalidInput, match="cannot load factory"):
        memplan.plan("no_such_module:make")
    with pytest.raises(InvalidInput, match="needs example_inputs"):
        import torch

        memplan.plan(torch.nn.Linear(2, 2))
