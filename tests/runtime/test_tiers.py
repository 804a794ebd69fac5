"""Memory tiers: exact round trips on every tier, asynchrony, counters, SSD faults, cleanup, refusals."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memplan.ir.hardware import Hardware, hardware_from_dict, load_hardware
from memplan.runtime.tiers import (
    AsyncTierStore,
    SsdOptions,
    TierCorrupt,
    TierError,
    TierFull,
    TierIOError,
    TierStore,
    TierUnavailable,
    mark_emulated,
    numa_nodes,
    open_tier,
)
from memplan.runtime.tiers.cxl import open_cxl
from memplan.runtime.tiers.host import HostAllocator, MemoryBackend
from memplan.runtime.tiers.numa import MbindAllocator, NumaNode, numa_allocator, parse_cpulist

GiB = 1 << 30


def _hardware(
    ssd_path: Path, *, cxl_node: int | None = 0, capacity: int = GiB, emulated: tuple[str, ...] = ()
) -> Hardware:
    """A GPU machine with host, CXL and SSD tiers (the SSD in `ssd_path`)."""
    tier = {"read_bw": 1e10, "write_bw": 1e10, "latency_s": 1e-6}
    return hardware_from_dict(
        {
            "name": "test-gpu",
            "device_kind": "cuda",
            "flops": 1e14,
            "mem_bw": 1e12,
            "tiers": [
                {"name": "device", "capacity_bytes": 16 * GiB, **tier},
                {"name": "host", "capacity_bytes": capacity, **tier},
                {"name": "cxl", "capacity_bytes": capacity, "numa_node": cxl_node, **tier},
                {"name": "ssd", "capacity_bytes": capacity, "path": str(ssd_path), **tier},
            ],
            "emulated": list(emulated),
        }
    )


def _node0_exists() -> bool:
    return any(n.id == 0 for n in numa_nodes())


TIERS = [
    ("host", frozenset[str]()),
    ("cxl", frozenset({"cxl"})),
    pytest.param(("cxl", frozenset[str]()), marks=pytest.mark.skipif(not _node0_exists(), reason="no node")),
    ("ssd", frozenset[str]()),
]


@pytest.fixture
def ssd_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ssd"
    d.mkdir()
    return d


@pytest.fixture(params=TIERS, ids=["host", "cxl-emulated", "cxl-node0", "ssd"])
def store(request: pytest.FixtureRequest, ssd_dir: Path) -> Iterator[TierStore]:
    name, emulate = request.param
    with open_tier(_hardware(ssd_dir), name, emulate=emulate) as s:
        yield s


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40])
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f32-special": special,
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(11, generator=g).half(),
        "int8": torch.randint(-128, 128, (4, 9), dtype=torch.int8, generator=g),
        "int64": torch.randint(-(2**62), 2**62, (5,), generator=g),
        "bool": torch.rand(13, generator=g) > 0.5,
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(6, 4, generator=g).t(),
        "strided": torch.randn(8, 10, generator=g)[::2, 1::3],
        "large": torch.randn(3 << 20, generator=g),
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_bitwise(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(_bytes(out), _bytes(ref))


def test_round_trip_is_bitwise_exact(store: TierStore) -> None:
    tensors = _tensors()
    handles = {k: store.put(k, t) for k, t in tensors.items()}
    for key, t in tensors.items():
        out = store.get(handles[key])
        _assert_bitwise(out, t)
        if out.numel():
            assert out.data_ptr() != t.data_ptr()
    # a second get reads the tier again; the tensor handed out before is the caller's own
    first = store.get(handles["f32"])
    first.zero_()
    _assert_bitwise(store.get(handles["f32"]), tensors["f32"])


def test_prefetch_then_get(store: TierStore) -> None:
    t = torch.randn(1 << 18).to(torch.bfloat16)
    h = store.put("act", t)
    del t  # the store keeps the source alive until its copy is done
    store.prefetch(h)
    store.prefetch(h)  # a second prefetch while one is under way is a no-op
    out = store.get(h)
    assert out.dtype == torch.bfloat16 and out.shape == (1 << 18,)
    assert store.stats().bytes_read == h.nbytes


class GatedBackend(MemoryBackend):
    """Host memory whose reads and writes wait for a gate: shows what runs off the caller's thread."""

    def __init__(self) -> None:
        super().__init__(HostAllocator())
        self.gate = threading.Event()
        self.delay_s = 0.0
        self.released = 0
        self.closed = False

    def write(self, key: str, data: torch.Tensor, ready: Any) -> torch.Tensor:
        assert self.gate.wait(10)
        return super().write(key, data, ready)

    def read(
        self, stored: torch.Tensor, device: torch.device, consumer: Any, out: Any = None
    ) -> torch.Tensor:
        assert self.gate.wait(10)
        time.sleep(self.delay_s)
        return super().read(stored, device, consumer, out)

    def release(self, stored: torch.Tensor) -> None:
        self.released += 1

    def close(self) -> None:
        self.closed = True


