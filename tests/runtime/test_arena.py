"""The arena runner: a plan's offsets executed for real. Outputs equal the exported graph run normally
(bit for bit) and eager execution (allclose), the arena is the plan's size, most ops write in place, and a
plan whose offsets or residency are wrong is caught before any byte is overwritten."""

from dataclasses import replace

import pytest
import torch
from torch import nn

import memplan
from memplan.errors import InternalError, InvalidInput, PlanMismatch
from memplan.ir.analysis import Interval
from memplan.ir.hardware import load_hardware
from memplan.passes.manager import run_pipeline
from memplan.passes.registry import default_pipeline
from memplan.planner.models import capture, load_model
from memplan.planner.run import run_arena_for_plan
from memplan.plans.plan import Workload
from memplan.runtime.arena import check_arena_run, out_variant, run_in_arena


def _setup(model, inputs=None):
    """A CPU capture of `model` with real parameters, and the 1 GiB inference plan of that same graph
    (`memplan.plan` would export the model a second time, on the meta device, for the same graph)."""
    if isinstance(model, str):
        loaded = load_model(model, "infer", batch=2, seq=32, device="cpu")
    else:
        loaded = load_model(model, "infer", inputs)
    graph, cap = capture(loaded, "infer")
    workload = Workload("infer", loaded.batch, loaded.seq)
    plan = run_pipeline(graph, load_hardware("cpu"), workload, 2**30, loaded.source, default_pipeline())
    return plan, cap, loaded.module, loaded.example_inputs


_CACHE: dict[str, tuple] = {}


def _zoo(name):
    if name not in _CACHE:
        _CACHE[name] = _setup(name)
    return _CACHE[name]


@pytest.fixture(params=["zoo:gpt2-tiny", "zoo:llama-tiny"])
def zoo(request):
    return _zoo(request.param)


@pytest.fixture
def gpt2():
    return _zoo("zoo:gpt2-tiny")


def test_zoo_models_run_in_their_arena(zoo):
    plan, cap, module, inputs = zoo
    run = run_in_arena(plan, cap, module, inputs)
    check = check_arena_run(run, plan, cap, module, inputs)
    assert check.equal_to_graph and check.close_to_eager and check.plan_verified, check
    assert run.arena_bytes == {"device": plan.predictions.arena_bytes["device"]}
    assert check.arena_matches_plan
    assert run.ops_out > 0 and run.ops_copied == 0 and run.ops_view > 0
    assert run.ops_out + run.ops_view + run.ops_unplanned == len(plan.ops)
    # everything lives in the arena: no temporary, so the tracker sees exactly the arena
    assert run.max_temporary_bytes == 0
    assert run.peak_bytes == plan.predictions.arena_bytes["device"]
    persistent = sum(v.size_bytes for v in plan.tensors if v.role.value in ("parameter", "buffer", "input"))
    assert run.state_bytes == persistent


def test_copy_fallback_costs_the_largest_temporary(gpt2):
    plan, cap, module, inputs = gpt2
    run = run_in_arena(plan, cap, module, inputs, in_place=False)
    assert check_arena_run(run, plan, cap, module, inputs).equal_to_graph
    assert run.ops_out == 0 and run.ops_copied > 0 and run.in_place_share == 0.0
    assert "aten.addmm.default" in run.copied_targets
    assert run.max_temporary_bytes > 0
    assert run.peak_bytes == run.arena_bytes["device"] + run.max_temporary_bytes


def _writer_and_input(plan):
    """An op, one of its fresh outputs and one of its activation inputs: live together at that step."""
    values = {v.id: v for v in plan.tensors}
    offsets = plan.offsets["device"]
    for step, op in enumerate(plan.ops):
        outs = [v for v in op.outputs if values[v].alias_of is None and v in offsets]
        ins = [v for v in op.inputs if values[v].alias_of is None and values[v].role.value == "activation"]
        if outs and ins and values[outs[0]].dtype == values[ins[0]].dtype:
            return step, outs[0], ins[0]
    raise AssertionError("no op writes a fresh storage from an activation")


