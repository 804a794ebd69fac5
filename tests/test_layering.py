"""The layering of docs/architecture.md, read from the source: no package imports one above it (imports
inside functions and under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "memplan"
BASE = {"errors", "units", "files", "__version__"}
"""Top-level helpers every package may use (and `memplan.__version__`: the package imports nothing
eagerly)."""
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "units": {"errors"},
    "files": set(),
    "ir": BASE,
    "plans": BASE | {"ir"},
    "solvers": {"errors"},
    "passes": BASE | {"plans", "ir", "solvers"},
    "kernels": BASE | {"plans"},
    "runtime": BASE | {"plans", "ir", "kernels"},
    "zoo": BASE,
    "planner": BASE | {"ir", "plans", "solvers", "passes", "runtime", "kernels", "zoo"},
}


def layer_of(module: str) -> str | None:
    """`memplan.passes.remat_swap` -> `passes`; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "memplan" else None


def memplan_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `import memplan...` / `from memplan... import` in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("memplan.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "memplan":
                out += [(node.lineno, f"memplan.{a.name}") for a in node.names]
            elif node.module.startswith("memplan."):
                out.append((node.lineno, node.module))
    return out


def back_edges(root: Path = ROOT) -> list[str]:
    """Every import that runs against `ALLOWED`, as `path:line (layer) imports module (layer)`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        own = layer_of(".".join(rel.parts))
        if own is None or own == "__init__":  # memplan/__init__.py re-exports the API lazily, by name
            continue
        for line, module in memplan_imports(path):
            other = layer_of(module)
            if other is not None and other != own and other not in ALLOWED[own]:
                found.append(f"{rel}.py:{line} ({own}) imports {module} ({other})")
    return found


def test_every_package_has_a_rule() -> None:
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if not p.name.startswith("__")}
    assert packages - {"py"} <= set(ALLOWED), packages - set(ALLOWED)


def test_no_package_imports_a_higher_one() -> None:
    assert back_edges() == []


def test_the_checker_sees_a_back_edge(tmp_path: Path) -> None:
    fake = tmp_path / "memplan" / "ir"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from memplan.planner.api import plan\n")
    (fake / "good.py").write_text("from memplan.errors import MemplanError\nimport memplan.ir.graph\n")
    assert back_edges(tmp_path / "memplan") == [
        "memplan/ir/bad.py:2 (ir) imports memplan.planner.api (planner)"
    ]
