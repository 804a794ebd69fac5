import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memplan.runtime.tracker import LiveStorageTracker


def _step(x):
    y = x * 2  # 4 KiB
    v = y.view(-1)  # a view: no new storage
    y.add_(1)  # in place: no new storage
    z = v + 1  # 4 KiB
    del y, v
    return z.sum()


def test_counts_storages_once_and_sees_frees():
    x = torch.zeros(1024)
    with LiveStorageTracker() as tr:
        tr.track([x])
        out = _step(x)
    assert tr.result.baseline_bytes == 4096
    assert tr.result.peak_bytes == 4096 * 3  # x, y, z live together; the view and in-place add add nothing
    assert tr.current_bytes == 4096 + out.untyped_storage().nbytes()  # y and z freed, x and the sum live
    assert tr.result.ops == len(tr.result.timeline) == 5


def test_same_numbers_under_fake_tensors():
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(1024))
        with LiveStorageTracker() as tr:
            tr.track([x])
            _step(x)
    assert tr.result.peak_bytes == 4096 * 3


def test_backward_is_seen():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    with LiveStorageTracker() as tr:
        tr.track([w, x])
        loss = (x @ w).relu().sum()
        loss.backward()
    # forward saves x@w's relu output; backward allocates the grad of w (256 KiB) among others
    assert tr.result.peak_bytes >= w.numel() * 4 * 2 + x.numel() * 4
    assert any("mm" in s for s in [tr.result.peak_op]) or tr.result.ops > 5
