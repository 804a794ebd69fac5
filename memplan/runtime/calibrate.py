"""Measure this machine's speeds for the hardware model, so that plans price a recompute against a transfer
with its numbers rather than a preset's: the device's dense matmul FLOP/s and memory bandwidth, and each
slower tier's write and read bandwidth through the same tier store the runtime swaps through (checksums,
O_DIRECT and all), and the share of a transfer's time by which it slows down matmuls running beside it
(`Tier.compute_share`: on a CPU the copies and checksums take cores, the disk's own time does not).

    hw, report = calibrate(load_hardware("cpu"))
    write_hardware(hw, "this-machine.json")        # then: memplan plan ... --hardware this-machine.json

Each figure is the median of `reps` timed runs after one warm-up. The matmul is square, of side
`matmul_n`, in float32 (the model's working dtype here); the bandwidth is a copy of `sample_bytes` (read
plus written bytes, as the roofline model counts an op's traffic).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from memplan.errors import InvalidInput
from memplan.files import atomic_write_text
from memplan.ir.hardware import Hardware, hardware_from_dict
from memplan.runtime.tiers.factory import open_tier

MiB = 2**20


@dataclass(frozen=True)
class TierSpeed:
    name: str
    write_bw: float
    read_bw: float
    preset_write_bw: float
    preset_read_bw: float
    compute_share: float


@dataclass(frozen=True)
class Calibration:
    """What was measured, beside what the hardware description said before."""

    flops: float
    mem_bw: float
    preset_flops: float
    preset_mem_bw: float
    tiers: tuple[TierSpeed, ...]
    threads: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    hw: Hardware,
    tiers: Sequence[str] | None = None,
    *,
    sample_bytes: int = 128 * MiB,
    matmul_n: int = 1024,
    reps: int = 3,
    emulate: Set[str] = frozenset(),
    progress: Callable[[str], None] | None = None,
) -> tuple[Hardware, Calibration]:
    """`hw` with its device speed and the bandwidths of `tiers` (default: every tier but the device)
    replaced by measured ones, and the measurements."""
    t0 = time.perf_counter()
    device = _device(hw)
    names = [t.name for t in hw.tiers if t.name != "device"] if tiers is None else list(tiers)
    for name in names:
        hw.tier(name)  # a clear error for a tier the hardware does not have
        if name == "device":
            raise InvalidInput("the device tier's speed is `mem_bw`, measured anyway; name slower tiers only")
    say = progress or (lambda _: None)
    say(f"matmul {matmul_n}x{matmul_n} on {device}")
    flops = _flops(device, matmul_n, reps)
    say(f"copy of {sample_bytes // MiB} MiB on {device}")
    mem_bw = _copy_bw(device, sample_bytes, reps)
    speeds = []
    for name in names:
        say(f"tier {name}: write and read {sample_bytes // MiB} MiB")
        old = hw.tier(name)
        write_bw, read_bw, share = _tier_speed(hw, name, device, sample_bytes, matmul_n, reps, emulate)
        speeds.append(TierSpeed(name, write_bw, read_bw, old.write_bw, old.read_bw, share))
    by_name = {s.name: s for s in speeds}
    new_tiers = tuple(
        replace(t, write_bw=s.write_bw, read_bw=s.read_bw, compute_share=s.compute_share)
        if (s := by_name.get(t.name))
        else t
        for t in hw.tiers
    )
    new_hw = replace(hw, name=f"{hw.name}-calibrated", flops=flops, mem_bw=mem_bw, tiers=new_tiers)
    report = Calibration(
        flops, mem_bw, hw.flops, hw.mem_bw, tuple(speeds), torch.get_num_threads(), time.perf_counter() - t0
    )
    return new_hw, report


def write_hardware(hw: Hardware, path: str, description: str = "") -> None:
    """Write `hw` as a hardware JSON file (atomically) that `load_hardware(path)` reads back."""
    data = hw.to_dict()
    data["tiers"] = [{k: v for k, v in t.items() if v is not None} for t in data["tiers"]]
    data["emulated"] = list(data["emulated"])
    if description:
        data["description"] = description
    hardware_from_dict(data, source=f"calibrated hardware for {path}")  # what we write must load back
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _device(hw: Hardware) -> torch.device:
    if hw.device_kind == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(
                f"hardware {hw.name!r} describes a CUDA device, and this machine has none: calibrate it on "
                "the "
                "machine it describes, or calibrate a cpu description here"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up (synchronised on a GPU)."""
    times = []
    for i in range(reps + 1):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _flops(device: torch.device, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return 2.0 * n**3 / _timed(lambda: torch.mm(a, b, out=out), device, reps)


def _copy_bw(device: torch.device, nbytes: int, reps: int) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / _timed(lambda: dst.copy_(src), device, reps)


def _tier_speed(
    hw: Hardware, name: str, device: torch.device, nbytes: int, n: int, reps: int, emulate: Set[str]
) -> tuple[float, float, float]:
    """(write, read) bytes/s of a put and a get of `nbytes` through the tier's store, and how much a write and
    a read running beside matmuls slow them down over the transfers' own time, (time with transfers - time
    alone) / transfer time in [0, 1]; medians of `reps` after one warm-up."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    data = torch.rand(nbytes // 4, device=device)

    def work(k: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(k):
            torch.mm(a, b, out=out)
        _sync(device)
        return time.perf_counter() - start

    work(2)
    per_mm = work(8) / 8
    writes, reads, shares = [], [], []
    with open_tier(hw, name, emulate=emulate) as store:
        for i in range(reps + 1):
            start = time.perf_counter()
            handle = store.put(f"calibrate-{i}", data)
            store.wait(handle)
            mid = time.perf_counter()
            store.get(handle)
            end = time.perf_counter()
            if not i:
                store.free(handle)
                continue
            writes.append(mid - start)
            reads.append(end - mid)
            transfer = end - start
            k = int(1.5 * transfer / per_mm) + 1  # enough compute to cover both transfers
            alone = work(k)
            handle2 = store.put(f"calibrate-write-{i}", data)  # both directions at once, as swaps out and in
            store.prefetch(handle)
            busy = work(k)
            store.wait(handle2)
            store.get(handle)
            store.free(handle)
            store.free(handle2)
            shares.append(min(max((busy - alone) / transfer, 0.0), 1.0))
    return nbytes / statistics.median(writes), nbytes / statistics.median(reads), statistics.median(shares)
