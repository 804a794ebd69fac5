"""Run named benchmarks: `python -m bench.run NAME [NAME ...] [--quick]`, or `all`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
from pathlib import Path

from bench.harness import markdown, write

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"harness", "run", "__init__", "train_peers", "corpus_models", "placement_peers"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name not in NOT_BENCHMARKS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="+", help=f"benchmarks to run: {', '.join(available())} or all")
    ap.add_argument("--quick", action="store_true", help="smaller instances, for a smoke run")
    args = ap.parse_args(argv)
    names = available() if args.names == ["all"] else args.names
    for name in names:
        if name not in available():
            ap.error(f"unknown benchmark {name!r}; available: {', '.join(available())}")
        mod = importlib.import_module(f"bench.{name}")
        t0 = time.perf_counter()
        result = mod.run(quick=args.quick)
        path = write(result, time.perf_counter() - t0)
        print(markdown(result))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
