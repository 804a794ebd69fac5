"""torch.export, joint training step and torch.fx frontends, checked against real runs on the CPU."""

import pytest
import torch

from memplan.errors import CaptureError
from memplan.ir.analysis import device_intervals, peaks
from memplan.ir.frontends.torch_export import capture_inference
from memplan.ir.frontends.torch_fx import from_fx
from memplan.ir.frontends.train_step import capture_train_step
from memplan.ir.graph import Role
from memplan.planner.models import load_model
from memplan.runtime.measure import run_inference, run_step


def _peak(graph):
    return peaks(device_intervals(graph), len(graph.ops))["device"].bytes


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("mode, optimizer", [("infer", "none"), ("train", "none"), ("train", "adamw")])
def test_predicted_peak_matches_measured(name, mode, optimizer):
    loaded = load_model(f"zoo:{name}", mode, batch=2, seq=32, device="cpu")
    if mode == "train":
        graph = capture_train_step(loaded.module, loaded.example_inputs, optimizer=optimizer).graph
        measured = run_step(loaded.module, loaded.example_inputs, mode, optimizer)
    else:
        cap = capture_inference(loaded.module, loaded.example_inputs)
        graph = cap.graph
        measured = run_inference(cap, loaded.module, loaded.example_inputs)
    assert abs(_peak(graph) - measured.peak_bytes) <= 0.05 * measured.peak_bytes


def test_roles_and_tied_weights():
    loaded = load_model("zoo:gpt2-tiny", "train", batch=2, seq=16, device="cpu")
    graph = capture_train_step(loaded.module, loaded.example_inputs).graph
    params = [v for v in graph.values if v.role == Role.PARAMETER]
    real = dict(loaded.module.named_parameters())
    roots = [v for v in params if v.alias_of is None]
    assert sum(v.size_bytes for v in roots) == sum(
        p.numel() * 4 for p in real.values()
    )  # lm_head tied to wte
    grads = [graph.value(graph.storage_of(o)) for o in graph.outputs[1:]]
    assert len(graph.outputs) == 1 + len(real)
    assert all(g.role in (Role.GRADIENT, Role.PARAMETER) or g.alias_of is None for g in grads)
    assert any(v.layer == 1 for v in graph.values)  # layer indices come from module paths
    assert all(op.cost_known for op in graph.ops), graph.warnings


def test_views_share_storage():
    loaded = load_model("zoo:gpt2-tiny", "infer", batch=1, seq=8, device="cpu")
    graph = capture_inference(loaded.module, loaded.example_inputs).graph
    views = [v for v in graph.values if v.alias_of is not None and v.role == Role.ACTIVATION]
    assert views and all(v.size_bytes == 0 for v in views)
    ops = {op.target for op in graph.ops}
    assert "aten.mm.default" in ops or "aten.addmm.default" in ops
    mm = next(op for op in graph.ops if op.target in ("aten.addmm.default", "aten.mm.default"))
    assert mm.flops > 0 and mm.bytes_read > 0


def test_meta_device_capture_allocates_nothing():
    loaded = load_model("zoo:llama2-7b", "train", batch=1, seq=128, device="meta")
    graph = capture_train_step(loaded.module, loaded.example_inputs).graph
    params = sum(v.size_bytes for v in graph.values if v.role == Role.PARAMETER and v.alias_of is None)
    assert 6.5e9 * 4 < params < 7e9 * 4  # 6.74B fp32 parameters, planned without allocating them


def test_fx_frontend_matches_export():
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.randn(32, 64)
    via_fx = from_fx(torch.fx.symbolic_trace(m), (x,)).graph
    via_export = capture_inference(m, (x,)).graph
    assert _peak(via_fx) == _peak(via_export)
    assert [op.target for op in via_fx.ops] == [op.target for op in via_export.ops]


def test_unsupported_ops_get_conservative_cost_and_warning():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.qr(x)[0]  # no flop formula

    graph = capture_inference(Odd(), (torch.randn(8, 8),)).graph
    assert any("no cost formula" in w for w in graph.warnings)
    unknown = [op for op in graph.ops if not op.cost_known]
    assert unknown and all(op.flops > 0 for op in unknown)


def test_capture_errors_are_clear():
    class Bad(torch.nn.Module):
        def forward(self, x):
            raise ValueError("broken forward")

    with pytest.raises(CaptureError, match="torch.export could not capture Bad"):
        capture_inference(Bad(), (torch.randn(2),))
    with pytest.raises(CaptureError, match="could not trace a training step"):
        capture_train_step(torch.nn.Linear(2, 2), (torch.randn(3, 2),))  # returns no scalar loss
