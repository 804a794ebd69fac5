import numpy as np
from hypothesis import given, settings

from memplan.ir.analysis import (
    Interval,
    device_intervals,
    lifetimes,
    live_at,
    peaks,
    persistent_bytes,
    timeline,
    working_set_bound,
)
from memplan.ir.graph import PERSISTENT_ROLES, Graph, Role
from tests.graphs import chain, random_graphs


def test_chain_lifetimes_are_half_open():
    g = chain([10, 20, 30, 40])
    # x (the step's input, held by the caller) lives throughout; v1 produced by op0 and read by op1;
    # v3 is the output, live to the end.
    assert lifetimes(g) == {0: (0, 3), 1: (0, 2), 2: (1, 3), 3: (2, 3)}
    pk = peaks(device_intervals(g), len(g.ops))["device"]
    assert (pk.bytes, pk.step) == (80, 2)  # x (10) + v2 (30) + v3 (40) while op2 runs


def test_parameters_live_throughout():
    g = chain([10, 20, 30], param_bytes=1000)
    assert lifetimes(g)[1] == (0, len(g.ops))
    assert persistent_bytes(g) == 1000


def test_timeline_multi_tier():
    ivs = [Interval(0, "device", 0, 2, 5), Interval(0, "ssd", 2, 4, 5), Interval(1, "device", 1, 4, 7)]
    tl = timeline(ivs, 4)
    assert tl["device"].tolist() == [5, 12, 7, 7]
    assert tl["ssd"].tolist() == [0, 0, 5, 5]
    assert [iv.value_id for iv in live_at(ivs, 1)] == [1, 0]


def test_working_set_bound():
    g = chain([10, 20, 30], param_bytes=4)
    assert working_set_bound(g) == (54, 1)  # op1 reads v1 (20) and w (4) and writes v2 (30)


def _brute_force_live(g: Graph) -> np.ndarray:
    """Live bytes at each step by definition: a storage is live at t if some alias is produced at or before t
    (or exists before op 0) and is read at or after t, or is an output / persistent state."""
    n = max(len(g.ops), 1)
    live = np.zeros(n, dtype=np.int64)
    for root in g.storages():
        members = [v for v in g.values if g.storage_of(v.id) == root.id]
        births = [g.producer(v.id) or 0 for v in members]
        uses = [c for v in members for c in g.consumers(v.id)]
        start = min(births)
        end = max([*uses, *births]) + 1
        if any(v.id in g.outputs for v in members):
            end = n
        if root.role in PERSISTENT_ROLES or root.role == Role.INPUT:
            start, end = 0, n
        live[start:end] += root.size_bytes
    return live


@settings(max_examples=150, deadline=None)
@given(random_graphs())
def test_timeline_matches_definition(g):
    n = len(g.ops)
    tl = timeline(device_intervals(g), n).get("device", np.zeros(n, dtype=np.int64))
    assert tl.tolist() == _brute_force_live(g).tolist()


@settings(max_examples=150, deadline=None)
@given(random_graphs())
def test_bounds_hold(g):
    n = len(g.ops)
    ivs = device_intervals(g)
    pk = peaks(ivs, n).get("device")
    peak = pk.bytes if pk else 0
    ws, _ = working_set_bound(g)
    assert ws <= peak  # an op's operands are all live while it runs
    assert all(0 <= iv.start < iv.end <= n for iv in ivs)
    assert sum(iv.size_bytes for iv in live_at(ivs, pk.step)) == peak if pk else True
