"""MiniMalloc's CSV format for packing problems and their solutions, with line-numbered errors.

A problem file has a header and one row per buffer; `alignment` is optional, and a solution adds `offset`:

    id,lower,upper,size            id,lower,upper,size,offset
    b0,0,10,4096                   b0,0,10,4096,0
    b1,5,15,1024                   b1,5,15,1024,4096

Each buffer is live on the half-open `[lower, upper)`. Columns may come in any order; unknown columns are
an error, so that a typo is not silently ignored. Every error names the source and the line.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from memplan.errors import InvalidInput
from memplan.solvers.packing.problem import Buffer, Problem, make_buffer

REQUIRED = ("id", "lower", "upper", "size")
OPTIONAL = ("alignment", "offset")


def parse(
    text: str, source: str = "<csv>", capacity_bytes: int | None = None
) -> tuple[Problem, list[int] | None]:
    """The problem in `text`, and its offsets when every row has one (None when the column is absent)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise InvalidInput(f"{source}: empty file; expected a header line {','.join(REQUIRED)}")
    cols = _columns([h.strip().lower() for h in header], source)
    buffers: list[Buffer] = []
    offsets: list[int] = []
    seen: set[str] = set()
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{source}:{line_no}"
        if len(row) != len(cols):
            raise InvalidInput(f"{where}: expected {len(cols)} fields ({','.join(cols)}), got {len(row)}")
        rec = dict(zip(cols, (c.strip() for c in row), strict=True))
        buffers.append(_buffer(rec, where, seen))
        if "offset" in rec:
            offsets.append(_int(rec, "offset", where))
    problem = Problem(tuple(buffers), capacity_bytes)
    return problem, (offsets if "offset" in cols else None)


def _columns(header: list[str], source: str) -> list[str]:
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if missing or unknown or len(set(header)) != len(header):
        raise InvalidInput(
            f"{source}:1: bad header {','.join(header)!r}: need {','.join(REQUIRED)}, "
            f"optionally {','.join(OPTIONAL)}"
            + (f"; missing {','.join(missing)}" if missing else "")
            + (f"; unknown {','.join(unknown)}" if unknown else "")
        )
    return header


def _int(rec: dict[str, str], col: str, where: str) -> int:
    try:
        return int(rec[col])
    except ValueError:
        raise InvalidInput(f"{where}: {col} {rec[col]!r} is not an integer") from None


def _buffer(rec: dict[str, str], where: str, seen: set[str]) -> Buffer:
    bid = rec["id"]
    if not bid:
        raise InvalidInput(f"{where}: empty id")
    if bid in seen:
        raise InvalidInput(f"{where}: duplicate id {bid!r}; every row must name a different buffer")
    seen.add(bid)
    lower, upper, size = (_int(rec, c, where) for c in ("lower", "upper", "size"))
    align = _int(rec, "alignment", where) if "alignment" in rec else 1
    if size < 0:
        raise InvalidInput(f"{where}: buffer {bid!r} has negative size {size}")
    if upper <= lower:
        raise InvalidInput(
            f"{where}: buffer {bid!r} has an empty lifespan [{lower}, {upper}); need lower < upper"
        )
    if align < 1:
        raise InvalidInput(f"{where}: buffer {bid!r} has alignment {align}; it must be >= 1")
    return make_buffer(bid, [(lower, upper)], size, align)


def read(path: str | Path, capacity_bytes: int | None = None) -> tuple[Problem, list[int] | None]:
    """Parse a CSV file (see `parse`); a missing or unreadable file is an `InvalidInput`."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror or e}") from e
    return parse(text, str(path), capacity_bytes)


def render(problem: Problem, offsets: list[int] | tuple[int, ...] | None = None) -> str:
    """The problem as CSV (one lifespan per buffer), with an `offset` column when offsets are given."""
    with_align = any(b.alignment_bytes != 1 for b in problem.buffers)
    cols = (
        list(REQUIRED) + (["alignment"] if with_align else []) + (["offset"] if offsets is not None else [])
    )
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(cols)
    for i, b in enumerate(problem.buffers):
        if len(b.lifespans) != 1:
            raise InvalidInput(f"buffer {b.id!r} has {len(b.lifespans)} lifespans; the CSV format holds one")
        row: list[object] = [b.id, b.lower, b.upper, b.size_bytes]
        row += [b.alignment_bytes] if with_align else []
        row += [offsets[i]] if offsets is not None else []
        w.writerow(row)
    return out.getvalue()
