"""Helpers of `bench/placement.py`: the measuring instruments and accelerate's disk offload, the peer.

- `read_bytes()`: this process's `read_bytes` from `/proc/self/io`, the bytes it made the kernel fetch
  from the block device (all threads; a read served by the page cache counts nothing, an `O_DIRECT` read
  counts in full).
- `DeviceTracker`: memplan's live-storage tracker (`memplan.runtime.tracker.LiveStorageTracker`, the
  instrument memplan's own runtime measures with) that does not count meta tensors. accelerate replaces
  every offloaded parameter with a meta tensor between its uses; such a tensor holds no memory, yet its
  storage reports its nominal size, and the plain tracker would count every offloaded weight as live. It
  also keeps, beside the peak, the peak without storages over memory torch did not allocate: accelerate
  loads an offloaded weight with `torch.tensor(np.memmap(file))`, which wraps the mapped file (page cache)
  in a tensor (the tracker sees that wrapper through `aten.lift_fresh`) and copies it (`aten._to_copy`);
  for one tensor at a time both are counted.
- `ForwardClock`: the seconds of each model forward, from `forward_pre_hook` to `forward_hook` on the
  top-level model (the same span memplan's runtime times: it includes loading or waiting for weights);
  `before` runs ahead of each forward, outside the timed span.
- `offloaded(model, budget, folder)`: accelerate's disk offload at a `max_memory`, as its documentation
  does it on a machine without a GPU: `infer_auto_device_map(model, max_memory={"cpu": budget, "disk":
  ...}, no_split_module_classes=model._no_split_modules)` then `dispatch_model(model, device_map,
  offload_dir=folder)`, which writes the "disk" modules' weights to `folder` (one `.dat` file per tensor,
  read back through `np.memmap` at each use) and leaves meta tensors in the model. On leaving, the hooks
  are removed and the model gets its own parameters back (the objects saved on entry, ties intact) without
  reading the folder again; the folder is deleted.
- `drop_page_cache(paths)`: `fsync` then `posix_fadvise(POSIX_FADV_DONTNEED)` on each file, so that the
  next read of it comes from the disk (as it would when the offload folder does not fit the page cache).
- `odirect_read_bw(path)`: sequential `O_DIRECT` read bandwidth of a file, in `chunk`-byte reads.
"""

from __future__ import annotations

import gc
import glob
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from memplan.runtime.tracker import LiveStorageTracker

MiB = 2**20
DISK_MAX_MEMORY = 1 << 50
"""accelerate's `max_memory` for "disk": unbounded."""


