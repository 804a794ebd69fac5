"""Packing on real traces: the sweep's piece form against brute force, the iterated greedy, a real-trace
slice within 1.01x of its bound, the corpus CSV round trip, and `memplan alloc` starting without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.allocate_traces import read_trace, render_multi
from memplan.solvers.packing import PortfolioOptions, Problem, csv_format, make_buffer, solve, validate
from memplan.solvers.packing.greedy import ordering, place_with, placer, squeaky
from memplan.solvers.packing.sweep import lower_bound, sweep

DATA = Path(__file__).resolve().parents[1] / "data"


@st.composite
def problems(draw: st.DrawFn, max_buffers: int = 16) -> Problem:
    n = draw(st.integers(1, max_buffers))
    bufs = []
    for i in range(n):
        k = draw(st.integers(1, 3))
        cuts = sorted(draw(st.lists(st.integers(0, 40), min_size=2 * k, max_size=2 * k, unique=True)))
        spans = [(cuts[2 * j], cuts[2 * j + 1]) for j in range(k)]
        bufs.append(make_buffer(f"b{i}", spans, draw(st.integers(0, 50)), draw(st.sampled_from([1, 1, 4]))))
    return Problem(tuple(bufs), None, draw(st.sampled_from([1, 8, 64])))


def _brute_bound(problem: Problem) -> int:
    """The alignment-tightened max load, section by section from every buffer's lifespans."""
    a = problem.alignment_bytes
    times = sorted({t for b in problem.buffers for span in b.lifespans for t in span})
    best = 0
    for t in times[:-1]:
        live = [b for b in problem.buffers if any(lo <= t < hi for lo, hi in b.lifespans)]
        rounded = [-(-b.size_bytes // a) * a for b in live]
        slack = max((r - b.size_bytes for r, b in zip(rounded, live, strict=True)), default=0)
        best = max(best, sum(rounded) - slack)
    return best


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_sweep_pieces_loads_and_bound_match_brute_force(problem: Problem) -> None:
    sw = sweep(problem)
    assert lower_bound(problem, sw) == _brute_bound(problem)
    peak = sw.peak_load()
    for i, cov in enumerate(sw.covers):
        assert peak[i] == sw.load[cov].max()
        assert sw.first[i] == cov[0] and sw.last[i] == cov[-1] + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["size", "start", "load"]))
def test_squeaky_packs_validly_and_never_worse(problem: Problem, name: str) -> None:
    pl = placer(problem)
    order = ordering(problem, name, pl.sw)
    start = place_with(pl, order, name)
    res = squeaky(pl, start, order, lower_bound(problem, pl.sw), float("inf"))
    assert validate(problem, res.offsets_bytes) == []
    assert lower_bound(problem, pl.sw) <= res.height_bytes <= start.height_bytes


def test_real_trace_within_one_percent_without_search() -> None:
    """MindSpore's ResNet-50 trace, greedy and iterated greedy only (as on traces too large to search)."""
    problem, _ = csv_format.read(DATA / "idealloc" / "resnet50.csv")
    sol = solve(problem, 10.0, options=PortfolioOptions(exact_max_buffers=0))
    assert sol.offsets_bytes is not None and validate(problem, sol.offsets_bytes) == []
    assert sol.lower_bound_bytes <= sol.height_bytes <= 1.01 * sol.lower_bound_bytes


def test_real_trace_slice_reaches_bound() -> None:
    """The first 300 buffers of the ResNet-50 trace: the portfolio proves its packing optimal."""
    full, _ = csv_format.read(DATA / "idealloc" / "resnet50.csv")
    problem = Problem(full.buffers[:300])
    sol = solve(problem, 10.0)
    assert sol.offsets_bytes is not None and validate(problem, sol.offsets_bytes) == []
    assert sol.height_bytes == sol.lower_bound_bytes


def test_corpus_csv_round_trip_keeps_several_residencies(tmp_path: Path) -> None:
    problem = Problem(
        (make_buffer("7", [(0, 3), (5, 9)], 128, 64), make_buffer("8", [(2, 6)], 100, 64)), None, 64
    )
    path = tmp_path / "t.csv"
    path.write_text(render_multi(problem))
    back = read_trace(path)
    assert [(b.id, b.lifespans, b.size_bytes) for b in back.buffers] == [
        (b.id, b.lifespans, b.size_bytes) for b in problem.buffers
    ]
    assert back.alignment_bytes == 64


def test_alloc_command_imports_no_torch(tmp_path: Path) -> None:
    """`memplan alloc`, start-up included, solves a MiniMalloc file without importing torch."""
    out = tmp_path / "sol.csv"
    code = (
        "import sys; from memplan.planner.cli import main; "
        f"rc = main(['alloc', {str(DATA / 'minimalloc' / 'F.1048576.csv')!r}, '--capacity', '1048576', "
        f"'--timeout', '10', '-o', {str(out)!r}]); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    problem, offsets = csv_format.read(out, 1048576)
    assert offsets is not None and validate(problem, offsets) == []
    assert max(np.asarray(offsets) + [b.size_bytes for b in problem.buffers]) <= 1048576
