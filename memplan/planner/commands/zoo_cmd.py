"""`memplan zoo`: list the models `zoo:NAME` can name."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("zoo", help="list the zoo models", description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from memplan.zoo import catalog as zoo

    table = Table("name", "family", "default batch", "default seq", "description")
    for name in zoo.names():
        m = zoo.get(name)
        table.add_row(f"zoo:{name}", m.family, str(m.default_batch), str(m.default_seq), m.description)
    Console().print(table)
    return 0
