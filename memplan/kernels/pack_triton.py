"""Triton kernels for the packed layouts of `memplan.kernels.packing` (the torch reference defines them).

Each program handles a `BLOCK_ROWS x BLOCK_UNITS` tile of units: `pack` ORs the unit's `VALUES` codes into a
word and stores its `NBYTES` bytes; `unpack` does the reverse. Codes past `cols` read as 0 (the padding
rule), so both match the reference byte for byte. Under the interpreter a program costs about 0.5 ms, so
the default tiles are large (64 x 256 units).
"""

from __future__ import annotations

import torch

from memplan.kernels.packing import check_codes, check_packed, packed_cols, unit_of
from memplan.kernels.triton_env import check_launchable, tl, triton

BLOCK_ROWS = 64
BLOCK_UNITS = 256


@triton.jit
def _pack_kernel(codes_ptr, out_ptr, rows, cols, out_cols,
                 BITS: tl.constexpr, VALUES: tl.constexpr, NBYTES: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_UNITS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]  # [BR, 1]
    unit = tl.program_id(1) * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)[None, :]  # [1, BU]
    in_rows = r < rows
    word = tl.full([BLOCK_ROWS, BLOCK_UNITS], 0, tl.int32)
    for j in tl.static_range(VALUES):
        col = unit * VALUES + j
        code = tl.load(codes_ptr + r * cols + col, mask=in_rows & (col < cols), other=0)
        word |= code.to(tl.int32) << (BITS * j)
    for i in tl.static_range(NBYTES):
        byte = unit * NBYTES + i
        tl.store(out_ptr + r * out_cols + byte, ((word >> (8 * i)) & 0xFF).to(tl.uint8),
                 mask=in_rows & (byte < out_cols))


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, rows, cols, packed_width,
                   BITS: tl.constexpr, VALUES: tl.constexpr, NBYTES: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_UNITS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    unit = tl.program_id(1) * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)[None, :]
    in_rows = r < rows
    word = tl.full([BLOCK_ROWS, BLOCK_UNITS], 0, tl.int32)
    for i in tl.static_range(NBYTES):
        byte = unit * NBYTES + i
        b = tl.load(packed_ptr + r * packed_width + byte, mask=in_rows & (byte < packed_width), other=0)
        word |= b.to(tl.int32) << (8 * i)
    for j in tl.static_range(VALUES):
        col = unit * VALUES + j
        code = (word >> (BITS * j)) & ((1 << BITS) - 1)
        tl.store(out_ptr + r * cols + col, code.to(tl.uint8), mask=in_rows & (col < cols))


def pack(codes: torch.Tensor, bits: int, block_rows: int = BLOCK_ROWS,
         block_units: int = BLOCK_UNITS) -> torch.Tensor:
    """`packing.pack` as a Triton kernel: codes (any shape, rows along the last dim) to packed bytes."""
    values, nbytes = unit_of(bits)
    check_codes(codes, bits)
    codes8 = codes.to(torch.uint8).contiguous()
    *lead, cols = codes8.shape
    rows = codes8.numel() // cols if cols else 0
    width = packed_cols(cols, bits)
    out = torch.empty(*lead, width, dtype=torch.uint8, device=codes.device)
    if rows and cols:
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(width // nbytes, block_units))
        check_launchable(_pack_kernel)
        _pack_kernel[grid](codes8, out, rows, cols, width, BITS=bits, VALUES=values, NBYTES=nbytes,
                           BLOCK_ROWS=block_rows, BLOCK_UNITS=block_units)
    return out


def unpack(packed: torch.Tensor, bits: int, cols: int, block_rows: int = BLOCK_ROWS,
           block_units: int = BLOCK_UNITS) -> torch.Tensor:
    """`packing.unpack` as a Triton kernel: the `cols` uint8 codes of each packed row."""
    values, nbytes = unit_of(bits)
    check_packed(packed, bits, cols)
    *lead, width = packed.shape
    src = packed.contiguous()
    rows = src.numel() // width if width else 0
    out = torch.empty(*lead, cols, dtype=torch.uint8, device=packed.device)
    if rows and cols:
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(width // nbytes, block_units))
        check_launchable(_unpack_kernel)
        _unpack_kernel[grid](src, out, rows, cols, width, BITS=bits, VALUES=values, NBYTES=nbytes,
                             BLOCK_ROWS=block_rows, BLOCK_UNITS=block_units)
    return out
