"""Recompute closures never read a storage that an in-place op changes after the re-run op read it (the
re-run would see the later contents), nor a saved activation freed before the rebuild: torchvision's
MobileNetV3 (a batch-norm output saved for backward, then `hardswish_` in place) crashed the executor with a
KeyError and would have rebuilt the wrong values. A storage updated in place after it is made is copied out
only after its last forward update (the executor's `last_forward_writes`), and its device copy held until
then: ConvNeXt's residual `+=`."""

import torch
from torch import nn

from memplan.ir.analysis import lifetimes
from memplan.ir.frontends.train_step import capture_train_step
from memplan.ir.graph import PERSISTENT_ROLES
from memplan.ir.hardware import load_hardware
from memplan.passes.remat_candidates import find_candidates, in_place_writes


class _InPlaceActs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        conv = [nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(3)]
        self.layers = nn.Sequential(
            *[nn.Sequential(c, nn.BatchNorm2d(8), nn.Hardswish(inplace=True)) for c in conv]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


def test_closures_read_no_storage_changed_later_nor_freed():
    model = _InPlaceActs().train()
    graph = capture_train_step(model, (torch.randn(2, 8, 16, 16),)).graph
    hw = load_hardware("cpu")
    ph, cands = find_candidates(graph, hw, hw.tiers[1] if len(hw.tiers) > 1 else None)
    writes, life = in_place_writes(graph), lifetimes(graph)
    assert writes  # the model does update activations in place
    checked = updated = 0
    for c in cands:
        rebuilt = {c.value_id, *c.recompute_transient}
        for i in c.recompute_ops:
            for vid in graph.ops[i].inputs:
                root = graph.storage_of(vid)
                if root in rebuilt or graph.value(root).role in PERSISTENT_ROLES:
                    continue
                assert not any(w > i for w in writes.get(root, ())), (c.value_id, i, root)
                checked += 1
        for a in c.frontier:
            assert life[a][1] > c.first_bwd_use
        later = [w for w in writes.get(c.value_id, ()) if c.produced < w < ph.fwd_end]
        if later:  # copied out after its last forward update, not while it is being updated
            assert c.swap_write_done > max(later)
            updated += 1
    assert checked and updated
