"""The tier store: one asynchronous API over every memory tier the executor swaps tensors to.

    h = store.put("block3.attn.out", t)   # starts copying t out; returns at once
    ...                                   # caller computes; the copy runs on a worker thread
    store.prefetch(h)                     # starts reading it back
    ...                                   # more compute overlaps the read
    t2 = store.get(h)                     # instant if the prefetch finished; bitwise equal to t
    store.free(h)                         # the tier forgets it (its memory or file is released)

`put` keeps a reference to `t` until its copy is done, so the caller may drop `t` at once; it must not
modify `t` in place before the copy is done (`flush` waits for every copy). Work runs on a small
`ThreadPoolExecutor` (on CUDA, each worker copies on its own stream: see `tensor_bytes`); its queue is
first-in first-out, so a read-back never waits for a write queued after it.

What a tier is made of lives in a `Backend` (`api.py`: host or NUMA memory, files on an SSD); this
module owns what every tier shares: handles, capacity, counters, errors from workers, cleanup. `close` waits
for running copies, releases every tensor and closes the backend; it also runs on `with` exit, when the
store is garbage-collected, and at interpreter exit (`weakref.finalize`, whose callback holds the
store's state but not the store).

Counters: live and peak bytes held by the tier (reserved at `put`, released on `free`, on a failed
copy and at `close`), bytes and seconds written and read (summed per copy: their ratio is the
bandwidth one copy sees), `busy_s`, the wall time during which at least one copy was running (the
union of their intervals, so concurrent copies are not counted twice), and `wait_s`, the time the
caller blocked in `get`, `free` and `flush`. Busy time the caller did not wait through overlapped its
own work: that is the measure of how well prefetching hides the tier (`TierStats.overlap_fraction`).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Literal, Self, TypeVar

import torch

from memplan.runtime.tiers.api import Backend, Handle, TierStats
from memplan.runtime.tiers.errors import TierError, TierFull
from memplan.runtime.tiers.tensor_bytes import (
    TensorMeta,
    consumer_stream,
    flat_bytes,
    from_bytes,
    meta_of,
    ready_event,
)

S = TypeVar("S")


@dataclass(slots=True)
class _Entry(Generic[S]):
    """A live tensor: its handle, metadata, the write that stores it and any prefetch under way."""

    handle: Handle
    meta: TensorMeta
    written: Future[S]
    fetched: Future[torch.Tensor] | None = None


class _Counters:
    """Mutable counters behind a lock; `AsyncTierStore.stats` freezes them into `TierStats`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = self.peak = self.written = self.read = self.puts = self.gets = 0
        self.write_s = self.read_s = self.wait_s = self.busy_s = 0.0
        self.in_flight = 0
        self.busy_since = 0.0

    def reserve(self, nbytes: int, capacity: int, tier: str, key: str) -> None:
        with self.lock:
            if self.live + nbytes > capacity:
                raise TierFull(
                    f"tier {tier!r} is full: tensor {key!r} needs {nbytes} bytes and {self.live} of its "
                    f"{capacity} bytes are in use; free tensors first or plan with a larger capacity",
                    needed_bytes=nbytes,
                    free_bytes=capacity - self.live,
                )
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.puts += 1

    def unreserve(self, nbytes: int) -> None:
        with self.lock:
            self.live -= nbytes

    @contextmanager
    def transfer(self, direction: Literal["write", "read"], nbytes: int) -> Iterator[None]:
        """Time one copy, counting it in the busy time; its bytes count only if it succeeds."""
        start = time.perf_counter()
        with self.lock:
            if self.in_flight == 0:
                self.busy_since = start
            self.in_flight += 1
        done = False
        try:
            yield
            done = True
        finally:
            end = time.perf_counter()
            with self.lock:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.busy_s += end - self.busy_since
                if done:
                    self._add(direction, nbytes, end - start)

    def _add(self, direction: Literal["write", "read"], nbytes: int, seconds: float) -> None:
        if direction == "write":
            self.written += nbytes
            self.write_s += seconds
        else:
            self.read += nbytes
            self.read_s += seconds

    def busy_now(self) -> float:
        """Busy seconds so far, including the copies running now (call with the lock held)."""
        running = time.perf_counter() - self.busy_since if self.in_flight else 0.0
        return self.busy_s + running

    def waited(self, seconds: float, gets: int = 0) -> None:
        with self.lock:
            self.wait_s += seconds
            self.gets += gets