def read_bytes() -> int:
    """`read_bytes` of `/proc/self/io` (0 where the file does not exist)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class DeviceTracker(LiveStorageTracker):
    """The live-storage tracker without meta tensors; `peak_bytes_unwrapped` leaves out the tensors
    `torch.tensor(array)` wraps around memory torch did not allocate (the output of `aten.lift_fresh` over a
    non-resizable storage: a numpy array, a memory-mapped file). See the module docstring."""

    def __init__(self) -> None:
        super().__init__(record_timeline=False)
        self._wrapped: dict[int, int] = {}
        self._wrapped_now = 0
        self._lifting = False
        self.peak_bytes_unwrapped = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._lifting = func is torch.ops.aten.lift_fresh.default
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._lifting = False

    def _register(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        fresh = key not in self._live
        super()._register(t)
        if fresh and self._lifting and not storage.resizable():
            size = int(storage.nbytes())
            with self._lock:
                self._wrapped[key] = size
                self._wrapped_now += size

    def _free(self, key: int) -> None:
        with self._lock:
            self._wrapped_now -= self._wrapped.pop(key, 0)
        super()._free(key)

    def _update_peak(self, name: str, index: int) -> None:
        super()._update_peak(name, index)
        self.peak_bytes_unwrapped = max(self.peak_bytes_unwrapped, self._current - self._wrapped_now)


class ForwardClock:
    """Seconds of each forward of `model` (see the module docstring); use as a context manager."""

    def __init__(self, model: torch.nn.Module, before: Callable[[], None] | None = None) -> None:
        self.model = model
        self.before = before
        self.times: list[float] = []
        self._t0 = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardClock:
        self._handles = [
            self.model.register_forward_pre_hook(self._pre),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, *_: Any) -> None:
        if self.before is not None:
            self.before()
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)

    @property
    def prefill_s(self) -> float:
        return self.times[0] if self.times else 0.0

    @property
    def decode_s(self) -> list[float]:
        return self.times[1:]


def drop_page_cache(paths: Sequence[str]) -> None:
    """Write back and drop the page cache of each file (see the module docstring)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: Sequence[str]) -> float:
    """Fraction of the files' pages resident in the page cache (`mincore` over a read-only mapping of
    each), or -1 if this platform cannot tell."""
    import ctypes

    import numpy as np

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return -1.0
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            arr = np.frombuffer(m, dtype=np.uint8)
            pages = -(-size // page)
            vec = np.zeros(pages, dtype=np.uint8)
            rc = mincore(
                ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(vec.ctypes.data)
            )
            del arr
            if rc != 0:
                return -1.0
            total += pages
            resident += int((vec & 1).sum())
    return resident / total if total else 0.0


def odirect_read_bw(path: str, chunk: int = 64 * MiB, limit: int | None = None) -> dict[str, float]:
    """Sequential `O_DIRECT` read of `path` (at most `limit` bytes) in `chunk`-byte reads: bytes, seconds,
    bytes/s. Falls back to buffered reads (and says so) where the filesystem refuses O_DIRECT."""
    size = os.path.getsize(path) if limit is None else min(limit, os.path.getsize(path))
    buf = mmap.mmap(-1, chunk)
    direct = hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        direct = False
        fd = os.open(path, os.O_RDONLY)
    done = 0
    t0 = time.perf_counter()
    try:
        view = memoryview(buf)
        while done < size:
            n = os.preadv(fd, [view[: min(chunk, -(-(size - done) // 4096) * 4096)]], done)
            if n <= 0:
                break
            done += n
        seconds = time.perf_counter() - t0
        view.release()
    finally:
        os.close(fd)
        buf.close()
    return {
        "bytes": float(done),
        "seconds": seconds,
        "bw": done / seconds if seconds else 0.0,
        "chunk": float(chunk),
        "o_direct": float(direct),
    }


# ---------------------------------------------------------------------------------------------------
# accelerate


@dataclass
class Offload:
    """An accelerate-dispatched model: its device map, bytes per place, the offload files, the seconds
    `dispatch_model` took (writing the folder), and the bytes its hooks have loaded from the folder."""

    device_map: dict[str, Any]
    placed_bytes: dict[str, int]
    files: list[str]
    dispatch_s: float
    loaded: list[int] = field(default_factory=lambda: [0])
    """Bytes accelerate's `load_offloaded_weight` has returned so far (a one-element counter)."""

    @property
    def loaded_bytes(self) -> int:
        return self.loaded[0]


def _snapshot(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str, Any]]:
    """Every (module, "_parameters" | "_buffers", name, object), so that the exact objects (and ties)
    can be put back."""
    out = []
    for m in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, obj in getattr(m, kind).items():
                out.append((m, kind, name, obj))
    return out


def _placed_bytes(model: torch.nn.Module, device_map: dict[str, Any]) -> dict[str, int]:
    """Parameter bytes per place of the device map (ties counted once, at their first name)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        where = "cpu"
        best = -1
        for prefix, dev in device_map.items():
            if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                where, best = str(dev), len(prefix)
        out[where] = out.get(where, 0) + p.numel() * p.element_size()
    return out


@contextmanager
def offloaded(model: torch.nn.Module, budget: int, folder: str) -> Iterator[Offload]:
    """accelerate's disk offload of `model` at `max_memory={"cpu": budget}` (see the module docstring)."""
    import accelerate.utils.offload as acc_offload
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    saved = _snapshot(model)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": budget, "disk": DISK_MAX_MEMORY}, no_split_module_classes=no_split
    )
    placed = _placed_bytes(model, device_map)
    os.makedirs(folder, exist_ok=True)
    original_load = acc_offload.load_offloaded_weight
    counter = [0]

    def counted_load(weight_file: str, weight_info: dict[str, Any]) -> torch.Tensor:
        t = original_load(weight_file, weight_info)
        counter[0] += t.numel() * t.element_size()
        return t

    acc_offload.load_offloaded_weight = counted_load
    t0 = time.perf_counter()
    try:
        try:
            dispatch_model(model, device_map, offload_dir=folder)
        except Exception as e:
            raise RuntimeError(f"dispatch_model failed on the device map {dict(device_map)}: {e!r}") from e
        files = sorted(glob.glob(os.path.join(folder, "*.dat")))
        yield Offload(dict(device_map), placed, files, time.perf_counter() - t0, counter)
    finally:
        acc_offload.load_offloaded_weight = original_load
        for m in model.modules():  # no `detach_hook` reload from the folder: the saved objects go back
            hook = getattr(m, "_hf_hook", None)
            for h in getattr(hook, "hooks", [hook]) if hook is not None else ():
                if hasattr(h, "offload"):
                    h.offload = False
        remove_hook_from_module(model, recurse=True)
        for m, kind, name, obj in saved:
            getattr(m, kind)[name] = obj
        shutil.rmtree(folder, ignore_errors=True)
        gc.collect()


def accelerate_generate(
    model: torch.nn.Module, ids: torch.Tensor, gen: int, off: Offload, cold: bool
) -> dict[str, Any]:
    """One greedy generation on an accelerate-dispatched model: tokens, forward times, tracker peaks,
    `/proc/self/io` read bytes and bytes accelerate loaded from its folder. `cold`: the offload files'
    page cache is dropped before every forward (each forward then reads them from the disk)."""
    if cold:
        drop_page_cache(off.files)
    cached = cached_fraction(off.files) if off.files else 0.0
    before = (lambda: drop_page_cache(off.files)) if cold and off.files else None
    loaded0, io0 = off.loaded_bytes, read_bytes()
    tracker = DeviceTracker()
    with ForwardClock(model, before) as clock, torch.no_grad():
        with tracker:
            tracker.track([*model.parameters(), *model.buffers()])
            baseline = tracker.current_bytes
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
            wall = time.perf_counter() - t0
    return {
        "tokens": out,
        "prefill_s": clock.prefill_s,
        "decode_s": clock.decode_s,
        "wall_s": wall,
        "peak_bytes": tracker.result.peak_bytes,
        "peak_bytes_unwrapped": tracker.peak_bytes_unwrapped,
        "resident_bytes": baseline,
        "proc_read_bytes": read_bytes() - io0,
        "loaded_bytes": off.loaded_bytes - loaded0,
        "cached_before": cached,
        "forwards": len(clock.times),
    }


def plain_generate(model: torch.nn.Module, ids: torch.Tensor, gen: int) -> dict[str, Any]:
    """The plain model's greedy generation (every weight in memory) under the same instruments."""
    tracker = DeviceTracker()
    io0 = read_bytes()
    with ForwardClock(model) as clock, torch.no_grad():
        with tracker:
            tracker.track([*model.parameters(), *model.buffers()])
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
            wall = time.perf_counter() - t0
    return {
        "tokens": out,
        "prefill_s": clock.prefill_s,
        "decode_s": clock.decode_s,
        "wall_s": wall,
        "peak_bytes": tracker.result.peak_bytes,
        "proc_read_bytes": read_bytes() - io0,
        "forwards": len(clock.times),
    }


def scratch_dir(parent: str | None = None) -> str:
    """A fresh directory for offload folders (on the disk the SSD tier uses: the temporary directory)."""
    return tempfile.mkdtemp(prefix="placement-bench-", dir=parent)
