"""The torch-sac exporter: the generated module runs without memplan, wraps real GPT-2 blocks, gives the same
loss and gradients as the plain step, and its policy meets exactly the ops the plan lists."""

from __future__ import annotations

import importlib.util
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.ir.hardware import load_hardware
from memplan.ir.phases import phases
from memplan.passes import remat_swap
from memplan.passes.manager import run_pipeline
from memplan.passes.remat_swap import RematSwapOptions
from memplan.planner.exporters import EXPORTERS
from memplan.planner.exporters.torch_sac import checkpoint_layers, sac_table, torch_sac
from memplan.planner.models import capture, load_model
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan, Workload
from memplan.zoo import catalog as zoo

BATCH, SEQ = 4, 64


@pytest.fixture(scope="module")
def recompute_plan() -> Plan:
    """gpt2-tiny under 4 MiB with recompute only: both blocks recompute some saved activations."""
    loaded = load_model("zoo:gpt2-tiny", "train", batch=BATCH, seq=SEQ)
    graph, _ = capture(loaded, "train", "none")
    workload = Workload("train", BATCH, SEQ)
    return run_pipeline(
        graph,
        load_hardware("cpu"),
        workload,
        4 * 2**20,
        "zoo:gpt2-tiny",
        [remat_swap.PASS],
        options={"remat_swap": RematSwapOptions(allow_swap=False)},
    )


def load_module(text: str, tmp_path: Path) -> types.ModuleType:
    path = tmp_path / "sac_policy.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("sac_policy", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    entry = zoo.get("gpt2-tiny")
    model.train()
    loss = entry.loss(model, *entry.example_inputs(BATCH, SEQ, "cpu", "train"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_registered() -> None:
    assert EXPORTERS["torch-sac"] is torch_sac


def test_table_follows_the_plan(recompute_plan: Plan) -> None:
    table = sac_table(recompute_plan)
    graph = recompute_plan.graph()
    assert sorted(table) == [0, 1]
    by_op: dict[int, set[str]] = {}
    for t in recompute_plan.decisions.remat.tensors:
        by_op.setdefault(graph.producer(t.value_id), set()).add(t.decision)
    checked = 0
    for i, decisions in by_op.items():
        op = graph.ops[i]
        if op.layer is None:
            continue
        key = (op.target, [o.target for o in graph.ops[:i] if o.layer == op.layer].count(op.target))
        assert table[op.layer][key] == ("recompute" if "recompute" in decisions else "save")
        checked += 1
    assert checked > 10
    fwd_end = phases(graph).fwd_end
    n_forward = sum(o.layer is not None and o.target != "aten.detach.default" for o in graph.ops[:fwd_end])
    assert sum(len(e) for e in table.values()) == n_forward
    assert checkpoint_layers(recompute_plan) == [0, 1]


def test_generated_module_matches_plain_step(recompute_plan: Plan, tmp_path: Path) -> None:
    sac = load_module(torch_sac(recompute_plan), tmp_path)
    entry = zoo.get("gpt2-tiny")
    loss0, grads0 = train_step(entry.build("cpu"))
    model = entry.build("cpu")
    sac.install(model.transformer.h)
    loss1, grads1 = train_step(model)
    assert torch.allclose(loss0, loss1, atol=1e-6, rtol=0)
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        assert torch.allclose(g, grads1[name], atol=1e-6, rtol=0), name
    assert sac.STATS["save"] > 0 and sac.STATS["recompute"] > 0
    assert sac.STATS["unlisted"] == 0  # every op SAC met is one the plan lists...
    listed = sum(len(sac.POLICY[layer]) for layer in sac.CHECKPOINT_LAYERS)
    assert sac.STATS["save"] + sac.STATS["recompute"] == listed  # ...and each exactly once per forward


def with_remat(plan: Plan, tier: str | None, tensors: tuple[TensorRemat, ...]) -> Plan:
    """The plan with its remat tensors and swap tier replaced."""
    remat = replace(plan.decisions.remat, tier=tier, tensors=tensors)
    return plan.with_(decisions=plan.decisions.with_(remat=remat))


def test_module_does_not_import_memplan(recompute_plan: Plan) -> None:
    text = torch_sac(recompute_plan)
    compile(text, "sac_policy.py", "exec")
    assert "import memplan" not in text and "from memplan" not in text


def test_block_without_recompute_runs_plain(recompute_plan: Plan, tmp_path: Path) -> None:
    tensors = tuple(
        replace(t, decision="keep", recompute_ops=()) if t.layer == 1 else t
        for t in recompute_plan.decisions.remat.tensors
    )
    plan = with_remat(recompute_plan, None, tensors)
    sac = load_module(torch_sac(plan), tmp_path)
    block = zoo.get("gpt2-tiny").build("cpu").transformer.h[1]
    assert sac.CHECKPOINT_LAYERS == [0]
    assert sac.wrap_block(block, 1) == block.forward


def test_swapped_tensors_are_saved_and_listed(recompute_plan: Plan) -> None:
    tensors = recompute_plan.decisions.remat.tensors
    kept = next(t for t in tensors if t.decision == "keep" and t.layer == 0)
    swapped = tuple(replace(t, decision="swap") if t is kept else t for t in tensors)
    plan = with_remat(recompute_plan, "host", swapped)
    text = torch_sac(plan)
    listing = text.split("saved on the device here (SAC cannot swap):")[1].split("Outside")[0]
    assert kept.name in listing
    assert sac_table(plan) == sac_table(recompute_plan)


def test_inference_plan_is_refused() -> None:
    import memplan

    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", budget="1GiB", batch=1, seq=8)
    with pytest.raises(InvalidInput, match="training plan"):
        torch_sac(plan)
