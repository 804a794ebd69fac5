"""The torchao and compressed-tensors exporters: their structure, names as the model has them, one scheme per
format, and notes on what they cannot express; plus the CLI doors (`plan --bits-limit`, `show`, `export`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import memplan
from memplan.passes.baseline import rebased
from memplan.passes.bitwidth import BitwidthOptions
from memplan.planner.cli import main
from memplan.planner.exporters import EXPORTERS
from memplan.plans.decisions import BitsDecision, Candidate
from memplan.plans.plan import Plan

FORMATS = (
    Candidate("int8", True, "per-channel"), Candidate("int4", False, "per-group", 32),
    Candidate("int4", True, "per-group", 32), Candidate("int3", False, "per-group", 32), Candidate("fp16"),
)  # fmt: skip


@pytest.fixture(scope="module")
def plan() -> Plan:
    """gpt2-tiny with its eight weights in five formats (three left float: ignored / None)."""
    opts = BitwidthOptions(estimator="fisher", size_limit_bytes=10**9)
    base = memplan.plan("zoo:gpt2-tiny", mode="infer", passes=["bitwidth"], options={"bitwidth": opts})
    bits = base.decisions.bits
    assert bits is not None and bits.tensors == ()  # nothing to fit: kept float
    shapes = {v.id: v.shape for v in base.tensors}
    rows = zip(bits.candidates, FORMATS, strict=False)  # the first five weights
    chosen = tuple(c.for_tensor(t.value_id, shapes[t.value_id], True) for t, c in rows)
    return rebased(base.with_(decisions=base.decisions.with_(bits=BitsDecision(chosen, bits.candidates))))


def test_torchao_maps_every_module_by_its_own_name(plan: Plan) -> None:
    doc = json.loads(EXPORTERS["torchao"](plan))
    top = doc["fqn_to_config"]
    assert top["_type"] == "FqnToConfig" and set(top["_data"]) == {"fqn_to_config"}
    fqn = top["_data"]["fqn_to_config"]
    assert len(fqn) == 7 and all(not k.startswith("model.") for k in fqn)  # fp16 one is a cast, not here
    first = fqn["transformer.h.0.attn.c_attn"]
    assert first == {"_type": "Int8WeightOnlyConfig", "_version": 1, "_data": {}}
    asym = fqn["transformer.h.0.attn.c_proj"]["_data"]
    assert asym["weight_dtype"] == {"_type": "torch.dtype", "_data": "int4"}
    assert asym["granularity"]["_data"] == {"group_size": 32}
    assert asym["mapping_type"]["_data"] == "ASYMMETRIC"
    assert fqn["transformer.h.0.mlp.c_fc"]["_data"]["mapping_type"]["_data"] == "SYMMETRIC"
    kept = [f"transformer.h.1.{m}" for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [k for k, v in fqn.items() if v is None] == kept
    assert doc["casts"] == {"transformer.h.1.attn.c_attn": "float16"}
    assert "IntxWeightOnlyConfig(weight_dtype=torch.int3" in doc["python"]
    assert "quantize_(model, config, filter_fn=None)" in doc["python"]
    compile(doc["python"], "torchao_config.py", "exec")
    notes = " ".join(doc["memplan_notes"])
    assert "Conv1D" in notes and "Int4WeightOnlyConfig" in notes and "grid" in notes and "cast" in notes


def test_compressed_tensors_has_one_group_per_scheme(plan: Plan) -> None:
    doc = json.loads(EXPORTERS["compressed-tensors"](plan))
    q = doc["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    groups = q["config_groups"]
    assert len(groups) == 4  # int8 channel, int4 asym, int4 sym, int3 asym
    assert sum(len(g["targets"]) for g in groups.values()) == 4
    schemes = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["symmetric"],
                g["weights"]["group_size"]) for g in groups.values()}  # fmt: skip
    assert schemes == {(8, "channel", True, None), (4, "group", False, 32), (4, "group", True, 32),
                       (3, "group", False, 32)}  # fmt: skip
    for g in groups.values():
        assert g["input_activations"] is None and g["weights"]["type"] == "int"
        assert set(g["weights"]) >= {"num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"}
    assert len(q["ignore"]) == 4 and "transformer.h.1.attn.c_attn" in q["ignore"]  # 3 kept + the fp16 one
    notes = " ".join(doc["memplan_notes"])
    assert "config block only" in notes and "3-bit" in notes and "Conv1D" in notes


def test_a_plan_without_bits_is_refused() -> None:
    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", passes=[])
    for fmt in ("torchao", "compressed-tensors"):
        with pytest.raises(memplan.MemplanError, match="needs a plan made with the bitwidth pass"):
            EXPORTERS[fmt](plan)


def test_cli_plans_shows_and_exports_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    args = ["plan", "zoo:gpt2-tiny", "--passes", "bitwidth,allocate", "--bits-limit", "100KiB",
            "--sensitivity", "fisher", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    plan = memplan.load(out)
    assert plan.decisions.bits is not None and plan.decisions.bits.tensors
    assert main(["show", str(out)]) == 0
    assert "Stored formats (bitwidth)" in capsys.readouterr().out
    assert main(["export", str(out), "--to", "torchao", "-o", str(tmp_path / "ao.json")]) == 0
    assert json.loads((tmp_path / "ao.json").read_text())["fqn_to_config"]["_type"] == "FqnToConfig"
    assert main(["plan", "zoo:gpt2-tiny", "--bits-limit", "1MiB", "-o", str(out)]) == 2
    assert "add it, --passes bitwidth" in " ".join(capsys.readouterr().err.split())
    tight = ["plan", "zoo:gpt2-tiny", "--passes", "bitwidth", "--bits-limit", "1KiB", "--sensitivity",
             "fisher", "-o", str(out)]  # fmt: skip
    assert main(tight) == 3
    assert "below the least any choice of formats reaches" in " ".join(capsys.readouterr().err.split())