class _State(Generic[S]):
    """Everything a store owns; `shutdown` releases it and must not reference the store itself."""

    def __init__(self, backend: Backend[S], tier: str, workers: int) -> None:
        self.backend = backend
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"memplan-{tier}")
        self.lock = threading.Lock()
        self.entries: dict[int, _Entry[S]] = {}
        self.counters = _Counters()
        self.closed = False

    def shutdown(self) -> None:
        """Wait for running copies, cancel queued ones, release every tensor, close the backend."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            entries = list(self.entries.values())
            self.entries.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
        try:
            for entry in entries:
                stored = _stored_or_none(entry.written)
                if stored is not None:
                    self.backend.release(stored)
        finally:
            self.backend.close()
            with self.counters.lock:
                self.counters.live = 0

    # The jobs are the state's, not the store's: a queued job must not keep the store alive, or the
    # store's finalizer could run on a worker thread and wait for that very thread.

    def write_job(self, key: str, t: torch.Tensor, ready: torch.cuda.Event | None) -> S:
        nbytes = t.numel() * t.element_size()
        try:
            with self.counters.transfer("write", nbytes):
                return self.backend.write(key, flat_bytes(t), ready)
        except BaseException:
            self.counters.unreserve(nbytes)
            raise

    def read_job(
        self,
        entry: _Entry[S],
        device: torch.device,
        consumer: torch.cuda.Stream | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        stored = entry.written.result()
        with self.counters.transfer("read", entry.meta.nbytes):
            return self.backend.read(stored, device, consumer, out)


def _out_bytes(handle: Handle, out: torch.Tensor | None) -> torch.Tensor | None:
    """`out` as flat bytes, after checking it can hold the tensor of `handle` exactly."""
    if out is None:
        return None
    if out.dtype != handle.dtype or tuple(out.shape) != handle.shape or not out.is_contiguous():
        raise TierError(
            f"tensor {handle.key!r}: the buffer to read into must be contiguous {handle.dtype} "
            f"{list(handle.shape)}, "
            f"got {out.dtype} {list(out.shape)}{'' if out.is_contiguous() else ' (strided)'}"
        )
    return out.reshape(-1).view(torch.uint8)


def _stored_or_none(written: Future[S]) -> S | None:
    """What a finished write stored, or None if it failed or was cancelled."""
    if written.cancelled() or written.exception() is not None:
        return None
    return written.result()


def _quietly_wait(future: Future[Any]) -> None:
    """Wait for a future to settle; its error, if any, is reported by whoever needs its result."""
    if not future.cancelled():
        future.exception()


class AsyncTierStore(Generic[S]):
    """A `TierStore` over a `Backend`: handles, worker pool, capacity, counters and cleanup."""

    def __init__(self, tier: str, backend: Backend[S], capacity_bytes: int, *, workers: int = 2) -> None:
        if workers < 1:
            backend.close()
            raise TierError(f"tier {tier!r}: workers must be at least 1, got {workers}")
        self.tier = tier
        self.capacity_bytes = capacity_bytes
        self._ids = itertools.count()
        self._state: _State[S] = _State(backend, tier, workers)
        self._finalizer = weakref.finalize(self, self._state.shutdown)

    def put(self, key: str, t: torch.Tensor) -> Handle:
        """Start copying `t` out to the tier and return its handle at once."""
        meta = meta_of(key, t)
        handle = Handle(next(self._ids), key, self.tier, meta.nbytes, meta.dtype, meta.shape)
        with self._state.lock:
            self._check_open()
            self._state.counters.reserve(meta.nbytes, self.capacity_bytes, self.tier, key)
            written = self._state.pool.submit(self._state.write_job, key, t, ready_event(t))
            self._state.entries[handle.id] = _Entry(handle, meta, written)
        return handle

    def prefetch(self, handle: Handle, out: torch.Tensor | None = None) -> None:
        """Start reading the tensor back so that a later `get` does not wait (no-op if under way). With `out`
        (a contiguous tensor of the same dtype and shape, allocated by the caller, so on the caller's thread)
        the bytes land there instead of in a buffer the worker allocates."""
        out_bytes = _out_bytes(handle, out)
        with self._state.lock:
            entry = self._entry(handle)
            if entry.fetched is None:
                device = entry.meta.device
                job = self._state.pool.submit(
                    self._state.read_job, entry, device, consumer_stream(device), out_bytes
                )
                entry.fetched = job

    def wait(self, handle: Handle) -> None:
        """Block until the copy out of this tensor is finished (its source may then be freed); raises its
        error."""
        with self._state.lock:
            entry = self._entry(handle)
        start = time.perf_counter()
        try:
            entry.written.result()
        finally:
            self._state.counters.waited(time.perf_counter() - start, gets=0)

    def get(self, handle: Handle, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, bitwise equal to what was put; blocks until its bytes are back (in `out` if given,
        or in the buffer given to `prefetch`)."""
        with self._state.lock:
            entry = self._entry(handle)
            fetched, entry.fetched = entry.fetched, None
        start = time.perf_counter()
        try:
            if fetched is not None:
                data = fetched.result()
            else:
                device = entry.meta.device
                data = self._state.read_job(entry, device, consumer_stream(device), _out_bytes(handle, out))
        finally:
            self._state.counters.waited(time.perf_counter() - start, gets=1)
        return from_bytes(data, entry.meta)

    def free(self, handle: Handle) -> None:
        """Drop the tensor from the tier (waits for its copies still running)."""
        with self._state.lock:
            entry = self._entry(handle)
            del self._state.entries[handle.id]
        start = time.perf_counter()
        try:
            if entry.fetched is not None:
                entry.fetched.cancel()
                _quietly_wait(entry.fetched)
            _quietly_wait(entry.written)
            stored = _stored_or_none(entry.written)
            if stored is not None:
                self._state.backend.release(stored)
                self._state.counters.unreserve(entry.meta.nbytes)
        finally:
            self._state.counters.waited(time.perf_counter() - start)

    def flush(self) -> None:
        """Wait until every copy out has finished; raises the first failed copy's error."""
        with self._state.lock:
            self._check_open()
            pending = [e.written for e in self._state.entries.values()]
        start = time.perf_counter()
        try:
            for written in pending:
                written.result()
        finally:
            self._state.counters.waited(time.perf_counter() - start)

    def stats(self) -> TierStats:
        """A snapshot of the counters (see `TierStats`)."""
        c = self._state.counters
        with c.lock:
            return TierStats(
                tier=self.tier,
                backend=self._state.backend.description,
                emulated=self._state.backend.emulated,
                live_bytes=c.live,
                peak_bytes=c.peak,
                bytes_written=c.written,
                bytes_read=c.read,
                puts=c.puts,
                gets=c.gets,
                write_s=c.write_s,
                read_s=c.read_s,
                busy_s=c.busy_now(),
                wait_s=c.wait_s,
            )

    def close(self) -> None:
        """Release every tensor and the backend (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._state.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._state.closed:
            raise TierError(f"tier {self.tier!r}: the store is closed")

    def _entry(self, handle: Handle) -> _Entry[S]:
        self._check_open()
        entry = self._state.entries.get(handle.id)
        if entry is None or entry.handle != handle:
            raise TierError(
                f"tier {self.tier!r}: no tensor {handle.key!r} (handle {handle.id}): it was freed or "
                "belongs to another store"
            )
        return entry
