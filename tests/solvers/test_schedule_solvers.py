"""The scheduling solvers on small random graphs: orders are topological, replacements never read a tensor
that is not resident and stay under the capacity, a graph that fits moves nothing, Belady is the baseline
nothing returned is worse than, and the exact methods reach the optimum brute force finds."""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memplan.errors import InfeasibleBudget
from memplan.solvers.schedule_milp import solve_replacement
from memplan.solvers.schedule_problem import (
    ScheduleProblem,
    belady,
    check_order,
    check_replacement,
    need_bound,
    peak,
    replay,
    use_steps,
)
from memplan.solvers.schedule_solve import ScheduleOptions, solve_schedule


@st.composite
def problems(draw: st.DrawFn, max_ops: int = 6) -> ScheduleProblem:
    """A random DAG: 1-2 initial tensors, each op reads 1-2 earlier tensors and makes one; some kept."""
    n_init = draw(st.integers(1, 2))
    sizes = [draw(st.integers(1, 8)) for _ in range(n_init)]
    initial, keep = [True] * n_init, [False] * n_init
    uses, writes, preds, made_by = [], [], [], {}
    for v in range(draw(st.integers(2, max_ops))):
        ins = sorted(set(draw(st.lists(st.integers(0, len(sizes) - 1), min_size=1, max_size=2))))
        t = len(sizes)
        sizes.append(draw(st.integers(1, 8)))
        initial.append(False)
        keep.append(draw(st.booleans()) and draw(st.booleans()))
        uses.append((*ins, t))
        writes.append((t,))
        preds.append(tuple(sorted({made_by[i] for i in ins if i in made_by})))
        made_by[t] = v
    return ScheduleProblem(
        tuple(sizes), tuple(uses), tuple(writes), tuple(preds), tuple(initial), tuple(keep)
    )


def _orders(p):
    def rec(done, order):
        if len(order) == p.n_ops:
            yield list(order)
            return
        for v in range(p.n_ops):
            if v not in done and all(u in done for u in p.preds[v]):
                done.add(v)
                order.append(v)
                yield from rec(done, order)
                order.pop()
                done.remove(v)

    yield from rec(set(), [])


def _best_replacement(p, order, cap):
    steps = use_steps(p, order)
    gaps = [(t, i) for t, s in enumerate(steps) for i in range(len(s) - 1)]
    best = None
    for bits in itertools.product([False, True], repeat=len(gaps)):
        rep = replay(p, order, dict(zip(gaps, bits, strict=True)))
        try:
            check_replacement(p, order, cap, rep)
        except Exception:
            continue
        best = rep.moved_bytes if best is None else min(best, rep.moved_bytes)
    return best


def _capacity(p, share):
    return max(need_bound(p)[0], int(peak(p, list(range(p.n_ops)), "capacity") * share))


FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(problems(), st.sampled_from([0.4, 0.6, 0.8]))
def test_belady_is_valid_and_never_reads_a_missing_tensor(p, share):
    cap = _capacity(p, share)
    order = list(range(p.n_ops))
    rep = belady(p, order, cap)
    check_replacement(p, order, cap, rep)
    assert rep.moved_bytes >= 0 and rep.peak_bytes <= cap


@FAST
@given(problems(max_ops=5), st.sampled_from([0.4, 0.7]))
def test_exact_solve_matches_brute_force(p, share):
    cap = _capacity(p, share)
    brute = min(_best_replacement(p, o, cap) for o in _orders(p))
    res = solve_schedule(p, cap, ScheduleOptions(time_limit_s=20))
    check_order(p, res.order)
    check_replacement(p, res.order, cap, res.replacement)
    assert res.replacement.moved_bytes == brute
    assert res.status == "optimal" and res.gap == 0.0
    assert res.replacement.moved_bytes <= res.baseline.moved_bytes


@FAST
@given(problems(max_ops=6))
def test_lowest_peak_order_matches_brute_force(p):
    res = solve_schedule(p, None, ScheduleOptions(time_limit_s=20))
    check_order(p, res.order)
    assert res.peak_bytes == min(peak(p, o) for o in _orders(p))
    assert res.status == "optimal" and res.bound <= res.peak_bytes + 1e-6


@FAST
@given(problems(max_ops=6), st.sampled_from([0.5, 0.8]))
def test_replacement_milp_is_optimal_for_its_order(p, share):
    cap = _capacity(p, share)
    order = list(range(p.n_ops))
    rr = solve_replacement(p, order, cap, 20, belady(p, order, cap))
    assert rr.replacement.moved_bytes == _best_replacement(p, order, cap)


@FAST
@given(problems())
def test_a_graph_that_fits_moves_nothing(p):
    cap = peak(p, list(range(p.n_ops)), "capacity")
    res = solve_schedule(p, cap)
    assert res.replacement.moved_bytes == 0 and res.baseline.moved_bytes == 0
    assert res.replacement.traffic_bytes == res.replacement.compulsory_bytes


def test_compulsory_traffic_is_first_loads_and_stores_of_outputs():
    # w (initial, 4 B) -> op0 -> a (2 B, kept) ; a -> op1 -> b (3 B)
    p = ScheduleProblem((4, 2, 3), ((0, 1), (1, 2)), ((1,), (2,)), ((), (0,)), (True, False, False),
                        (False, True, False))  # fmt: skip
    rep = belady(p, [0, 1], 10)
    assert rep.compulsory_bytes == 4 + 2 and rep.moved_bytes == 0


def test_capacity_below_one_op_names_the_op_and_its_tensors():
    p = ScheduleProblem((4, 6), ((0, 1),), ((1,),), ((),), (True, False), (False, True),
                        tensor_names=("w", "y"), op_names=("mm (aten.mm)",))  # fmt: skip
    with pytest.raises(InfeasibleBudget, match=r"mm \(aten.mm\) alone needs on the device: 10 bytes") as e:
        solve_schedule(p, 9)
    assert e.value.lower_bound_bytes == 10 and "y (6 bytes)" in e.value.tensors[0]


def test_repeated_regions_are_solved_once_and_reused():
    # four identical layers: two branches of a big then a small tensor, joined; captured with both bigs live
    sizes, uses, writes, preds, groups, keys = [8], [], [], [], [], []
    prev_t, prev_op = 0, None
    for layer in range(4):
        o = len(uses)
        p1, p2, q1, q2, d = (len(sizes) + i for i in range(5))
        sizes += [16, 16, 2, 2, 8]
        uses += [(prev_t, p1), (prev_t, p2), (p1, q1), (p2, q2), (q1, q2, d)]
        writes += [(p1,), (p2,), (q1,), (q2,), (d,)]
        first = () if prev_op is None else (prev_op,)
        preds += [first, first, (o,), (o + 1,), (o + 2, o + 3)]
        groups += [layer] * 5
        keys += ["f", "g", "h", "k", "add"]
        prev_t, prev_op = d, o + 4
    n = len(sizes)
    p = ScheduleProblem(tuple(sizes), tuple(uses), tuple(writes), tuple(preds), (True,) + (False,) * (n - 1),
                        (False,) * (n - 1) + (True,), groups=tuple(groups), keys=tuple(keys))  # fmt: skip
    res = solve_schedule(p, None, ScheduleOptions(exact_ops=5, region_ops=5))
    check_order(p, res.order)
    # the first layer reads the input (live to the end), the other three the previous layer's output
    assert "4 regions (2 reused, 2 solved exactly)" in res.notes[0]
    # x, the previous output and both bigs, against x, the previous output, one big and one small
    assert res.captured_peak_bytes == 8 + 8 + 16 + 16 and res.peak_bytes == 8 + 8 + 16 + 2
