"""The SSD tier of a generation plan: every streamed weight in one file, at the offset the `allocate` pass
gave it, so that the weights a unit needs are one contiguous aligned read.

`WeightFile.create` writes the tensors at their offsets (page-aligned, with `O_DIRECT` where the
filesystem allows, through the SSD tier's `direct_io` helpers) after checking the disk has room, and
keeps a CRC-32 of each tensor (computed from memory while writing). `read_into` fills a caller's
buffer with one byte range on the reader thread, then a checker thread checks the CRC of every tensor in
it (the next read starts meanwhile): a corrupted
file raises `TierCorrupt` naming the tensor and the file, a short read `TierIOError`. The file lives in
a fresh directory inside the tier's `path` (or the temporary directory), removed at `close`, also when
writing fails half-way, so nothing is left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from memplan.runtime.tiers.direct_io import ALIGN, BouncePool, open_file, pread_full, pwrite_all, round_up
from memplan.runtime.tiers.errors import TierCorrupt, TierFull, TierIOError, TierUnavailable

CHUNK = 8 << 20
"""Bytes per write through the bounce buffer."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One tensor in the file: its name, offset, bytes and CRC-32."""

    name: str
    offset: int
    nbytes: int
    crc: int


@dataclass
class FileStats:
    """What the file did: bytes and seconds read (summed over reads), and the union of the reads' spans."""

    bytes_read: int = 0
    reads: int = 0
    read_s: float = 0.0
    busy_s: float = 0.0