def test_overlapping_offsets_are_caught_before_the_write(gpt2):
    plan, cap, module, inputs = gpt2
    step, out, src = _writer_and_input(plan)
    offsets = dict(plan.offsets["device"])
    offsets[out] = offsets[src]
    bad = plan.with_(offsets={"device": offsets})
    assert not memplan.verify(bad).ok
    clash = rf"step {step}: writing value {out} .* would overwrite value {src}"
    with pytest.raises(InternalError, match=clash):
        run_in_arena(bad, cap, module, inputs)


def test_a_read_outside_the_residency_is_caught(gpt2):
    plan, cap, module, inputs = gpt2
    step, _, src = _writer_and_input(plan)
    cut = tuple(replace(iv, end=step) if iv.value_id == src else iv for iv in plan.residency)
    with pytest.raises(InternalError, match=rf"reads value \d+, whose storage {src} is not resident"):
        run_in_arena(plan.with_(residency=cut), cap, module, inputs)


def test_a_misaligned_offset_is_refused(gpt2):
    plan, cap, module, inputs = gpt2
    _, out, _ = _writer_and_input(plan)
    offsets = {**plan.offsets["device"], out: plan.offsets["device"][out] + 2}
    with pytest.raises(InternalError, match="misaligned"):
        run_in_arena(plan.with_(offsets={"device": offsets}), cap, module, inputs)


def test_a_slot_smaller_than_its_tensor_is_refused(gpt2):
    plan, cap, module, inputs = gpt2
    _, out, _ = _writer_and_input(plan)
    shrunk = tuple(replace(v, size_bytes=v.size_bytes // 2) if v.id == out else v for v in plan.tensors)
    with pytest.raises(InternalError, match="reaches element"):
        run_in_arena(plan.with_(tensors=shrunk), cap, module, inputs)


def test_a_tiny_sequential_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 8), nn.Softmax(-1))
    model.eval()
    plan, cap, module, inputs = _setup(model, (torch.randn(4, 16),))
    run = run_in_arena(plan, cap, module, inputs)
    assert check_arena_run(run, plan, cap, module, inputs).ok
    assert run.ops_out >= 5  # two addmm, relu, native_layer_norm (three outputs), softmax
    assert run.arena_bytes["device"] == plan.predictions.arena_bytes["device"]
    torch.testing.assert_close(run.outputs[0], model(*inputs), rtol=1e-6, atol=1e-6)


def test_out_variants_are_found_by_schema():
    aten = torch.ops.aten
    assert out_variant(aten.add.Tensor) is aten.add.out
    assert out_variant(aten.arange.start_step) is aten.arange.start_out  # dtype/device dropped
    assert out_variant(aten.native_layer_norm.default) is aten.native_layer_norm.out
    assert out_variant(aten.ne.Scalar) is aten.ne.Scalar_out
    assert out_variant(aten.view.default) is None
    assert out_variant(aten.add_.Tensor) is None  # in place already


def test_refuses_plans_it_cannot_run(gpt2):
    plan, cap, module, inputs = gpt2
    with pytest.raises(InvalidInput, match="inference plans"):
        run_in_arena(plan.with_(workload=replace(plan.workload, mode="train")), cap, module, inputs)
    with pytest.raises(InvalidInput, match="no offsets"):
        run_in_arena(plan.with_(offsets={}), cap, module, inputs)
    with pytest.raises(PlanMismatch, match="differs from the plan's model"):
        run_in_arena(plan.with_(model=replace(plan.model, fingerprint="sha256:0")), cap, module, inputs)
    first = plan.residency[-1]
    moved = (*plan.residency, Interval(first.value_id, "host", first.start, first.end, first.size_bytes))
    with pytest.raises(InvalidInput, match="moves 1 storages between tiers"):
        run_in_arena(plan.with_(residency=moved), cap, module, inputs)


def test_cli_report(gpt2):
    plan = gpt2[0]
    text = run_arena_for_plan(plan)
    assert text.startswith("arena run OK")
    assert f"device {plan.predictions.arena_bytes['device']:,} bytes (equal to the plan's: True)" in text
    with pytest.raises(InvalidInput, match="zoo models only"):
        run_arena_for_plan(plan.with_(model=replace(plan.model, source="module:Foo")))
