"""A runtime without memplan reads a plan with nothing but `json`: every tensor's tier and offset, and for
every saved activation what happens to it and at which step; and it runs an inference plan at its offsets.

The readers are the ones docs/plan-format.md shows (`peak.py` and `read`), run in a subprocess that never
imports memplan (a driver checks `sys.modules` when they are done), on three real plans: a gpt2-tiny
inference plan with the allocate pass's offsets, and two gpt2-tiny training plans, one that keeps, swaps,
recomputes and splits activations and one that checkpoints whole blocks. What they derive is compared with
the plan as memplan holds it, and with the plan's own residency and events. The inference plan is then run
by plain torch (the `torch.export`-ed model, every storage at its offset in one byte arena) with outputs
bitwise equal to the exported graph's, and a run with every activation on the same bytes is not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from memplan.errors import InfeasibleBudget
from memplan.ir.frontends.torch_export import export_program
from memplan.ir.hardware import Hardware
from memplan.passes.allocate import AllocateOptions
from memplan.passes.manager import run_pipeline
from memplan.passes.registry import default_pipeline
from memplan.passes.remat_swap import RematSwapOptions
from memplan.planner.models import capture, load_model
from memplan.plans.plan import Plan, Workload
from tests.planner.test_plan_format_doc import DOC, python_block

PEAK = python_block(DOC.read_text(), "## Reading a plan without memplan")
READER = python_block(DOC.read_text(), "### Where every tensor is")

DRIVER = """\
import runpy, sys

