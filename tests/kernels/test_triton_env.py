"""Triton's environment: kernels launch on a CPU whichever imports triton first, a kernel that cannot launch
says why, and the modules without kernels never import triton. Each case runs in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.kernels.triton_env import HAS_GPU

ROOT = Path(__file__).resolve().parents[2]
KERNEL_CALL = """
import torch
from memplan.kernels.pack_triton import pack
print(pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist())
"""


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean, timeout=120)


pytestmark = pytest.mark.skipif(HAS_GPU, reason="the interpreter set-up is for machines without a GPU")


def test_launches_when_triton_was_imported_first() -> None:
    out = run("import triton, os; assert 'TRITON_INTERPRET' not in os.environ" + KERNEL_CALL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[33, 3]]"
    assert "triton was imported before memplan.kernels without TRITON_INTERPRET=1" in out.stderr


def test_kernels_use_no_triton_library_function() -> None:
    """triton's `@jit` library functions (tl.zeros, tl.sum...) fail in an interpreted kernel when triton
    was imported before the environment was set; memplan's kernels use builtins only."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    used = set()
    for path in (ROOT / "memplan" / "kernels").glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and "triton.jit" in map(ast.unparse, fn.decorator_list):
                attrs = [n for n in ast.walk(fn) if isinstance(n, ast.Attribute)]
                used |= {n.attr for n in attrs if ast.unparse(n.value) == "tl"}
    assert {"dot", "load", "full"} <= used
    library = sorted(n for n in used if isinstance(getattr(tl, n, None), JITFunction | InterpretedFunction))
    assert library == [], f"use a builtin instead of tl.{library}"


def test_a_kernel_that_cannot_launch_says_why() -> None:
    out = run("import triton" + KERNEL_CALL, TRITON_INTERPRET="0")
    assert out.returncode != 0
    assert "TritonUnavailable" in out.stderr
    assert "triton was imported before memplan.kernels and TRITON_INTERPRET was '0'" in out.stderr


def test_cpu_paths_need_no_triton() -> None:
    out = run(
        "import sys, torch\n"
        "from memplan.kernels.linear import linear\n"
        "from memplan.kernels.quantize import quantize\n"
        "from memplan.plans.decisions import TensorBits\n"
        "q = quantize(torch.randn(16, 64), TensorBits(0, 'int4', 32, True, 'per-group'))\n"
        "linear(torch.randn(2, 64), q)\n"
        "import memplan.kernels.specialise, memplan.kernels\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    assert out.returncode == 0, out.stderr
