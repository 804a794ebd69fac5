"""Byte sizes as people write them: `512MiB`, `16GiB`, `2GB`, `1.5TiB`, or plain bytes."""

from __future__ import annotations

import re

from memplan.errors import InvalidInput

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in `text`; decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB...) of 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidInput(f"size {text} is negative; give a number of bytes >= 0")
        return text
    m = _RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise InvalidInput(
            f"cannot read size {text!r}: write a number with an optional unit, e.g. 512MiB, 16GiB, 2GB "
            "or 1048576"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if unit in ("", "b") and not m.group(1).isdigit():
        raise InvalidInput(f"size {text!r} has a fraction of a byte; give whole bytes or a unit")
    return int(round(value))


def format_size(n: float) -> str:
    """Bytes as a short human string in binary units (`1.50 GiB`)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