script = sys.argv.pop(1)  # run it as __main__ on the other arguments, then check what it imported
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
assert "memplan" not in sys.modules, "the reader imported memplan"
"""

ARENA_RUN = '''\
"""Run an exported inference graph with every storage at its planned offset in one byte arena."""
import json, operator, sys

import torch
from torch.utils._pytree import tree_leaves

from where import read

plan_path, program_path, inputs_path = sys.argv[1:]
plan = json.load(open(plan_path))
where, _ = read(plan_path)
tensors = {t["id"]: t for t in plan["tensors"]}
by_name = {t["name"]: t["id"] for t in plan["tensors"]}
ops = {op["id"]: op for op in plan["ops"]}
order = plan["decisions"]["order"]
steps = [ops[i] for i in order["op_ids"]] if order else plan["ops"]
ep = torch.export.load(program_path)
gm, inputs = ep.graph_module, torch.load(inputs_path)
nodes = {n.name: n for n in gm.graph.nodes}
state = {**ep.state_dict, **ep.constants}


def run(collapse):
    """Outputs of the plan's steps in the arena (`collapse`: every activation at offset 0), the reference
    run of the same graph, and the value ids that got a slot."""
    arena = torch.full((plan["predictions"]["arena_bytes"]["device"],), 0xFF, dtype=torch.uint8)  # NaN, -1
    env, args, home, slots = {}, [], {}, set()

    def slot(vid, meta):  # the tensor at arena[offset:offset + bytes], laid out as the graph's `meta`
        ((tier, offset, size, _, _),) = where[vid]  # an inference plan keeps each storage in one place
        assert tier == "device" and offset is not None, (vid, where[vid])
        offset = 0 if collapse and tensors[vid]["role"] == "activation" else offset
        slots.add(vid)
        flat = arena[offset : offset + size].view(meta.dtype)
        return flat.as_strided(meta.shape, meta.stride(), flat.storage_offset() + meta.storage_offset())

    def value(node):
        if node.op == "call_function" and node.target is operator.getitem:
            return value(node.args[0])[node.args[1]]
        return env[node.name]

    user = iter(inputs)
    for spec in ep.graph_signature.input_specs:  # parameters, buffers and inputs: copied in once
        real = next(user) if spec.target is None else state[spec.target]
        args.append(real)
        vid = by_name[spec.target or spec.arg.name]
        meta = nodes[spec.arg.name].meta["val"]
        root = tensors[vid]["alias_of"]  # a tied weight: the same arena tensor as the one it aliases
        env[spec.arg.name] = env[home[root]] if root is not None else slot(vid, meta).copy_(real)
        home[vid] = spec.arg.name
    try:
        for op in steps:
            node = nodes[op["name"]]
            assert str(node.target) == op["target"], (node.name, node.target, op["target"])
            args_, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value)
            result = node.target(*args_, **kwargs)
            multi = isinstance(result, (tuple, list))
            outs, metas = (list(result), node.meta["val"]) if multi else ([result], [node.meta["val"]])
            tensor_positions = [i for i, m in enumerate(metas) if isinstance(m, torch.Tensor)]
            for i, vid in zip(tensor_positions, op["outputs"], strict=True):
                if tensors[vid]["alias_of"] is None and tensors[vid]["size_bytes"] > 0:  # else: a view
                    outs[i] = slot(vid, metas[i]).copy_(outs[i])  # its bytes now live in the arena
            env[node.name] = outs if multi else outs[0]
        out = [t.clone() for t in tree_leaves(torch.fx.node.map_arg(gm.graph.output_node().args, value))]
    except (RuntimeError, IndexError) as e:  # garbage read as indices
        out = [repr(e)]
    return out, tree_leaves(gm(*args)), slots


with torch.no_grad():
    out, ref, slots = run(collapse=False)
    bad, _, _ = run(collapse=True)


def same(a, b):
    return len(a) == len(b) and all(isinstance(x, torch.Tensor) and torch.equal(x, y) for x, y in zip(a, b))


equal, collapsed = same(out, ref), same(bad, ref)
print(json.dumps({"equal": equal, "outputs": len(ref), "slots": sorted(slots), "collapsed_equal": collapsed}))
'''


def foreign(folder: Path, script: str, *args: str) -> str:
    """Run `script` of `folder` in a fresh interpreter through the driver; its stdout."""
    done = subprocess.run(
        [sys.executable, "driver.py", script, *args], capture_output=True, text=True, cwd=folder, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("foreign")
    scripts = {"driver.py": DRIVER, "peak.py": PEAK, "where.py": READER, "arena.py": ARENA_RUN}
    for name, code in scripts.items():
        (d / name).write_text(code)
    return d


@pytest.fixture(scope="module")
def infer(folder: Path) -> tuple[Plan, Path]:
    """The inference plan of the doc's example, saved; and the real model, exported, with its inputs."""
    plan = memplan.plan("zoo:gpt2-tiny", mode="infer", batch=1, seq=16, budget="1GiB")
    plan.save(str(folder / "infer.json"))
    loaded = load_model("zoo:gpt2-tiny", "infer", batch=1, seq=16, device="cpu")
    assert loaded.module is not None
    with torch.no_grad():
        program = export_program(loaded.module.eval(), loaded.example_inputs)
    torch.export.save(program, folder / "program.pt2")
    torch.save(tuple(loaded.example_inputs), folder / "inputs.pt")
    return plan, folder / "infer.json"


@pytest.fixture(scope="module")
def train_plans(folder: Path, link_bound_hw: Hardware) -> dict[str, tuple[Plan, Path]]:
    """gpt2-tiny training plans on a slow host link: at 65 % of the plain peak (keep, swap, recompute,
    split), and checkpointing every block at the lowest budget that allows (block members)."""
    graph, _ = capture(load_model("zoo:gpt2-tiny", "train", batch=4, seq=64), "train")
    work = Workload("train", 4, 64)
    plain = run_pipeline(graph, link_bound_hw, work, 2**40, "zoo:gpt2-tiny", [])
    greedy = {"allocate": AllocateOptions(exact=False)}  # offsets in milliseconds: any valid packing will do
    budget = int(plain.predictions.peak_bytes["device"] * 0.65)
    split = run_pipeline(graph, link_bound_hw, work, budget, "zoo:gpt2-tiny", default_pipeline(), greedy)
    opts = {"remat_swap": RematSwapOptions(checkpoint_blocks=True), **greedy}
    with pytest.raises(InfeasibleBudget) as err:
        run_pipeline(graph, link_bound_hw, work, 1, "zoo:gpt2-tiny", default_pipeline(), opts)
    blocks = run_pipeline(
        graph, link_bound_hw, work, err.value.lower_bound_bytes, "zoo:gpt2-tiny", default_pipeline(), opts
    )
    out = {}
    for name, plan in (("split", split), ("blocks", blocks)):
        plan.save(str(folder / f"{name}.json"))
        out[name] = (plan, folder / f"{name}.json")
    return out