class WeightFile:
    """One file of weights; see the module docstring."""

    def __init__(self, directory: str, path: str, fd: int, direct: bool, stored: dict[int, Stored]) -> None:
        self.directory = directory
        self.path = path
        self.direct = direct
        self.stored = stored
        self._fd = fd
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memplan-weights")
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memplan-crc")
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self.stats = FileStats()

    @property
    def description(self) -> str:
        return (
            f"{self.path} ({'O_DIRECT' if self.direct else 'buffered I/O: the filesystem refused O_DIRECT'})"
        )

    @staticmethod
    def create(
        parent: str | None, tensors: dict[int, tuple[str, torch.Tensor]], offsets: dict[int, int], size: int
    ) -> WeightFile:
        """Write `tensors` (value id -> (name, tensor)) at `offsets` into a new file of `size` bytes."""
        if parent is not None and not os.path.isdir(parent):
            raise TierUnavailable(f"the SSD tier's directory {parent} does not exist: create it first")
        free = shutil.disk_usage(parent or tempfile.gettempdir()).free
        if size > free:
            raise TierFull(
                f"the weight file needs {size} bytes on {parent or tempfile.gettempdir()}, which has {free} "
                "free: free space, or point the SSD tier's path at a larger disk",
                size,
                free,
            )
        directory = tempfile.mkdtemp(prefix="memplan-weights-", dir=parent)
        path = os.path.join(directory, "weights.bin")
        fd = -1
        try:
            fd, direct = open_file(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, True)
            stored = _write_all(fd, tensors, offsets)
            os.fsync(fd)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise TierFull(f"the disk holding {path} filled up while writing the weights", size, 0) from e
            raise TierIOError(f"writing the weight file {path} failed: {e.strerror}") from e
        except BaseException:
            if fd >= 0:
                os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return WeightFile(directory, path, fd, direct, stored)

    def read_into(self, start: int, out: torch.Tensor, members: list[int]) -> Future[None]:
        """Start reading `out.numel()` bytes from `start` into `out` (uint8, page-aligned); the future is done
        once the CRC of each value in `members` (which lie inside the range) is checked. Reads run one after
        another on the reader thread and checksums on a checker thread, so the disk never waits for a CRC."""
        done: Future[None] = Future()
        self._pool.submit(self._read_then_check, start, [out], members, done)
        return done

    def _read_then_check(self, start: int, box: list[Any], members: list[int], done: Future[None]) -> None:
        """Read, then hand the checksums to the checker. The buffer travels in `box`, emptied as it goes:
        a pool's work item holds its arguments until its thread next runs, which would keep a buffer the
        caller has dropped alive (the placement bench saw a copy outlive its eviction that way)."""
        try:
            view, t0 = self._read(start, box.pop())
        except BaseException as e:
            done.set_exception(e)
            return
        box.append(view)
        del view
        self._checker.submit(self._check_into, box, start, members, t0, done)

    def _check_into(
        self, box: list[Any], start: int, members: list[int], t0: float, done: Future[None]
    ) -> None:
        view = box.pop()
        try:
            self._check(view, start, members)
            self._account(len(view), t0)
        except BaseException as e:
            view = None
            done.set_exception(e)
        else:
            view = None
            done.set_result(None)

    def _read(self, start: int, out: torch.Tensor) -> tuple[memoryview, float]:
        t0 = time.perf_counter()
        view = memoryview(out.numpy()).cast("B")
        got = pread_full(self._fd, view, start)
        if got < min(len(view), os.fstat(self._fd).st_size - start):
            raise TierIOError(f"short read from {self.path}: {got} of {len(view)} bytes at offset {start}")
        return view, t0

    def _check(self, view: memoryview, start: int, members: list[int]) -> None:
        for vid in members:
            s = self.stored[vid]
            lo = s.offset - start
            crc = zlib.crc32(view[lo : lo + s.nbytes])
            if crc != s.crc:
                raise TierCorrupt(
                    f"weight {s.name!r} read back from {self.path} is corrupted (CRC-32 {crc:#010x}, written "
                    f"as {s.crc:#010x}); the disk or filesystem damaged it",
                    key=s.name,
                    path=self.path,
                )

    def _account(self, nbytes: int, t0: float) -> None:
        t1 = time.perf_counter()
        with self._lock:
            self.stats.bytes_read += nbytes
            self.stats.reads += 1
            self.stats.read_s += t1 - t0
            self.stats.busy_s += t1 - max(t0, self._busy_until)
            self._busy_until = max(self._busy_until, t1)

    def read_tensor(self, vid: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """One tensor, read now into fresh memory (used to give the model its weights back)."""
        s = self.stored[vid]
        lo = s.offset - s.offset % ALIGN
        buf, aligned = aligned_buffer(round_up(s.offset + s.nbytes) - lo)
        view, t0 = self._read(lo, aligned)
        self._check(view, lo, [vid])
        self._account(len(view), t0)
        start = s.offset - lo
        return aligned[start : start + s.nbytes].clone().view(dtype).view(shape)

    def close(self) -> None:
        """Stop the reader, close and delete the file and its directory."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._checker.shutdown(wait=True, cancel_futures=True)
        try:
            os.close(self._fd)
        except OSError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)


def aligned_buffer(nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 tensor with a page-aligned view of `nbytes` bytes in it (O_DIRECT needs aligned memory):
    (the allocation, the view). Allocated on the calling thread, so a live-storage tracker sees it."""
    buf = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    pad = (-buf.data_ptr()) % ALIGN
    return buf, buf[pad : pad + nbytes]


def _write_all(
    fd: int, tensors: dict[int, tuple[str, torch.Tensor]], offsets: dict[int, int]
) -> dict[int, Stored]:
    """Write each tensor at its offset through a page-aligned bounce buffer; their CRC-32s."""
    pool = BouncePool(1, CHUNK)
    stored: dict[int, Stored] = {}
    try:
        with pool.take() as bounce:
            for vid in sorted(tensors, key=lambda v: offsets[v]):
                name, t = tensors[vid]
                # a copy: `.numpy()` marks a storage non-resizable, and this one is the model's parameter
                data = memoryview(t.detach().reshape(-1).view(torch.uint8).clone().numpy()).cast("B")
                off = offsets[vid]
                if off % ALIGN:
                    raise TierIOError(f"weight {name!r} at offset {off}, not a multiple of {ALIGN}")
                crc = 0
                for lo in range(0, len(data), CHUNK):
                    part = data[lo : lo + CHUNK]
                    crc = zlib.crc32(part, crc)
                    n = len(part)
                    bounce[:n] = part
                    padded = round_up(n)
                    bounce[n:padded] = bytes(padded - n)
                    pwrite_all(fd, memoryview(bounce)[:padded], off + lo)
                stored[vid] = Stored(name, off, len(data), crc)
    finally:
        pool.close()
    return stored