def _wait_until(cond: Any, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_put_and_prefetch_return_before_the_copy_and_overlap_is_measured() -> None:
    backend = GatedBackend()
    backend.delay_s = 0.2
    with AsyncTierStore("host", backend, GiB) as s:
        t = torch.arange(1000, dtype=torch.int32)
        h = s.put("a", t)  # the write is blocked on the gate, yet put returned
        s.prefetch(h)  # likewise
        assert s.stats().bytes_written == 0 and s.stats().bytes_read == 0
        backend.gate.set()
        _wait_until(lambda: s.stats().bytes_read == h.nbytes)
        _assert_bitwise(s.get(h), t)
        hidden = s.stats()
        assert hidden.read_s >= 0.2 and hidden.busy_s >= 0.2 and hidden.wait_s < 0.1
        assert hidden.overlap_fraction > 0.5 and hidden.overlap_s >= 0.1
        _assert_bitwise(s.get(h), t)  # no prefetch: the caller waits for the whole read
        exposed = s.stats()
        assert exposed.wait_s - hidden.wait_s >= 0.2
        assert exposed.overlap_fraction < hidden.overlap_fraction


def test_a_store_dropped_mid_copy_still_cleans_up() -> None:
    backend = GatedBackend()
    s = AsyncTierStore("host", backend, GiB)
    s.put("a", torch.zeros(10))
    threading.Timer(0.1, backend.gate.set).start()
    del s  # the queued copy does not keep the store alive; its finalizer waits for the copy
    gc.collect()
    _wait_until(lambda: backend.closed)
    assert backend.released == 1


def test_counters_track_live_peak_and_bytes(store: TierStore) -> None:
    a, b, c = torch.ones(1000), torch.ones(500, dtype=torch.int8), torch.ones(300, dtype=torch.float64)
    ha, hb, hc = store.put("a", a), store.put("b", b), store.put("c", c)
    store.flush()
    s = store.stats()
    assert (s.puts, s.live_bytes, s.peak_bytes, s.bytes_written) == (3, 4000 + 500 + 2400, 6900, 6900)
    store.free(ha)
    store.get(hb)
    s = store.stats()
    assert (s.live_bytes, s.peak_bytes, s.bytes_read, s.gets) == (2900, 6900, 500, 1)
    assert s.write_s > 0 and s.read_s > 0 and s.write_bw > 0 and s.read_bw > 0
    assert s.to_dict()["tier"] == store.tier
    store.free(hb)
    store.free(hc)
    assert store.stats().live_bytes == 0


def test_capacity_is_enforced(ssd_dir: Path) -> None:
    with open_tier(_hardware(ssd_dir, capacity=4096), "host") as s:
        h = s.put("fits", torch.zeros(1024))
        with pytest.raises(TierFull, match=r"tier 'host' is full: tensor 'big' needs 8 bytes and 4096 of"):
            s.put("big", torch.zeros(2))
        s.free(h)
        s.put("big", torch.zeros(2))


def test_misuse_is_refused(ssd_dir: Path) -> None:
    hw = _hardware(ssd_dir)
    s = open_tier(hw, "host")
    h = s.put("x", torch.zeros(3))
    s.free(h)
    with pytest.raises(TierError, match="no tensor 'x'.*freed"):
        s.get(h)
    with pytest.raises(TierError, match="dense tensors only"):
        s.put("sparse", torch.eye(3).to_sparse())
    s.close()
    s.close()
    with pytest.raises(TierError, match="store is closed"):
        s.put("y", torch.zeros(1))
    with pytest.raises(TierError, match="swap to 'host', 'cxl' or 'ssd'"):
        open_tier(hw, "device")
    with pytest.raises(TierError, match=r"cannot emulate \['ssd'\]"):
        open_tier(hw, "ssd", emulate={"ssd"})


# --- host -----------------------------------------------------------------------------------------


def test_host_tier_is_refused_on_a_cpu_device() -> None:
    with pytest.raises(TierUnavailable, match="already is host memory"):
        open_tier(load_hardware("cpu"), "host")


# --- CXL ------------------------------------------------------------------------------------------


def test_cxl_refuses_an_absent_node_naming_the_nodes_that_exist(ssd_dir: Path) -> None:
    nodes = [NumaNode(0, (0, 1), 8 * GiB, GiB), NumaNode(1, (), 64 * GiB, 60 * GiB)]
    with pytest.raises(TierUnavailable) as e:
        open_cxl(_hardware(ssd_dir, cxl_node=3), nodes=nodes)
    msg = str(e.value)
    assert "NUMA node 3, which does not exist" in msg and "--emulate cxl" in msg
    assert "node 0 (2 CPUs, 8.0 GiB)" in msg and "node 1 (memory only, 64.0 GiB)" in msg
    absent = max((n.id for n in numa_nodes()), default=-1) + 1  # this machine, through the factory
    with pytest.raises(TierUnavailable, match=f"NUMA node {absent}, which does not exist"):
        open_tier(_hardware(ssd_dir, cxl_node=absent), "cxl")
    with pytest.raises(TierUnavailable, match="names no numa_node"):
        open_tier(_hardware(ssd_dir, cxl_node=None), "cxl")


def test_emulated_cxl_says_so_everywhere(ssd_dir: Path) -> None:
    hw = _hardware(ssd_dir, cxl_node=7)
    with open_tier(hw, "cxl", emulate={"cxl"}) as s:
        stats = s.stats()
        assert stats.emulated and "emulated" in stats.backend and stats.to_dict()["emulated"]
    assert mark_emulated(hw, {"cxl"}).emulated == ("cxl",)
    with open_tier(_hardware(ssd_dir, cxl_node=7, emulated=("cxl",)), "cxl") as s:  # declared in the file
        assert s.stats().emulated


@pytest.mark.skipif(not _node0_exists(), reason="no NUMA node 0")
def test_real_cxl_allocators_on_node_0(ssd_dir: Path) -> None:
    with open_tier(_hardware(ssd_dir, cxl_node=0), "cxl") as s:
        assert not s.stats().emulated and "NUMA node 0" in s.stats().backend
    t = torch.randn(5000)
    for allocator in (numa_allocator(0), MbindAllocator(0)):
        buf = allocator.allocate(t.numel() * 4)
        buf.copy_(_bytes(t))
        assert torch.equal(buf.view(torch.float32), t)
        allocator.release(buf)
        assert allocator.allocate(0).numel() == 0
    absent = max(n.id for n in numa_nodes()) + 1
    with pytest.raises(TierUnavailable, match=f"binding memory to NUMA node {absent} failed"):
        MbindAllocator(absent).allocate(4096)


def test_numa_nodes_are_read_from_sysfs(tmp_path: Path) -> None:
    for node, cpus, total in ((0, "0-3,8\n", 8 << 20), (1, "\n", 64 << 20)):
        d = tmp_path / f"node{node}"
        d.mkdir()
        (d / "cpulist").write_text(cpus)
        (d / "meminfo").write_text(f"Node {node} MemTotal: {total} kB\nNode {node} MemFree: 1024 kB\n")
    nodes = numa_nodes(tmp_path)
    assert [(n.id, n.cpus, n.memory_only, n.mem_free_bytes) for n in nodes] == [
        (0, (0, 1, 2, 3, 8), False, 1 << 20),
        (1, (), True, 1 << 20),
    ]
    assert nodes[1].mem_total_bytes == 64 * GiB
    assert parse_cpulist("0-2,5,7-8") == (0, 1, 2, 5, 7, 8)


# --- SSD ------------------------------------------------------------------------------------------


def _only_file(ssd_dir: Path) -> Path:
    (sub,) = ssd_dir.iterdir()
    (f,) = sub.iterdir()
    return f


def test_ssd_uses_o_direct_and_aligned_files(ssd_dir: Path) -> None:
    with open_tier(_hardware(ssd_dir), "ssd") as s:
        s.put("x", torch.zeros(1000))  # 4000 bytes, padded to one 4096-byte block
        s.flush()
        assert "(O_DIRECT)" in s.stats().backend
        assert _only_file(ssd_dir).stat().st_size == 4096


def test_ssd_full_disk_while_writing(ssd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with open_tier(_hardware(ssd_dir), "ssd") as s:
        monkeypatch.setattr(os, "pwrite", no_space)
        h = s.put("block0.mlp", torch.zeros(1 << 16))
        full = r"SSD tier directory .*memplan-ssd-.* is full: tensor 'block0.mlp' needs 262144 bytes and \d+"
        with pytest.raises(TierFull, match=full):
            s.flush()
        with pytest.raises(TierFull):
            s.get(h)
        assert s.stats().live_bytes == 0
        assert [list(sub.iterdir()) for sub in ssd_dir.iterdir()] == [[]]  # the partial file is gone


def test_ssd_full_disk_before_writing(ssd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("memplan.runtime.tiers.ssd._free_bytes", lambda directory: 8192)
    with open_tier(_hardware(ssd_dir), "ssd") as s:
        s.put("small", torch.zeros(2048))
        s.put("big", torch.zeros(4096))
        with pytest.raises(TierFull, match="tensor 'big' needs 16384 bytes and 8192 bytes are free") as e:
            s.flush()
        assert (e.value.needed_bytes, e.value.free_bytes) == (16384, 8192)


def test_ssd_detects_a_corrupted_file(ssd_dir: Path) -> None:
    with open_tier(_hardware(ssd_dir), "ssd") as s:
        h = s.put("block3.attn", torch.randn(5000))
        s.flush()
        f = _only_file(ssd_dir)
        with open(f, "r+b") as fh:
            fh.seek(1234)
            byte = fh.read(1)
            fh.seek(1234)
            fh.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(TierCorrupt, match="tensor 'block3.attn' read back from .* is corrupted") as e:
            s.get(h)
        assert e.value.key == "block3.attn" and e.value.path == str(f)


def test_ssd_short_read(ssd_dir: Path) -> None:
    with open_tier(_hardware(ssd_dir), "ssd") as s:
        h = s.put("act", torch.randn(10000))
        s.flush()
        os.truncate(_only_file(ssd_dir), 5000)
        with pytest.raises(TierIOError, match="short read: .* holds 5000 of the 40000 bytes of tensor 'act'"):
            s.get(h)


def test_ssd_failed_reads(ssd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def io_error(fd: int, buffers: Any, offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with open_tier(_hardware(ssd_dir), "ssd") as s:
        h = s.put("act", torch.randn(100))
        s.flush()
        with monkeypatch.context() as m:
            m.setattr(os, "preadv", io_error)
            with pytest.raises(TierIOError, match="reading tensor 'act' from .* failed: Input/output error"):
                s.get(h)
        os.remove(_only_file(ssd_dir))
        with pytest.raises(TierIOError, match="tensor 'act': cannot open .*: No such file"):
            s.get(h)


def test_ssd_falls_back_to_buffered_io(ssd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def refuse_direct(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    t = torch.randn(3000)
    with open_tier(_hardware(ssd_dir), "ssd") as s:
        _assert_bitwise(s.get(s.put("x", t)), t)
        assert "buffered I/O: O_DIRECT writes refused with EINVAL" in s.stats().backend
    buffered = SsdOptions(direct=False, checksum=False, chunk_bytes=8192)
    with open_tier(_hardware(ssd_dir), "ssd", ssd=buffered) as s:
        _assert_bitwise(s.get(s.put("x", t)), t)  # several chunks, the last one partial
        assert "O_DIRECT off" in s.stats().backend


def test_ssd_options_and_missing_directory_are_checked(tmp_path: Path) -> None:
    with pytest.raises(TierError, match="multiple of 4096"):
        SsdOptions(chunk_bytes=1000)
    with pytest.raises(TierUnavailable, match="directory .*nowhere does not exist"):
        open_tier(_hardware(tmp_path / "nowhere"), "ssd")


def test_ssd_leaves_nothing_behind(ssd_dir: Path) -> None:
    s = open_tier(_hardware(ssd_dir), "ssd")
    handles = [s.put(f"t{i}", torch.randn(1000)) for i in range(4)]
    s.flush()
    (sub,) = ssd_dir.iterdir()
    assert len(list(sub.iterdir())) == 4
    s.free(handles[0])
    assert len(list(sub.iterdir())) == 3
    s.close()
    assert list(ssd_dir.iterdir()) == []
    s2 = open_tier(_hardware(ssd_dir), "ssd")  # dropped without close: the garbage collector cleans up
    s2.put("t", torch.randn(1000))
    s2.flush()
    del s2
    gc.collect()
    assert list(ssd_dir.iterdir()) == []


def test_ssd_cleans_up_at_interpreter_exit(ssd_dir: Path) -> None:
    script = (
        "import sys, torch\n"
        "from memplan.ir.hardware import load_hardware\n"
        "from memplan.runtime.tiers import open_tier\n"
        "from dataclasses import replace\n"
        "hw = load_hardware('cpu')\n"
        "hw = replace(hw, tiers=tuple(replace(t, path=sys.argv[1]) for t in hw.tiers))\n"
        "STORE = open_tier(hw, 'ssd')\n"
        "STORE.put('t', torch.randn(1000))\n"
        "STORE.flush()\n"
        "print(len(list(__import__('pathlib').Path(sys.argv[1]).iterdir())))\n"
    )
    cmd = [sys.executable, "-c", script, str(ssd_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"  # the store's directory existed while it ran
    assert list(ssd_dir.iterdir()) == []


def test_read_into_a_caller_buffer(store: TierStore) -> None:
    """The executor allocates the read-back buffer itself (on its own thread, where it is measured)."""
    src = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    h = store.put("x", src)
    store.wait(h)
    buf = torch.empty(64, 64)
    store.prefetch(h, out=buf)
    got = store.get(h)
    assert torch.equal(got, src) and got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    with pytest.raises(TierError, match="must be contiguous"):
        store.get(h, out=torch.empty(64, 64).t())
    store.free(h)
