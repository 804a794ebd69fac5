import warnings

warnings.filterwarnings("ignore", category=FutureWarning)


import pytest  # noqa: E402

from memplan.ir.hardware import Hardware, hardware_from_dict  # noqa: E402


@pytest.fixture(scope="session")
def link_bound_hw() -> Hardware:
    """A GPU-like machine (copies overlap compute) with the cpu preset's speeds and a host tier on a link of
    100 MB/s: too slow to swap everything a tight budget moves, so `remat_swap` splits tensors (MEMO). Its
    tensors are CPU tensors here; the host tier's store works on them."""
    gib = 2**30
    fast = {"read_bw": 1e10, "write_bw": 1e10, "latency_s": 1e-7}
    return hardware_from_dict(
        {
            "name": "link-bound",
            "device_kind": "cuda",
            "flops": 2e10,
            "mem_bw": 1e10,
            "tiers": [
                {"name": "device", "capacity_bytes": 16 * gib, **fast},
                {
                    "name": "host",
                    "capacity_bytes": 16 * gib,
                    "read_bw": 1e8,
                    "write_bw": 1e8,
                    "latency_s": 1e-6,
                },
            ],
        }
    )
