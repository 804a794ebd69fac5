"""NUMA nodes of this machine, and memory allocated on one of them (how CXL memory is reached).

A CXL memory expander appears to Linux as a NUMA node with memory and no CPUs. `numa_nodes` reads them
from sysfs (`/sys/devices/system/node/node*/cpulist` and `meminfo`). `numa_allocator(node)` returns
an allocator whose buffers are bound to that node: through libnuma's `numa_alloc_onnode` (ctypes) when
libnuma is installed, else with the `mbind` system call (MPOL_BIND, MPOL_MF_STRICT) on a fresh
anonymous mapping, which binds the pages before they are first touched. The buffers are wrapped as
torch tensors without a copy (`torch.frombuffer`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from memplan.runtime.tiers.errors import TierFull, TierUnavailable

SYSFS_NODES = Path("/sys/devices/system/node")
_SYS_MBIND = {"x86_64": 237, "aarch64": 235}
"""The `mbind` system call's number on the architectures we know."""
_MPOL_BIND = 2
_MPOL_MF_STRICT = 1


@dataclass(frozen=True, slots=True)
class NumaNode:
    """One NUMA node: its id, CPUs and memory in bytes."""

    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int
    mem_free_bytes: int

    @property
    def memory_only(self) -> bool:
        """Memory and no CPUs: the typical look of a CXL memory expander."""
        return not self.cpus and self.mem_total_bytes > 0

    def describe(self) -> str:
        kind = "memory only" if self.memory_only else f"{len(self.cpus)} CPUs"
        return f"node {self.id} ({kind}, {self.mem_total_bytes / 2**30:.1f} GiB)"


def parse_cpulist(text: str) -> tuple[int, ...]:
    """CPU ids from a sysfs cpulist such as `0-3,8,10-11` (empty for a CPU-less node)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def parse_meminfo(text: str) -> dict[str, int]:
    """Fields of a node's `meminfo` (`Node 0 MemTotal:   9922764 kB`) in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2].endswith(":"):
            unit = 1024 if fields[-1] == "kB" else 1
            out[fields[2][:-1]] = int(fields[3]) * unit
    return out


def numa_nodes(root: Path = SYSFS_NODES) -> tuple[NumaNode, ...]:
    """The NUMA nodes Linux reports under `root`, by id (none where sysfs has no NUMA information)."""
    nodes: list[NumaNode] = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        meminfo = parse_meminfo(_read(d / "meminfo"))
        cpus = parse_cpulist(_read(d / "cpulist"))
        nodes.append(NumaNode(int(d.name[4:]), cpus, meminfo.get("MemTotal", 0), meminfo.get("MemFree", 0)))
    return tuple(nodes)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class LibnumaAllocator:
    """Buffers from libnuma's `numa_alloc_onnode`, freed with `numa_free`."""

    def __init__(self, node: int, lib: ctypes.CDLL) -> None:
        self.node = node
        self._lib = lib
        lib.numa_alloc_onnode.restype = ctypes.c_void_p
        lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
        lib.numa_free.restype = None
        lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    @property
    def description(self) -> str:
        return f"NUMA node {self.node} memory (libnuma)"

    def allocate(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        ptr = self._lib.numa_alloc_onnode(nbytes, self.node)
        if not ptr:
            raise TierFull(
                f"NUMA node {self.node} could not allocate {nbytes} bytes (numa_alloc_onnode failed)",
                needed_bytes=nbytes,
                free_bytes=_node_free(self.node),
            )
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)

    def release(self, buf: torch.Tensor) -> None:
        if buf.numel():
            self._lib.numa_free(buf.data_ptr(), buf.numel())


class MbindAllocator:
    """Anonymous mappings bound to a node with the `mbind` system call; unmapped when last referenced."""

    def __init__(self, node: int) -> None:
        nr = _SYS_MBIND.get(platform.machine())
        if nr is None:
            raise TierUnavailable(
                f"cannot allocate on NUMA node {node}: libnuma is not installed (package libnuma1) and the "
                f"mbind system call number of {platform.machine()!r} is unknown; run with --emulate cxl"
            )
        self.node = node
        self._nr = nr
        self._libc = ctypes.CDLL(None, use_errno=True)
        words = node // 64 + 1
        self._mask = (ctypes.c_ulong * words)()
        self._mask[node // 64] = 1 << (node % 64)

    @property
    def description(self) -> str:
        return f"NUMA node {self.node} memory (mbind)"

    def allocate(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        buf = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
        rc = self._libc.syscall(
            ctypes.c_long(self._nr),
            ctypes.c_void_p(buf.data_ptr()),
            ctypes.c_ulong(nbytes),
            ctypes.c_int(_MPOL_BIND),
            self._mask,
            ctypes.c_ulong(64 * len(self._mask) + 1),
            ctypes.c_uint(_MPOL_MF_STRICT),
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise TierUnavailable(f"binding memory to NUMA node {self.node} failed: {os.strerror(err)}")
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """Nothing to do: the mapping is unmapped when the buffer's last reference drops."""


def numa_allocator(node: int) -> LibnumaAllocator | MbindAllocator:
    """An allocator on `node`: libnuma if installed and working, else the `mbind` system call."""
    name = ctypes.util.find_library("numa")
    if name is not None:
        lib = ctypes.CDLL(name)
        if lib.numa_available() >= 0:
            return LibnumaAllocator(node, lib)
    return MbindAllocator(node)


def _node_free(node: int) -> int:
    """Free bytes on a node per sysfs (0 if unknown)."""
    return next((n.mem_free_bytes for n in numa_nodes() if n.id == node), 0)
