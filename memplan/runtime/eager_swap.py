"""The torch mechanism's swaps: saved-tensor hooks that send the tensors a plan swaps to its tier when
autograd saves them, and read them back (prefetched one block ahead) when backward unpacks them.

`SwapMarker` counts a block's ops as SAC does and marks the storages of the outputs the plan swaps;
`Swapper` owns the hooks, the tier store and the counters of `EagerInfo`; `swapping_forward` wraps a block.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.runtime.eager_setup import (
    EagerInfo,
    SwapSpec,
)
from memplan.runtime.tiers.api import Handle, TierStore

SAC_IGNORED: frozenset[Any] = frozenset(
    getattr(torch_checkpoint, "SAC_IGNORED_OPS", {torch.ops.aten.detach.default})
)
"""Ops SAC's dispatch mode neither counts nor shows to the policy; the swap marker skips them too."""


class SwapMarker(TorchDispatchMode):
    """Counts a block's ops like SAC does and notes, in the swapper, the storages of the outputs `spec`
    names."""

    def __init__(self, layer: int, spec: SwapSpec, swapper: Swapper) -> None:
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.swapper = swapper
        self.counts: Counter[str] = Counter()
        self.paused = False
        """Set while a pack hook runs: its own ops are not the block's."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.paused or func in SAC_IGNORED:
            return out
        name = str(func)
        occurrence = self.counts[name]
        self.counts[name] += 1
        positions = self.spec.get((name, occurrence))
        if positions:
            outs = out if isinstance(out, (tuple, list)) else [out]
            tensors = [t for t in outs if isinstance(t, torch.Tensor)]
            for i in positions:
                if i >= len(tensors):  # the op made fewer tensors than the plan lists: not swapped
                    self.swapper.info.missed_swaps += 1
                    continue
                key = f"layer{self.layer}.{name}#{occurrence}.{i}"
                self.swapper.note(tensors[i].untyped_storage(), self.layer, key)
        return out

    def missed(self) -> int:
        """How many outputs of `spec` this forward never produced (an op the plan lists did not run)."""
        return sum(len(p) for (name, k), p in self.spec.items() if self.counts[name] <= k)


class _Swapped:
    """One storage on the tier, shared by the packed views of it; read back once, freed with the last view."""

    def __init__(
        self,
        swapper: Swapper,
        layer: int,
        handle: Handle,
        original: torch.UntypedStorage,
        device: torch.device,
    ) -> None:
        self.swapper = swapper
        self.layer = layer
        self.device = device
        """The tensor's device (a fake tensor's storage says `meta`: the dry run needs the tensor's)."""
        self.original = weakref.ref(original)
        """The device storage that was swapped: if something outside the hooks still holds it when backward
        asks (autograd outside the blocks, the caller), it is used instead of a second copy from the tier."""
        self.handle: Handle | None = handle
        self.data: torch.Tensor | None = None
        self.refs = 0
        self.prefetched = False

    def load(self) -> torch.Tensor:
        """The storage's bytes on the device (the first call reads them back and frees the tier copy)."""
        sw = self.swapper
        with sw.lock:
            if self.data is None:
                if self.handle is None:
                    raise RuntimeError(
                        "memplan.applied(mechanism='torch'): a swapped activation was freed when the block "
                        "exited; run the backward inside the `with memplan.applied(...)` block"
                    )
                sw.on_first_load(self.layer)
                original = self.original()
                if original is not None:  # still on the device: reading it back would hold it twice
                    self.data = torch.empty(0, dtype=torch.uint8, device=self.device).set_(original)
                    sw.info.held_on_device += 1
                else:
                    self.data = sw.store.get(self.handle)
                sw.store.free(self.handle)
                self.handle = None
                sw.info.loaded_tensors += 1
            return self.data

    def prefetch(self) -> None:
        """Start reading the bytes back if they are still only on the tier (the caller holds the lock)."""
        if self.handle is not None and self.data is None and not self.prefetched:
            self.swapper.store.prefetch(self.handle)
            self.prefetched = True
            self.swapper.info.prefetched_tensors += 1

    def release(self) -> None:
        """One packed view is gone; with the last one, drop the bytes wherever they are."""
        sw = self.swapper
        with sw.lock:
            self.refs -= 1
            if self.refs > 0:
                return
            self.data = None
            if self.handle is not None and not sw.closed:
                try:
                    sw.store.free(self.handle)
                except Exception:  # noqa: BLE001  a finalizer: a store the caller closed already freed it
                    pass
            self.handle = None
            sw.live.discard(self)


class _Packed:
    """What autograd holds for a swapped saved tensor: its storage record, how to view it, and the version
    the tensor had when saved."""

    def __init__(self, record: _Swapped, t: torch.Tensor) -> None:
        self.record = record
        self.dtype = t.dtype
        self.size = tuple(t.shape)
        self.stride = t.stride()
        self.offset = t.storage_offset()
        self.tensor = weakref.ref(t)
        self.version = t._version
        """The version the tensor had when saved (checked on unpack while the tensor is alive: a swapped
        tensor that died since is not checked, its bytes were copied when it was saved)."""


