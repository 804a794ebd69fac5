"""The packed layouts (torch reference): exact bytes, padding, round trips, and bad input."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.kernels.packing import pack, packed_cols, unpack

SHAPES = [(1, 1), (3, 7), (5, 8), (2, 3, 17), (37, 301), (64, 256)]


def test_bytes_of_each_layout() -> None:
    u8 = torch.uint8
    assert pack(torch.tensor([[1, 2, 3]], dtype=u8), 4).tolist() == [[0x21, 0x03]]
    assert pack(torch.tensor([[1, 2, 3, 0, 3]], dtype=u8), 2).tolist() == [[0b00111001, 0b11]]
    # int3: 8 codes in a 24-bit little-endian word, code j at bits 3j..3j+2
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * j) for j, c in enumerate(codes))
    assert pack(torch.tensor([codes], dtype=u8), 3).tolist() == [[word & 255, word >> 8 & 255, word >> 16]]
    assert pack(torch.tensor([[7]], dtype=u8), 3).tolist() == [[7, 0, 0]]  # padded to a whole unit
    assert pack(torch.tensor([[200, 7]], dtype=u8), 8).tolist() == [[200, 7]]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact_and_padding_is_zero(bits: int, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + shape[-1])
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (*shape[:-1], packed_cols(shape[-1], bits)) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)
    values = {8: 1, 4: 2, 3: 8, 2: 4}[bits]
    pad = -shape[-1] % values
    full = unpack(packed, bits, shape[-1] + pad) if pad else None
    if full is not None:  # unpacking the padded width shows zero codes past cols
        assert int(full[..., shape[-1]:].max()) == 0


def test_packed_sizes() -> None:
    assert [packed_cols(10, b) for b in (8, 4, 3, 2)] == [10, 5, 6, 3]
    assert packed_cols(4096, 3) * 8 == 4096 * 3  # dense: no bit wasted on whole units


def test_bad_input() -> None:
    with pytest.raises(InvalidInput, match=r"must lie in \[0, 15\], got \[0, 16\]"):
        pack(torch.tensor([[16, 0]]), 4)
    with pytest.raises(InvalidInput, match="integer tensor"):
        pack(torch.zeros(2, 2), 4)
    with pytest.raises(InvalidInput, match="layouts exist for"):
        pack(torch.zeros(2, 2, dtype=torch.uint8), 5)
    with pytest.raises(InvalidInput, match="pack to 2 uint8 bytes a row"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 4)
