from dataclasses import replace

from memplan.ir.analysis import Interval
from memplan.ir.hardware import load_hardware
from memplan.passes.baseline import baseline_plan
from memplan.plans.plan import Event, Workload
from memplan.plans.verify import verify_plan
from tests.graphs import chain


def _plan(budget=10**6):
    g = chain([64, 128, 256, 64])
    return baseline_plan(
        g, load_hardware("a100-40gb"), Workload("infer", 1), {"device": budget, "ssd": 10**9}, "t"
    )


def _kinds(plan):
    return {v.kind for v in verify_plan(plan).violations}


def test_baseline_is_valid():
    assert verify_plan(_plan()).ok


def test_over_capacity():
    assert _kinds(_plan(budget=100)) == {"over-capacity"}


def test_use_before_def():
    p = _plan()
    res = tuple(iv for iv in p.residency if iv.value_id != 2)  # v2 never on the device
    assert "use-before-def" in _kinds(p.with_(residency=res))


def test_swap_needs_an_arrival_event():
    p = _plan()
    # v1 (id 1) produced at 0, used at 1; move it to ssd for step 1 and back -> needs an arrival at step 1.
    res = [iv for iv in p.residency if iv.value_id != 1]
    res += [Interval(1, "device", 0, 1, 128), Interval(1, "ssd", 1, 2, 128), Interval(1, "device", 1, 2, 128)]
    p2 = p.with_(residency=tuple(res))
    assert "prefetch-late" in _kinds(p2)
    fixed = p2.with_(events=(*p2.events, Event("prefetch", 1, value_id=1, src_tier="ssd", dst_tier="device")))
    assert "prefetch-late" not in _kinds(fixed)


def test_offsets_overlap_and_bounds():
    p = _plan()
    pred = replace(p.predictions, arena_bytes={"device": 1000})
    overlapping = p.with_(offsets={"device": {0: 0, 1: 32, 2: 0, 3: 0}}, predictions=pred)
    assert "overlap" in _kinds(overlapping)
    disjoint = p.with_(offsets={"device": {0: 0, 1: 64, 2: 192, 3: 64}}, predictions=pred)
    assert _kinds(disjoint) == set()  # 1 and 3 share bytes but are never live together
    out = p.with_(offsets={"device": {0: 0, 1: 64, 2: 900, 3: 0}}, predictions=pred)
    assert "offset-bounds" in _kinds(out)


def test_bad_references():
    p = _plan()
    bad = p.with_(
        residency=(*p.residency, Interval(99, "device", 0, 1, 8)), events=(*p.events, Event("compute", 50))
    )
    assert "bad-reference" in _kinds(bad)