@pytest.fixture(params=["infer", "split", "blocks"])
def any_plan(request: pytest.FixtureRequest) -> tuple[Plan, Path]:
    if request.param == "infer":
        return request.getfixturevalue("infer")
    return request.getfixturevalue("train_plans")[request.param]


def read_foreign(folder: Path, path: Path) -> tuple[dict[int, list[Any]], dict[int, dict[str, Any]]]:
    got = json.loads(foreign(folder, "where.py", str(path)))
    return {int(k): v for k, v in got["where"].items()}, {int(k): v for k, v in got["remat"].items()}


def test_the_readers_import_no_memplan() -> None:
    assert "memplan" not in PEAK and "memplan" not in READER
    assert not re.search(r"^\s*(import|from)\s+memplan", ARENA_RUN, re.M)
    assert len(PEAK.strip().splitlines()) <= 20


def test_peak_reader(folder: Path, infer: tuple[Plan, Path]) -> None:
    plan, path = infer
    out = foreign(folder, "peak.py", str(path)).splitlines()
    step = plan.predictions.peak_step["device"]
    assert out[0] == (
        f"device peak {plan.predictions.peak_bytes['device']} bytes at step {step} "
        f"({plan.graph().ops[step].name})"
    )
    assert len(out) == 11
    by_name = {v.name: v for v in plan.tensors}
    sizes = [int(line.split()[0]) for line in out[1:]]
    assert sizes == sorted(sizes, reverse=True)
    for line, size in zip(out[1:], sizes, strict=True):
        assert by_name[line.split()[-1]].size_bytes == size


def test_every_tensor_tier_and_offset(folder: Path, any_plan: tuple[Plan, Path]) -> None:
    plan, path = any_plan
    where, _ = read_foreign(folder, path)
    graph = plan.graph()
    assert set(where) == {v.id for v in plan.tensors}
    for v in plan.tensors:
        root = graph.storage_of(v.id)
        expected = sorted(
            [iv.tier, plan.offsets[iv.tier][root], iv.size_bytes, iv.start, iv.end]
            for iv in plan.residency
            if iv.value_id == root
        )
        assert where[v.id] == expected, v.name
    # what a runtime relies on: storages live on one tier at one step have disjoint bytes
    spans = {(vid, *s) for vid, ss in where.items() for s in ss if graph.storage_of(vid) == vid}
    by_tier: dict[str, list[tuple[int, int, int, int, int]]] = defaultdict(list)
    for vid, tier, offset, size, start, end in spans:
        by_tier[tier].append((start, end, offset, offset + size, vid))
    for tier, items in by_tier.items():
        items.sort()
        for i, (_, e, lo, hi, vid) in enumerate(items):
            for s2, _, lo2, hi2, vid2 in items[i + 1 :]:
                if s2 >= e:
                    break
                assert vid2 == vid or hi <= lo2 or hi2 <= lo, (tier, vid, vid2)
        assert max(hi for *_, hi, _ in items) <= plan.predictions.arena_bytes[tier]


def _device_spans(t: Any, actions: list[list[Any]]) -> list[tuple[int, int]]:
    """The device intervals the actions imply: from `produced`, ended by a free, resumed by a read-back or
    a rebuild (the first of them), to after `last_use` if nothing ends it."""
    spans, start = [], t.produced
    for step, what, _ in actions:
        if what in ("free-device-copy", "free"):
            spans.append((start, step))
            start = None
        elif what in ("read", "recompute", "block-rerun") and start is None:
            start = step
    if start is not None:
        spans.append((start, t.last_use + 1))
    return spans