def _check_version(t: torch.Tensor, saved: int) -> None:
    """Raise autograd's error if `t` was modified in place since it was saved at version `saved`:
    saved-tensor hooks turn autograd's own check off, so the unpack hook makes it."""
    if t._version != saved:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: a tensor of shape {list(t.shape)} is at version {t._version}; expected version "
            f"{saved} instead (checked by memplan.applied(mechanism='torch'), whose saved-tensor hooks turn "
            "off autograd's own check)"
        )


class Swapper:
    """The saved-tensor hooks of the swapping blocks, sharing one store, with prefetch across blocks."""

    def __init__(self, store: TierStore, info: EagerInfo) -> None:
        self.store = store
        self.info = info
        self.lock = threading.RLock()
        self.live: set[_Swapped] = set()
        self.started: set[int] = set()
        """Layers whose backward has read a tensor back (reset when a forward swaps in the layer again)."""
        self.closed = False
        self.storages: dict[int, tuple[int, str]] = {}
        """Storage id (`_cdata`) -> (layer, tier key), while that storage lives (ids are reused after a free).
        Shared by every block, so a tensor saved by a later block than the one producing it is swapped too."""
        self.records: dict[int, _Swapped] = {}
        """Storage id -> its copy on the tier, once packed (all the packed views of the storage share it)."""

    def note(self, storage: torch.UntypedStorage, layer: int, key: str) -> None:
        """A storage to swap if autograd saves it, forgotten when it is freed."""
        sid = storage._cdata
        self.storages[sid] = (layer, key)
        weakref.finalize(storage, self.forget, sid)

    def forget(self, sid: int) -> None:
        """A noted storage was freed: its id may now name another storage."""
        self.storages.pop(sid, None)
        self.records.pop(sid, None)

    def hooks(
        self, marker: SwapMarker | None
    ) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
        """(pack, unpack) for one forward of a block (`marker`: the one that watches it, if it swaps)."""
        records = self.records

        def pack(t: torch.Tensor) -> Any:
            sid = t.untyped_storage()._cdata
            noted = self.storages.get(sid)
            if noted is None:
                return (t, t._version)
            layer, key = noted
            if marker is not None:
                marker.paused = True
            try:
                record = records.get(sid)
                if record is None or record.refs == 0:  # not on the tier, or released since: put it (again)
                    storage = t.untyped_storage()
                    whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                    handle = self.store.put(key, whole)
                    record = records[sid] = _Swapped(self, layer, handle, storage, t.device)
                    with self.lock:
                        self.live.add(record)
                        self.started.discard(layer)
                    self.info.swapped_tensors += 1
                    self.info.swapped_bytes += handle.nbytes
                packed = _Packed(record, t)
                with self.lock:
                    record.refs += 1
                weakref.finalize(packed, record.release)
                return packed
            finally:
                if marker is not None:
                    marker.paused = False

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, tuple):
                t, version = packed
                _check_version(t, version)
                return t  # type: ignore[no-any-return]
            alive = packed.tensor()
            if alive is not None:
                _check_version(alive, packed.version)
            data = packed.record.load()
            with torch.no_grad():
                return torch.empty(0, dtype=packed.dtype, device=data.device).set_(
                    data.untyped_storage(),
                    data.storage_offset() // packed.dtype.itemsize + packed.offset,
                    packed.size,
                    packed.stride,
                )

        return pack, unpack

    def on_first_load(self, layer: int) -> None:
        """Backward reached `layer`: prefetch the swapped tensors of the nearest block before it."""
        if layer in self.started:
            return
        self.started.add(layer)
        before = [r.layer for r in self.live if r.layer < layer and r.handle is not None]
        if before:
            previous = max(before)
            for r in list(self.live):
                if r.layer == previous:
                    r.prefetch()

    def close(self, raise_errors: bool = True) -> None:
        """Free what is still on the tier (a forward whose backward did not run inside the block); a failed
        copy's error is raised after the frees, unless `raise_errors` is off (another error is on its way)."""
        with self.lock:
            errors: list[Exception] = []
            for step in [self.store.flush] + [self._dropper(r) for r in list(self.live)]:
                try:
                    step()
                except Exception as e:  # noqa: BLE001  free the rest first
                    errors.append(e)
            self.live.clear()
            self.closed = True
        if errors and raise_errors:
            raise errors[0]

    def exit(self, kind: type[BaseException] | None, *_: object) -> None:
        """`close` as an exit callback: the body's own error, if any, wins over a failed copy's."""
        self.close(raise_errors=kind is None)

    def _dropper(self, r: _Swapped) -> Callable[[], None]:
        def drop() -> None:
            handle, r.handle, r.data = r.handle, None, None
            if handle is not None:
                self.store.free(handle)

        return drop


def swapping_forward(
    forward: Callable[..., Any], layer: int, spec: SwapSpec, swapper: Swapper
) -> Callable[..., Any]:
    """`forward` with the plan's swaps of `layer` sent to the tier by saved-tensor hooks (plain without
    grad)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        marker = SwapMarker(layer, spec, swapper) if spec else None  # no per-op Python cost without swaps
        pack, unpack = swapper.hooks(marker)
        with ExitStack() as stack:
            if marker is not None:
                stack.enter_context(marker)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
            out = forward(*args, **kwargs)
        if marker is not None:
            swapper.info.missed_swaps += marker.missed()
        return out

    return run
