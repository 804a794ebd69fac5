"""Benchmark harness: a benchmark is a module `bench/NAME.py` with `run(quick: bool) -> Result`.

The runner writes `bench/results/NAME.json` (the full result) and `bench/results/NAME.md` (a short table),
atomically, so that a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memplan.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Result:
    """What one benchmark measured: a table (columns, rows of dicts) plus free-form notes and extras."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block (on the shared 2-core machine one thread runs
    small models faster than two), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def markdown(result: Result) -> str:
    """The result as a Markdown table with its notes underneath."""
    lines = [f"# {result.title}", "", "| " + " | ".join(result.columns) + " |"]
    lines.append("|" + "---|" * len(result.columns))
    for row in result.rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in result.columns) + " |")
    lines += [""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def write(result: Result, elapsed_s: float) -> Path:
    """Write NAME.json and NAME.md under bench/results; returns the JSON path."""
    doc = asdict(result) | {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "elapsed_s": elapsed_s,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = RESULTS / f"{result.name}.json"
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write_text(RESULTS / f"{result.name}.md", markdown(result))
    return path
