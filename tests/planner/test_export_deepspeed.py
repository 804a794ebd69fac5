"""The deepspeed exporter: valid JSON, DeepSpeed's key names, settings derived from the plan, notes on what
DeepSpeed cannot express."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import memplan
from memplan.errors import InvalidInput
from memplan.ir.analysis import Interval
from memplan.ir.graph import Role
from memplan.planner.exporters import EXPORTERS
from memplan.planner.exporters.deepspeed import deepspeed_config
from memplan.plans.plan import Plan

AC_KEYS = {
    "partition_activations",
    "cpu_checkpointing",
    "contiguous_memory_optimization",
    "number_checkpoints",
    "synchronize_checkpoint_boundary",
    "profile",
}


@pytest.fixture(scope="module")
def swap_plan() -> Plan:
    """gpt2-tiny under 3 MiB on the cpu preset with recomputation switched off: some activations swapped (to
    the SSD tier), none recomputed"""
    from memplan.ir.hardware import load_hardware
    from memplan.passes import remat_swap
    from memplan.passes.manager import run_pipeline
    from memplan.passes.remat_swap import RematSwapOptions
    from memplan.planner.models import capture, load_model
    from memplan.plans.plan import Workload

    graph, _ = capture(load_model("zoo:gpt2-tiny", "train", batch=4, seq=64), "train")
    return run_pipeline(graph, load_hardware("cpu"), Workload("train", 4, 64), 3 * 2**20, "zoo:gpt2-tiny",
                        [remat_swap.PASS], {"remat_swap": RematSwapOptions(allow_recompute=False)})


def with_decisions(plan: Plan, tier: str | None, change: dict[str, str]) -> Plan:
    """The plan with some tensors' decisions replaced (by name) and the swap tier set."""
    remat = plan.decisions.remat
    tensors = tuple(replace(t, decision=change.get(t.name, t.decision)) for t in remat.tensors)
    return plan.with_(decisions=plan.decisions.with_(remat=replace(remat, tier=tier, tensors=tensors)))


def test_registered() -> None:
    assert EXPORTERS["deepspeed"] is deepspeed_config


def test_valid_json_with_keys(swap_plan: Plan) -> None:
    cfg = json.loads(deepspeed_config(swap_plan))
    assert set(cfg["activation_checkpointing"]) == AC_KEYS
    assert cfg["activation_checkpointing"]["number_checkpoints"] == 0
    assert "zero_optimization" not in cfg
    notes = " ".join(cfg["memplan_notes"])
    assert "per-tensor decisions" in notes and "prefetch timing" in notes
    assert "omitted" in notes and "no memplan pass offloads model state" in notes


def test_cpu_checkpointing_iff_swap_to_host(swap_plan: Plan) -> None:
    tier = swap_plan.decisions.remat.tier
    assert tier == "ssd"
    assert json.loads(deepspeed_config(swap_plan))["activation_checkpointing"]["cpu_checkpointing"] is False
    to_host = with_decisions(swap_plan, "host", {})
    assert json.loads(deepspeed_config(to_host))["activation_checkpointing"]["cpu_checkpointing"] is True
    names = [t.name for t in swap_plan.decisions.remat.tensors]
    nothing = with_decisions(swap_plan, "host", dict.fromkeys(names, "keep"))
    cfg = json.loads(deepspeed_config(nothing))
    assert cfg["activation_checkpointing"]["cpu_checkpointing"] is False
    assert any("swaps no activation" in n for n in cfg["memplan_notes"])


def test_number_checkpoints_counts_layers_with_recompute(swap_plan: Plan) -> None:
    tensors = swap_plan.decisions.remat.tensors
    first = {layer: next(t.name for t in tensors if t.layer == layer) for layer in (0, 1)}
    one = with_decisions(swap_plan, "ssd", {first[0]: "recompute"})
    assert json.loads(deepspeed_config(one))["activation_checkpointing"]["number_checkpoints"] == 1
    two = with_decisions(swap_plan, "ssd", {first[0]: "recompute", first[1]: "recompute"})
    cfg = json.loads(deepspeed_config(two))
    assert cfg["activation_checkpointing"]["number_checkpoints"] == 2
    assert any("(0, 1)" in n for n in cfg["memplan_notes"])


def test_offload_only_when_the_plan_offloads_model_state(swap_plan: Plan) -> None:
    param = next(v for v in swap_plan.tensors if v.role == Role.PARAMETER)
    moved = [iv for iv in swap_plan.residency if iv.value_id != param.id]
    moved.append(Interval(param.id, "host", 0, len(swap_plan.ops), param.size_bytes))
    cfg = json.loads(deepspeed_config(swap_plan.with_(residency=tuple(moved))))
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in cfg["zero_optimization"]


def test_inference_plan_is_refused() -> None:
    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", budget="1GiB", batch=1, seq=8)
    with pytest.raises(InvalidInput, match="training plan"):
        deepspeed_config(plan)
