"""Large aligned file I/O, with `O_DIRECT` where the filesystem allows it.

Why O_DIRECT: a swapped activation is written once and read once. Through the page cache it would
stay in RAM as well (defeating the point of moving it out of memory), and reads would measure RAM,
not the disk. O_DIRECT moves data straight between the buffer and the device, but needs the buffer
address, the file offset and the length to be multiples of the device's logical block size; 4096
bytes (`ALIGN`) covers every common device. Buffers here are anonymous `mmap`s, which are page
aligned; transfers go in chunks that are multiples of `ALIGN`, and the last one is zero-padded, so a
file holds its tensor rounded up to `ALIGN`.

Some filesystems (tmpfs, some overlay and network filesystems) refuse O_DIRECT with EINVAL, at open
or at the first transfer; callers then fall back to buffered I/O and say so.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
from collections.abc import Iterator
from contextlib import contextmanager

ALIGN = 4096
"""Alignment of O_DIRECT buffers, offsets and lengths, in bytes."""


def round_up(n: int, align: int = ALIGN) -> int:
    """`n` rounded up to a multiple of `align`."""
    return -(-n // align) * align


class BouncePool:
    """A fixed set of page-aligned buffers of `size` bytes, one per concurrent transfer."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._all = [mmap.mmap(-1, size) for _ in range(count)]
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for buf in self._all:
            self._free.put(buf)

    @contextmanager
    def take(self) -> Iterator[mmap.mmap]:
        """A buffer for the duration of one transfer (waits while all are in use)."""
        buf = self._free.get()
        try:
            yield buf
        finally:
            self._free.put(buf)

    def close(self) -> None:
        """Unmap the buffers (one still viewed somewhere is left to the garbage collector)."""
        for buf in self._all:
            try:
                buf.close()
            except BufferError:
                pass


def open_file(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    """Open `path`, with O_DIRECT if `direct` and the filesystem accepts it; (fd, O_DIRECT used)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o600), False


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at `offset` (retrying partial writes)."""
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"write returned {n} bytes")
        done += n


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; the bytes read, fewer only at end of file.

    A count that is not a multiple of ALIGN means end of file (and another O_DIRECT read from the
    unaligned position would fail), so reading stops there.
    """
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        done += n
        if n == 0 or n % ALIGN:
            break
    return done
