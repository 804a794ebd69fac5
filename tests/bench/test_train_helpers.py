"""The helpers of bench/train.py (not its timings): step comparison, per-block checkpointing, the tracker
under torch.compile, the equal-memory comparison and the Pareto plot."""

from pathlib import Path

import torch
from torch import nn

from bench.train_peers import (
    BenchModel,
    StepTracker,
    checkpointed,
    compare_step,
    level_notes,
    time_rounds,
    write_pareto,
)
from memplan.runtime.tracker import LiveStorageTracker


def test_compare_step_kinds():
    a, g = torch.tensor(1.0), [torch.ones(3), None]
    assert compare_step(a, g, a.clone(), [torch.ones(3), None]) == "bitwise"
    assert compare_step(a + 1e-7, g, a, [torch.ones(3), None]) == "allclose"
    assert compare_step(a, [torch.ones(3) * 2, None], a, g).startswith("DIFFERENT (max |diff| 1")
    assert compare_step(a, [torch.ones(3), torch.ones(1)], a, g) == "DIFFERENT (a gradient is missing)"


def test_checkpointed_same_grads_and_restored():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)]
    model = nn.Sequential(*blocks)
    x = torch.randn(4, 8)

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads()
    with checkpointed(blocks):
        assert all("forward" in vars(b) for b in blocks)
        got = grads()
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    assert not any("forward" in vars(b) for b in blocks)


def test_step_tracker_lets_compiled_code_run():
    from torch._dynamo.utils import counters

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * 2).sum()

    for tracker, graphs in ((LiveStorageTracker, 0), (StepTracker, 1)):
        torch._dynamo.reset()
        counters.clear()
        with tracker(record_timeline=False):
            torch.compile(f, backend="eager")(torch.ones(4))
        assert counters["stats"].get("unique_graphs", 0) == graphs
    torch._dynamo.reset()


def _rows() -> list[dict]:
    def r(method: str, peak: float, ovh: float, knob: str = "k") -> dict:
        return {"model": "m", "method": method, "knob": knob, "peak_MiB": peak, "overhead_%": ovh}

    return [r("plain", 100, 0), r("memplan", 80, 5, "b80"), r("memplan", 60, 20, "b60"),
            {"model": "m", "method": "memplan", "knob": "b50", "lower_bound_bytes": 55 * 2**20},
            r("checkpoint", 70, 30), r("compile", 90, 1), r("compile", 50, 40)]


def test_level_notes_cheapest_point_at_or_below():
    notes, met = level_notes(_rows())
    assert len(notes) == 3
    assert "checkpoint" in notes[0]
    assert "memplan b60 (cheapest point at or below) reaches 60 MiB at +20.0%: lower" in notes[0]
    assert "memplan b80 (cheapest point at or below) reaches 80 MiB at +5.0%: NOT lower" in notes[1]
    assert "no memplan point at or below 50 MiB" in notes[2]
    assert not met
    assert level_notes(_rows()[:5]) == ([notes[0]], True)


def test_level_notes_prefer_the_twin():
    twin = {"model": "m", "method": "memplan", "knob": "t90", "peak_MiB": 89, "overhead_%": 0.5,
            "twin_of": "compile k"}
    notes, met = level_notes([*_rows()[:4], _rows()[5], twin])
    assert notes == ["m, compile k (90 MiB, +1.0%): memplan t90 reaches 89 MiB at +0.5%: lower overhead"]
    assert met
    unreachable = {"model": "m", "method": "memplan", "knob": "t50", "lower_bound_bytes": 55 * 2**20,
                   "twin_of": "compile k"}
    notes, met = level_notes([_rows()[5], unreachable])
    assert notes == ["m, compile k (90 MiB, +1.0%): memplan cannot reach it (lower bound 55 MiB)"] and not met


def test_time_rounds_rotates_the_order():
    order: list[str] = []
    model = BenchModel("m", nn.Linear(2, 1), (torch.ones(1, 2),), ())

    def step(name: str):
        def call(x: torch.Tensor) -> torch.Tensor:
            order.append(name)
            return model.module(x).sum()

        return call

    rounds = time_rounds([(step("a"), model), (step("b"), model), (step("c"), model)], 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(t) for t in rounds.times] == [3, 3, 3] and all(x > 0 for t in rounds.times for x in t)
    assert all(p.grad is None for p in model.params) and rounds.errors == {}


def test_time_rounds_records_a_failing_step_and_goes_on():
    model = BenchModel("m", nn.Linear(2, 1), (torch.ones(1, 2),), ())

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")

    rounds = time_rounds([(model.module, model), (broken, model)], 3)
    assert [len(t) for t in rounds.times] == [3, 0] and rounds.errors == {1: "ValueError('boom')"}


def test_write_pareto(tmp_path: Path):
    path = tmp_path / "p.png"
    write_pareto(_rows(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]

