"""Measure what really happened: live tensor bytes over a run, by following storages and their frees.

`LiveStorageTracker` is a `TorchDispatchMode`: every op output's untyped storage is counted once (keyed
by the storage's address in C++, `_cdata`, so views and in-place results are not counted twice) and a
`weakref.finalize` on the storage object sees its free. It sees backward ops too (CPU autograd runs on
the calling thread) and works unchanged under `FakeTensorMode`. tracemalloc cannot see torch's
allocations and RSS is too coarse; this is exact for tensors.

Tensors that exist before the run (parameters, inputs) are counted with `track(...)`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Measurement:
    """What one tracked run did: peak live bytes, the op that reached it, the op-by-op timeline, time."""

    peak_bytes: int = 0
    peak_op_index: int = -1
    peak_op: str = ""
    ops: int = 0
    wall_s: float = 0.0
    timeline: list[int] = field(default_factory=list)
    """Live bytes right after each op's outputs exist (inputs not yet freed): where peaks happen."""
    baseline_bytes: int = 0
    """Bytes already live when tracking started (from `track`)."""


class LiveStorageTracker(TorchDispatchMode):
    """Count live tensor storages while active. Use as `with LiveStorageTracker() as tr: ...`."""

    def __init__(self, record_timeline: bool = True) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self._lock = threading.Lock()
        self._current = 0
        self._record = record_timeline
        self._t0 = 0.0
        self.result = Measurement()

    @property
    def current_bytes(self) -> int:
        return self._current

    def track(self, tensors: Iterable[Any]) -> None:
        """Count tensors that already exist (parameters, inputs, optimizer state) as live."""
        for t in tree_leaves(list(tensors)):
            if isinstance(t, torch.Tensor):
                self._register(t)
        self.result.baseline_bytes = self._current
        self._update_peak("(before first op)", -1)

    def _register(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        with self._lock:
            if key in self._live:
                return
            size = int(storage.nbytes())
            self._live[key] = size
            self._current += size
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self._current -= self._live.pop(key, 0)

    def _update_peak(self, name: str, index: int) -> None:
        if self._current > self.result.peak_bytes:
            self.result.peak_bytes = self._current
            self.result.peak_op = name
            self.result.peak_op_index = index

    def __enter__(self) -> LiveStorageTracker:
        self._t0 = time.perf_counter()
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self.result.wall_s = time.perf_counter() - self._t0
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._register(t)
        index = self.result.ops
        self.result.ops += 1
        self._update_peak(str(func), index)
        if self._record:
            self.result.timeline.append(self._current)
        return out


class CompiledCodeTracker(LiveStorageTracker):
    """A tracker under which `torch.compile`d code runs compiled. Dynamo refuses to run compiled code while a
    dispatch mode that is not an infra mode is on the stack (it silently runs the frame eagerly instead, so
    a plain tracker would measure the eager step); with `ignore_compile_internals` true it runs the compiled
    artifact under the mode, and with the aot_eager backends that artifact calls ATen ops one by one, so
    the tracker sees every storage of the compiled graph."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True
