"""Bit-packed layouts of integer codes, row by row; the torch reference that defines them.

A *unit* is `values` codes of `bits` bits stored little-endian in `nbytes` bytes: code j of a unit sits at
bits `[bits*j, bits*(j+1))` of the unit's word, and byte i of the unit holds bits `[8i, 8i+8)`.

    bits  values  nbytes   unit (word bit 0 on the right)
    8     1       1        [ u0:8 ]
    4     2       1        [ u1:4 | u0:4 ]
    3     8       3        [ u7:3 | u6:3 | ... | u1:3 | u0:3 ]       (24 bits, 3 bytes, no bit wasted)
    2     4       1        [ u3:2 | u2:2 | u1:2 | u0:2 ]

Padding rule: each row (last dim) is packed on its own into `ceil(cols / values)` units; the codes past
`cols` in the last unit are zero. So a `rows x cols` tensor packs to `rows x packed_cols(cols, bits)` uint8
bytes, rows start on a byte boundary (a kernel finds row r at `r * packed_cols`), and unpacking returns the
`cols` codes exactly.
"""

from __future__ import annotations

import torch

from memplan.errors import InvalidInput

UNITS: dict[int, tuple[int, int]] = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}
"""bits -> (codes per unit, bytes per unit)."""


def unit_of(bits: int) -> tuple[int, int]:
    """(codes per unit, bytes per unit) of a code width; InvalidInput for widths without a layout."""
    if bits not in UNITS:
        raise InvalidInput(f"no packed layout for {bits}-bit codes; layouts exist for {sorted(UNITS)} bits")
    return UNITS[bits]


def packed_cols(cols: int, bits: int) -> int:
    """Bytes one row of `cols` codes packs to (the last unit zero-padded)."""
    values, nbytes = unit_of(bits)
    return -(-cols // values) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `codes` (integers in [0, 2**bits), any shape, rows along the last dim) into uint8 units."""
    values, nbytes = unit_of(bits)
    check_codes(codes, bits)
    *lead, cols = codes.shape
    units = -(-cols // values)
    padded = torch.zeros(*lead, units * values, dtype=torch.int32, device=codes.device)
    padded[..., :cols] = codes.to(torch.int32)
    shifts = torch.arange(values, dtype=torch.int32, device=codes.device) * bits
    word = (padded.view(*lead, units, values) << shifts).sum(-1, dtype=torch.int32)  # [..., units]
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., units, nbytes]
    return out.to(torch.uint8).reshape(*lead, units * nbytes)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The `cols` codes of each row of `packed` (uint8, from `pack`), as uint8."""
    values, nbytes = unit_of(bits)
    check_packed(packed, bits, cols)
    *lead, width = packed.shape
    units = width // nbytes
    if nbytes == 1:  # 8, 4, 2 bits: whole codes in each byte, shifted in uint8 (one byte per code at most)
        if values == 1:
            return packed[..., :cols].clone()
        shifts8 = torch.arange(values, dtype=torch.uint8, device=packed.device) * bits
        codes8 = (packed.unsqueeze(-1) >> shifts8) & ((1 << bits) - 1)
        return codes8.reshape(*lead, units * values)[..., :cols]
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=packed.device) * 8
    word = (packed.view(*lead, units, nbytes).to(torch.int32) << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(values, dtype=torch.int32, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., units, values]
    return codes.reshape(*lead, units * values)[..., :cols].to(torch.uint8)


def check_codes(codes: torch.Tensor, bits: int) -> None:
    """InvalidInput unless `codes` is an integer tensor with every value in [0, 2**bits)."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise InvalidInput(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        lo, hi = int(codes.min()), int(codes.max())
        raise InvalidInput(f"{bits}-bit codes must lie in [0, {(1 << bits) - 1}], got [{lo}, {hi}]")


def check_packed(packed: torch.Tensor, bits: int, cols: int) -> None:
    """InvalidInput unless `packed` is uint8 with the row width `cols` codes of `bits` bits pack to."""
    width = packed.shape[-1] if packed.dim() else 0
    if packed.dtype != torch.uint8 or width != packed_cols(cols, bits):
        raise InvalidInput(
            f"packed rows are {width} {packed.dtype} bytes; {cols} {bits}-bit codes pack to "
            f"{packed_cols(cols, bits)} uint8 bytes a row"
        )
