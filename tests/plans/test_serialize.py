import json
import os

import pytest

from memplan.errors import PlanMismatch
from memplan.files import atomic_write_text
from memplan.ir.hardware import load_hardware
from memplan.passes.baseline import baseline_plan
from memplan.plans.plan import Plan, Workload, fingerprint
from memplan.plans.serialize import load_plan, plan_to_dict, save_plan
from tests.graphs import chain


@pytest.fixture
def plan() -> Plan:
    g = chain([64, 128, 256, 64], param_bytes=512)
    return baseline_plan(
        g, load_hardware("a100-40gb"), Workload("infer", 1, 8), {"device": 4096}, "test:chain"
    )


def test_round_trip(plan, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    back = load_plan(path)
    assert back == plan
    assert plan_to_dict(back) == plan_to_dict(plan)
    assert oct(os.stat(path).st_mode & 0o777) != "0o600"  # not the temp file's private mode


def test_fingerprint_binds_model(plan):
    other = chain([64, 128, 256, 64], param_bytes=1024)
    assert fingerprint(other) != plan.model.fingerprint
    assert fingerprint(plan.graph()) == plan.model.fingerprint


def test_corrupted_file(plan, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    path.write_text(path.read_text()[:-40])
    with pytest.raises(PlanMismatch, match="corrupted plan file"):
        load_plan(path)


def test_other_schema_version(plan, tmp_path):
    d = plan_to_dict(plan)
    d["schema_version"] = 99
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanMismatch, match="schema version 99"):
        load_plan(path)


def test_schema_violation_names_the_field(plan, tmp_path):
    d = plan_to_dict(plan)
    d["tensors"][0]["role"] = "mystery"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanMismatch, match="tensors/0/role"):
        load_plan(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(PlanMismatch, match="no plan file"):
        load_plan(tmp_path / "absent.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PlanMismatch, match="not a memplan plan"):
        load_plan(tmp_path / "list.json")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