@pytest.mark.parametrize("name", ["split", "blocks"])
def test_every_saved_activation_decision_and_steps(
    folder: Path, train_plans: dict[str, tuple[Plan, Path]], name: str
) -> None:
    plan, path = train_plans[name]
    _, actions = read_foreign(folder, path)
    remat = plan.decisions.remat
    assert remat is not None and remat.tier == "host"
    assert set(actions) == {t.value_id for t in remat.tensors}
    kinds = {(t.decision, t.block is not None) for t in remat.tensors}
    every = {(d, False) for d in ("keep", "swap", "recompute", "split")}
    assert kinds >= (every if name == "split" else {("recompute", True)})  # the reader's every branch
    device, tier = defaultdict(list), defaultdict(list)
    for iv in plan.residency:
        (device if iv.tier == "device" else tier)[iv.value_id].append(iv)
    events = defaultdict(set)
    for e in plan.events:
        if e.kind != "compute":
            events[e.value_id].add((e.kind, e.step, e.src_tier, e.dst_tier))
    step_of = {op.id: k for k, op in enumerate(plan.graph().ops)}
    rebuild = {b.layer: b.rebuild_step for b in remat.blocks}
    for t in remat.tensors:
        got = actions[t.value_id]
        assert got["decision"] == t.decision, t.name
        acts = got["actions"]
        assert [a[0] for a in acts] == sorted(a[0] for a in acts), t.name  # in step order
        assert sorted((iv.start, iv.end) for iv in device[t.value_id]) == _device_spans(t, acts), t.name
        want = set()
        for step, what, detail in acts:
            if what == "write":
                want.add(("swap_out", step, "device", remat.tier))
                swapped = t.size_bytes if detail[1] is None else t.size_bytes // t.rows * detail[1]
                assert [(iv.tier, iv.start, iv.end, iv.size_bytes) for iv in tier[t.value_id]] == [
                    (remat.tier, t.produced, t.first_bwd_use + 1, swapped)
                ], t.name
            elif what == "read":
                want.add(("prefetch", step, remat.tier, "device"))
            elif what == "recompute":
                want.add(("recompute", step, None, None))
                assert detail == [step_of[i] for i in t.recompute_ops] and detail, t.name
            elif what == "block-rerun":
                want.add(("recompute", step, None, None))
                assert step == rebuild[t.block], t.name
        assert events[t.value_id] == want, t.name
        assert (t.value_id in tier) == (t.decision in ("swap", "split")), t.name


def test_arena_plan_runs_at_its_offsets(folder: Path, infer: tuple[Plan, Path]) -> None:
    plan, path = infer
    got = json.loads(foreign(folder, "arena.py", str(path), "program.pt2", "inputs.pt"))
    assert got["equal"] and got["outputs"] >= 1
    assert got["slots"] == sorted(plan.offsets["device"])  # every planned storage was placed, and only those
    assert not got["collapsed_equal"]  # the check has teeth: overlapping activations break the run


def test_doc_example_is_an_excerpt_of_this_plan(infer: tuple[Plan, Path]) -> None:
    """Every item of docs/plan-format.md's example is in the plan it names (times and this machine's
    hardware aside)."""
    example = json.loads(re.search(r"```json\n(.*?)```", DOC.read_text(), re.S).group(1))  # type: ignore[union-attr]
    real = json.loads(infer[1].read_text())
    for key in ("schema_version", "model", "workload", "outputs", "predictions"):
        assert example[key] == real[key], key
    assert example["budget_bytes"]["device"] == real["budget_bytes"]["device"]
    for key in ("tensors", "ops", "residency", "events"):
        assert all(item in real[key] for item in example[key]), key
    assert example["offsets"]["device"].items() <= real["offsets"]["device"].items()

    def untimed(d: dict[str, Any]) -> dict[str, Any]:
        alloc = d["allocate"]
        packings = [{k: v for k, v in p.items() if k != "time_s"} for p in alloc["packings"]]
        return {**d, "allocate": {**alloc, "packings": packings}}

    assert untimed(example["decisions"]) == untimed(real["decisions"])
    assert [p["name"] for p in example["passes"]] == [p["name"] for p in real["passes"]]
    assert [p["notes"] for p in example["passes"]] == [p["notes"] for p in real["passes"]]
