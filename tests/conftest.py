import warnings

warnings.filterwarnings("ignore", category=FutureWarning)


import pytest  # noqa: E402

from memplan.ir.hardware import Hardware, hardware_from_dict  # noqa: E402


def gpu_like(name: str, host_bw: float) -> Hardware:
    """A GPU-like machine (copies overlap compute) with the cpu preset's speeds and a host tier whose link
    moves `host_bw` bytes/s. Its tensors are CPU tensors here; the host tier's store works on them."""
    gib = 2**30
    return hardware_from_dict(
        {
            "name": name,
            "device_kind": "cuda",
            "flops": 2e10,
            "mem_bw": 1e10,
            "tiers": [
                {"name": "device", "capacity_bytes": 16 * gib, "read_bw": 1e10, "write_bw": 1e10,
                 "latency_s": 1e-7},
                {"name": "host", "capacity_bytes": 16 * gib, "read_bw": host_bw, "write_bw": host_bw,
                 "latency_s": 1e-6},
            ],
        }
    )


@pytest.fixture(scope="session")
def link_bound_hw() -> Hardware:
    """A host link of 100 MB/s: too slow to swap everything a tight budget moves, so `remat_swap` splits
    tensors (MEMO)."""
    return gpu_like("link-bound", 1e8)


@pytest.fixture(scope="session")
def fast_host_hw() -> Hardware:
    """A host link fast enough to swap without recomputing."""
    return gpu_like("fast-host", 1e10)
