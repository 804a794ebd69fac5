"""bench/placement.py's core comparison on a tiny model: memplan and accelerate generate the same tokens as
the plain model, memplan within its budget, and every row has the fields the report reads."""

import torch

from bench.placement import (
    ACC_COLD,
    ACC_WARM,
    MEMPLAN,
    PlacementConfig,
    compare_at,
    comparison_notes,
    make_work,
    plain_row,
    write_plot,
)
from bench.placement_peers import DeviceTracker, drop_page_cache, odirect_read_bw
from memplan.ir.hardware import load_hardware

RAN = (
    "prefill_tok/s",
    "decode_tok/s",
    "peak_bytes",
    "within_budget",
    "disk_read_MiB",
    "own_read_MiB",
    "streamed_MiB",
    "decode_s",
)


def test_compare_at_gpt2_tiny(tmp_path):
    work = make_work("gpt2-tiny", prompt=4, gen=4, hw=load_hardware("cpu"), workdir=str(tmp_path))
    assert work.plain["forwards"] == 4
    rows = compare_at(work, 0.9, cold=True, measure_bw=True, bw_chunk=1 << 20)
    assert [r["system"] for r in rows] == [MEMPLAN, ACC_WARM, ACC_COLD]
    for r in rows:
        assert r["model"] == "gpt2-tiny" and r["fraction"] == 0.9
        assert r["budget_bytes"] == int(0.9 * work.weight_bytes)
        missing = [k for k in RAN if k not in r]
        assert not missing, (r["system"], missing, r.get("notes"))
        assert r["decode_tok/s"] > 0 and r["prefill_tok/s"] > 0
        assert len(r["decode_s"]) == work.gen - 1
        assert r["tokens"] == "identical", r
        assert r["streamed_MiB"] > 0  # both really offloaded something at this budget
    mp = rows[0]
    assert mp["within_budget"] and mp["peak_bytes"] <= mp["budget_bytes"]
    assert mp["own_read_MiB"] > 0 and mp["decode_read_MiB_per_token"] > 0
    assert mp["o_direct_bw"]["bw"] > 0 and mp["o_direct_bw"]["bytes"] > 0
    assert rows[1]["own_read_MiB"] > 0  # accelerate's hooks loaded weights from its folder
    all_rows = [plain_row(work), *rows]
    notes, goals = comparison_notes(
        all_rows, PlacementConfig(fractions=(0.9,), cold_fractions=(0.9,)), all_rows[0]
    )
    assert goals["memplan_within_budget"] and goals["tokens_identical"]
    assert "of_physical_limit" in goals and any("80%" in n for n in notes)
    write_plot(all_rows, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert list(tmp_path.glob("offload-*")) == []  # accelerate's folders are removed


def test_device_tracker_skips_meta_and_sees_wrapped_memory(tmp_path):
    import numpy as np

    f = tmp_path / "x.dat"
    np.memmap(f, dtype="float32", mode="w+", shape=(256, 256)).flush()
    resident = torch.zeros(1000)
    resident.numpy()  # marks its storage non-resizable, as writing the weight file does: still counted
    tr = DeviceTracker()
    with tr:
        tr.track([resident])
        meta = torch.empty(1 << 20, device="meta")
        t = torch.tensor(np.memmap(f, dtype="float32", mode="r", shape=(256, 256)))
        del meta
    copy = t.numel() * 4
    assert tr.result.peak_bytes >= 4000 + copy  # the copy is counted, the meta tensor is not
    assert tr.result.peak_bytes < (1 << 20)
    assert tr.peak_bytes_unwrapped == 4000 + copy  # without the memmap's wrapper
    drop_page_cache([str(f)])
    assert odirect_read_bw(str(f), chunk=1 << 16)["bytes"] == f.stat().st_size
