"""The SSD tier: one file per tensor, written and read in large aligned chunks with O_DIRECT.

Files go in a fresh directory (`memplan-ssd-*`) made inside the tier's `path`, or in the system's
temporary directory when the tier names none; a tensor's file is deleted when it is freed, and the
directory itself at close, so a run leaves nothing behind. Data moves through page-aligned bounce
buffers in chunks (8 MiB by default) so that O_DIRECT applies (see `direct_io` for why); where the
filesystem refuses O_DIRECT, the backend switches to buffered I/O and its description says so
(bandwidth then includes the page cache).

Every tensor gets a CRC-32 computed while it is written (`zlib.crc32` over each chunk, about
1.3 GB/s on a small x86 core: the cheapest checksum the standard library has; blake2b ran at 0.3 GB/s)
and checked when it is read back, so a corrupted file raises `TierCorrupt` naming the tensor and the
file instead of silently returning wrong activations. A full disk raises `TierFull` naming the
directory, the bytes needed and the bytes free (checked before writing, and on ENOSPC while writing);
a truncated file or failed read raises `TierIOError`.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from memplan.ir.hardware import Hardware
from memplan.runtime.tiers.direct_io import ALIGN, BouncePool, open_file, pread_full, pwrite_all, round_up
from memplan.runtime.tiers.errors import TierCorrupt, TierError, TierFull, TierIOError, TierUnavailable
from memplan.runtime.tiers.store import AsyncTierStore
from memplan.runtime.tiers.tensor_bytes import copy_bytes, fresh_on, to_cpu


@dataclass(frozen=True, slots=True)
class SsdOptions:
    """How the SSD tier moves data; every technique is a switch so benchmarks can turn it off."""

    direct: bool = True
    """Use O_DIRECT where the filesystem allows it (else buffered I/O through the page cache)."""
    checksum: bool = True
    """CRC-32 per tensor, verified on read."""
    chunk_bytes: int = 8 << 20
    """Bytes per transfer (a multiple of 4096); also the size of each bounce buffer."""

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.chunk_bytes % ALIGN:
            raise TierError(f"SSD chunk_bytes must be a positive multiple of {ALIGN}, got {self.chunk_bytes}")


DEFAULT_SSD_OPTIONS = SsdOptions()


@dataclass(frozen=True, slots=True)
class SsdFile:
    """A tensor on the SSD: its file, its size in bytes (the file is padded to ALIGN) and its CRC-32."""

    key: str
    path: str
    nbytes: int
    checksum: int | None


class SsdBackend:
    """Files in a private directory; see the module docstring."""

    def __init__(self, parent: str | None, options: SsdOptions, buffers: int) -> None:
        if parent is not None and not os.path.isdir(parent):
            raise TierUnavailable(
                f"the SSD tier's directory {parent} does not exist: create it, or leave the tier's path "
                "unset to use a temporary directory"
            )
        self.directory = tempfile.mkdtemp(prefix="memplan-ssd-", dir=parent)
        self._options = options
        self._direct = options.direct
        self._mode = "O_DIRECT" if options.direct else "buffered I/O, O_DIRECT off"
        self._pool = BouncePool(buffers, options.chunk_bytes)
        self._names = itertools.count()

    @property
    def description(self) -> str:
        return f"files in {self.directory} ({self._mode})"

    @property
    def emulated(self) -> bool:
        return False

    def write(self, key: str, data: torch.Tensor, ready: torch.cuda.Event | None) -> SsdFile:
        src = to_cpu(data, ready)
        nbytes = src.numel()
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:48]
        path = os.path.join(self.directory, f"{next(self._names):06d}-{safe}.bin")
        self._check_space(key, nbytes)
        try:
            checksum = self._write_file(path, src.numpy().data)
        except OSError as e:
            _remove(path)
            raise self._write_error(e, key, path, nbytes) from e
        except BaseException:
            _remove(path)
            raise
        return SsdFile(key, path, nbytes, checksum)

    def read(
        self,
        stored: SsdFile,
        device: torch.device,
        consumer: torch.cuda.Stream | None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = (
            into
            if into is not None and into.device.type == "cpu"
            else torch.empty(stored.nbytes, dtype=torch.uint8)
        )
        try:
            fd, _ = open_file(stored.path, os.O_RDONLY, self._direct)
        except OSError as e:
            raise TierIOError(f"tensor {stored.key!r}: cannot open {stored.path}: {e.strerror}") from e
        try:
            checksum = self._read_chunks(fd, out.numpy(), stored)
        except OSError as e:
            raise TierIOError(f"reading tensor {stored.key!r} from {stored.path} failed: {e.strerror}") from e
        finally:
            os.close(fd)
        if stored.checksum is not None and checksum != stored.checksum:
            raise TierCorrupt(
                f"tensor {stored.key!r} read back from {stored.path} is corrupted (CRC-32 {checksum:#010x}, "
                f"written as {stored.checksum:#010x}); the disk or filesystem damaged it",
                key=stored.key,
                path=stored.path,
            )
        if into is not None and into.device.type != "cpu":
            copy_bytes(into, out)
            return into
        return fresh_on(out, device, consumer, borrowed=False)

    def release(self, stored: SsdFile) -> None:
        _remove(stored.path)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self._pool.close()

    def _write_file(self, path: str, src: memoryview) -> int | None:
        """Write `src` to a new file at `path`; its CRC-32 (None when checksums are off)."""
        fd, direct = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self._direct)
        if self._direct and not direct:
            self._fall_back("O_DIRECT refused at open")
        try:
            return self._write_chunks(fd, src)
        except OSError as e:
            if not (direct and e.errno == errno.EINVAL):
                raise
        finally:
            os.close(fd)
        self._fall_back("O_DIRECT writes refused with EINVAL")
        return self._write_file(path, src)

    def _write_chunks(self, fd: int, src: memoryview) -> int | None:
        crc, n, chunk = 0, len(src), self._options.chunk_bytes
        with self._pool.take() as buf, memoryview(buf) as view:
            for off in range(0, n, chunk):
                m = min(chunk, n - off)
                padded = round_up(m)
                buf[:m] = src[off : off + m]
                buf[m:padded] = bytes(padded - m)
                if self._options.checksum:
                    crc = zlib.crc32(view[:m], crc)
                pwrite_all(fd, view[:padded], off)
        return crc if self._options.checksum else None

    def _read_chunks(self, fd: int, out: np.ndarray, stored: SsdFile) -> int:
        crc, n, chunk = 0, stored.nbytes, self._options.chunk_bytes
        with self._pool.take() as buf, memoryview(buf) as view:
            for off in range(0, n, chunk):
                m = min(chunk, n - off)
                got = pread_full(fd, view[: round_up(m)], off)
                if got < m:
                    raise TierIOError(
                        f"short read: {stored.path} holds {off + got} of the {n} bytes of tensor "
                        f"{stored.key!r}; the file was truncated or the device failed"
                    )
                out[off : off + m] = np.frombuffer(view[:m], dtype=np.uint8)
                if stored.checksum is not None:
                    crc = zlib.crc32(view[:m], crc)
        return crc

    def _fall_back(self, why: str) -> None:
        self._direct = False
        self._mode = f"buffered I/O: {why} on this filesystem, so the page cache holds swapped data"

    def _check_space(self, key: str, nbytes: int) -> None:
        free = _free_bytes(self.directory)
        if round_up(nbytes) > free:
            raise self._full(key, nbytes, free)

    def _full(self, key: str, nbytes: int, free: int) -> TierFull:
        return TierFull(
            f"SSD tier directory {self.directory} is full: tensor {key!r} needs {round_up(nbytes)} bytes and "
            f"{free} bytes are free; free space there, point the tier's path at a larger disk, or plan "
            "with a smaller ssd capacity",
            needed_bytes=round_up(nbytes),
            free_bytes=free,
        )

    def _write_error(self, e: OSError, key: str, path: str, nbytes: int) -> TierError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return self._full(key, nbytes, _free_bytes(self.directory))
        return TierIOError(f"writing tensor {key!r} to {path} failed: {e.strerror or e}")


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def open_ssd(
    hardware: Hardware, *, options: SsdOptions = DEFAULT_SSD_OPTIONS, workers: int = 2
) -> AsyncTierStore[SsdFile]:
    """A store on the hardware's `ssd` tier, its files under the tier's `path` (or a temporary directory)."""
    tier = hardware.tier("ssd")
    backend = SsdBackend(tier.path, options, buffers=workers + 1)
    return AsyncTierStore("ssd", backend, tier.capacity_bytes, workers=workers)
