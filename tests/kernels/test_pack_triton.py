"""The Triton pack/unpack kernels (under the interpreter on a CPU) match the torch reference byte for byte."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.kernels import pack_triton, packing


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_matches_reference_on_odd_shapes(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    for shape in [(1, 1), (37, 301), (2, 3, 17)]:
        codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
        packed = pack_triton.pack(codes, bits)
        assert torch.equal(packed, packing.pack(codes, bits)), shape
        assert torch.equal(pack_triton.unpack(packed, bits, shape[-1]), codes), shape


def test_many_programs_and_empty() -> None:
    codes = torch.randint(0, 8, (40, 100), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_triton.pack(codes, 3, block_rows=16, block_units=4)  # 3 x 4 programs
    assert torch.equal(packed, packing.pack(codes, 3))
    assert torch.equal(pack_triton.unpack(packed, 3, 100, block_rows=16, block_units=4), codes)
    assert pack_triton.pack(torch.zeros(0, 5, dtype=torch.uint8), 4).shape == (0, 3)


def test_bad_input() -> None:
    with pytest.raises(InvalidInput, match="must lie in"):
        pack_triton.pack(torch.tensor([[4]]), 2)
    with pytest.raises(InvalidInput, match="pack to"):
        pack_triton.unpack(torch.zeros(1, 2, dtype=torch.uint8), 2, 12)
