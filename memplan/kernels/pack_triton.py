"""Triton kernels for the packed layouts of `memplan.kernels.packing` (the torch reference defines them).

Each program handles a `BLOCK_ROWS x BLOCK_UNITS` tile of units: `pack` ORs the unit's `VALUES` codes into a
word and stores its `NBYTES` bytes; `unpack` does the reverse. Codes past `cols` read as 0 (the padding
rule), so both match the reference byte for byte. Under the interpreter a program costs about 0.5 ms, so
the default tiles are large (64 x 256 units).
"""

from __future__ import annotations

from typing import Any

import torch

from memplan.kernels.packing import check_codes, check_packed, packed_cols, unit_of
from memplan.kernels.triton_env import check_launchable, tl, triton

BLOCK_ROWS = 64
BLOCK_UNITS = 256


@triton.jit
def _pack_kernel(
    codes_ptr,
    out_ptr,
    rows,
    cols,
    out_cols,
    BITS: tl.constexpr,
    VALUES: tl.constexpr,
    NBYTES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_UNITS: tl.constexpr,
):
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
        tl.store(
            out_ptr + r * out_cols + byte,
            ((word >> (8 * i)) & 0xFF).to(tl.uint8),
            mask=in_rows & (byte < out_cols),
        )


@triton.jit
def _unpack_kernel(
    packed_ptr,
    out_ptr,
    rows,
    cols,
    packed_width,
    BITS: tl.constexpr,
    VALUES: tl.constexpr,
    NBYTES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_UNITS: tl.constexpr,
):
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


def pack(
    codes: torch.Tensor, bits: int, block_rows: int = BLOCK_ROWS, block_units: int = BLOCK_UNITS
) -> torch.Tensor:
    """`packing.pack` as a Triton kernel: codes (any shape, rows along the last dim) to packed bytes."""
    check_codes(codes, bits)
    src = codes.to(torch.uint8).contiguous()
    *lead, cols = src.shape
    out = torch.empty(*lead, packed_cols(cols, bits), dtype=torch.uint8, device=codes.device)
    return _launch(_pack_kernel, src, out, cols, bits, (block_rows, block_units))


def unpack(
    packed: torch.Tensor, bits: int, cols: int, block_rows: int = BLOCK_ROWS, block_units: int = BLOCK_UNITS
) -> torch.Tensor:
    """`packing.unpack` as a Triton kernel: the `cols` uint8 codes of each packed row."""
    check_packed(packed, bits, cols)
    src = packed.contiguous()
    out = torch.empty(*packed.shape[:-1], cols, dtype=torch.uint8, device=packed.device)
    return _launch(_unpack_kernel, src, out, cols, bits, (block_rows, block_units))


def _launch(
    kernel: Any, src: torch.Tensor, out: torch.Tensor, cols: int, bits: int, blocks: tuple[int, int]
) -> torch.Tensor:
    """Run a pack or unpack kernel over `rows x units` tiles (both take src, out, rows, cols, width)."""
    values, nbytes = unit_of(bits)
    width = packed_cols(cols, bits)
    rows = out.numel() // out.shape[-1] if out.shape[-1] else 0
    if rows and cols:
        grid = (triton.cdiv(rows, blocks[0]), triton.cdiv(width // nbytes, blocks[1]))
        check_launchable(kernel)
        kernel[grid](
            src,
            out,
            rows,
            cols,
            width,
            BITS=bits,
            VALUES=values,
            NBYTES=nbytes,
            BLOCK_ROWS=blocks[0],
            BLOCK_UNITS=blocks[1],
        )
    return out
