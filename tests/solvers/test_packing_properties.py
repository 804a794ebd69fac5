"""Property tests of the packing solvers on random instances: the independent checker must accept every
packing, every buffer placed and aligned, and the height never below the max-load bound."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memplan.solvers.packing import Problem, Status, make_buffer, max_load, solve, validate
from memplan.solvers.packing.greedy import ORDERINGS, ordering, place
from memplan.solvers.packing.search import Outcome, search
from memplan.solvers.packing.sweep import sweep


@st.composite
def problems(draw: st.DrawFn, max_buffers: int = 14, multi: bool = True, max_size: int = 40) -> Problem:
    n = draw(st.integers(0, max_buffers))
    bufs = []
    for i in range(n):
        k = draw(st.integers(1, 2)) if multi else 1
        cuts = sorted(draw(st.lists(st.integers(0, 30), min_size=2 * k, max_size=2 * k, unique=True)))
        spans = [(cuts[2 * j], cuts[2 * j + 1]) for j in range(k)]
        bufs.append(
            make_buffer(f"b{i}", spans, draw(st.integers(0, max_size)), draw(st.sampled_from([1, 1, 2, 8])))
        )
    return Problem(tuple(bufs), None, draw(st.sampled_from([1, 4])))


def _check(problem: Problem, offsets: tuple[int, ...]) -> int:
    assert validate(problem, offsets) == []
    for i, o in enumerate(offsets):
        assert o % problem.alignment_of(i) == 0
    return max((o + b.size_bytes for o, b in zip(offsets, problem.buffers, strict=True)), default=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_greedy_orderings_pack_validly(problem: Problem) -> None:
    sw = sweep(problem)
    for name in ORDERINGS:
        res = place(problem, ordering(problem, name, sw), sw, name) if problem.buffers else None
        if res is not None:
            assert _check(problem, res.offsets_bytes) == res.height_bytes >= max_load(problem)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_portfolio_minimises_validly(problem: Problem) -> None:
    sol = solve(problem, 0.05)  # byte-exact bisection may use it all; any answer must be valid
    assert sol.offsets_bytes is not None
    height = _check(problem, sol.offsets_bytes)
    assert height == sol.height_bytes >= sol.lower_bound_bytes >= max_load(problem)
    assert (sol.status is Status.OPTIMAL) == (height == sol.lower_bound_bytes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_buffers=7, max_size=10), st.integers(0, 24))
def test_search_is_exact_against_brute_force(problem: Problem, capacity: int) -> None:
    """The search finds a packing iff one exists: checked against exhaustive enumeration of offsets."""
    res = search(problem, capacity, 10.0)
    if res.outcome is Outcome.FOUND:
        assert res.offsets_bytes is not None
        assert _check(problem, res.offsets_bytes) <= capacity
    else:
        assert res.outcome is Outcome.INFEASIBLE
        assert not _brute_force_fits(problem, capacity)


def _brute_force_fits(problem: Problem, capacity: int) -> bool:
    """Depth-first over every aligned offset of every buffer (tiny instances only)."""
    n = len(problem.buffers)
    offs: list[int] = []

    def rec(i: int) -> bool:
        if i == n:
            return not validate(Problem(problem.buffers, capacity, problem.alignment_bytes), offs)
        b, a = problem.buffers[i], problem.alignment_of(i)
        for o in range(0, capacity - b.size_bytes + 1, a):
            offs.append(o)
            ok = not validate(Problem(problem.buffers[: i + 1], None, problem.alignment_bytes), offs)
            if ok and rec(i + 1):
                return True
            offs.pop()
        return False

    return rec(0)
