"""The timeline plot: a real PNG, written atomically, whose stacked numbers are the plan's timeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from memplan.ir.analysis import Interval, timeline
from memplan.ir.graph import Role
from memplan.planner.plot import ROLES, plot_timeline, role_timelines, sample_steps
from memplan.plans.plan import Plan
from tests.planner.conftest import host_midlife

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plan(train_plan: Plan) -> Plan:
    return train_plan


@pytest.fixture(scope="module")
def two_tiers(plan: Plan) -> Plan:
    """The largest activation moved to the host for the middle of its life."""
    return host_midlife(plan)[0]


def test_png_written_atomically(plan: Plan, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "timeline.png"
    plot_timeline(plan, str(out))
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["timeline.png"]
    plot_timeline(plan, str(out))
    assert [p.name for p in out.parent.iterdir()] == ["timeline.png"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(
    plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "timeline.png"
    out.write_bytes(b"old")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_timeline(plan, str(out))
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.png"]


def test_one_subplot_per_tier(plan: Plan, two_tiers: Plan, tmp_path: Path) -> None:
    plot_timeline(plan, str(tmp_path / "one.png"))
    plot_timeline(two_tiers, str(tmp_path / "two.png"))
    one, two = imread(tmp_path / "one.png"), imread(tmp_path / "two.png")
    assert one.shape[1] == two.shape[1] and two.shape[0] > 1.5 * one.shape[0]


def test_role_stacks_add_up_to_the_timeline(two_tiers: Plan) -> None:
    tls = role_timelines(two_tiers)
    ref = timeline(two_tiers.residency, len(two_tiers.ops))
    assert [t.tier for t in tls] == ["device", "host"]
    for tl in tls:
        np.testing.assert_array_equal(tl.total, ref[tl.tier])
    device, host = tls
    assert int(device.total.max()) <= two_tiers.predictions.peak_bytes["device"]  # stale: the all-device peak
    host_iv = next(iv for iv in two_tiers.residency if iv.tier == "host")
    assert int(host.by_role[ROLES.index(Role.ACTIVATION)].max()) == host_iv.size_bytes
    assert int(host.total[host_iv.start - 1]) == 0 and int(host.total[host_iv.end]) == 0
    by_id = {v.id: v for v in two_tiers.tensors}
    params = sum(
        iv.size_bytes
        for iv in two_tiers.residency
        if iv.tier == "device" and by_id[iv.value_id].role == Role.PARAMETER and iv.start == 0
    )
    assert int(device.by_role[ROLES.index(Role.PARAMETER), 0]) == params


def test_baseline_peak_matches_prediction(plan: Plan) -> None:
    (device,) = role_timelines(plan)
    assert int(device.total.max()) == plan.predictions.peak_bytes["device"]
    assert int(np.argmax(device.total)) == plan.predictions.peak_step["device"]


def test_sampling_keeps_the_peak() -> None:
    rng = np.random.default_rng(0)
    total = rng.integers(0, 1000, size=100_000)
    total[77_777] = 5000
    steps = sample_steps(total, max_points=500)
    assert len(steps) <= 500 and 77_777 in steps and np.all(np.diff(steps) > 0)
    assert sample_steps(total[:300], max_points=500).tolist() == list(range(300))


def test_large_plan(plan: Plan, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n, k = 50_000, 50_000
    vids = rng.choice([v.id for v in plan.tensors], size=k).tolist()
    starts = rng.integers(0, n - 1, size=k)
    ends = np.minimum(starts + rng.integers(1, 500, size=k), n).tolist()
    res = tuple(Interval(vids[i], "device", s, ends[i], 4096) for i, s in enumerate(starts.tolist()))
    big = plan.with_(residency=res)
    (device,) = role_timelines(big)
    np.testing.assert_array_equal(device.total, timeline(res, n)["device"])
    out = tmp_path / "big.png"
    plot_timeline(big, str(out))
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_over_budget_and_empty_plans_still_draw(plan: Plan, tmp_path: Path) -> None:
    half = plan.predictions.peak_bytes["device"] // 2
    tight = plan.with_(budget_bytes={**plan.budget_bytes, "device": half})
    plot_timeline(tight, str(tmp_path / "tight.png"))
    plot_timeline(plan.with_(residency=()), str(tmp_path / "empty.png"))
    for name in ("tight.png", "empty.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
