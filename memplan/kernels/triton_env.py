"""Triton, set up so that memplan's kernels launch on this machine: on a GPU natively, without one under
Triton's CPU interpreter.

Triton decides at each `@triton.jit` *decoration* whether the function is interpreted (`TRITON_INTERPRET=1`
in `os.environ` at that moment); without it, and without a GPU, every launch fails ("0 active drivers").
So this module, which every kernel module imports triton from, sets `TRITON_INTERPRET=1` when no CUDA
device is present and the variable is unset, *before* importing triton, and the kernel modules decorate
only after importing it. The variable is process-wide: triton kernels decorated later in this process are
interpreted too, the only way they could run without a GPU anyway.

If triton was imported earlier without the variable, memplan's kernels are still decorated as interpreted,
but triton's own library functions (`tl.zeros`, `tl.sum`, `tl.max`, `tl.cdiv`... themselves `@jit`
functions decorated at that first import) are not, and an interpreted kernel calling one fails ("Cannot
call @triton.jit'd outside of the scope of a kernel"). memplan's kernels therefore use builtins only
(`tl.full`, not `tl.zeros`; tests/kernels/test_triton_env.py checks), and this module warns, once, that
other kernels in the process may fail. Kernels call `check_launchable(kernel)` before launching: without a
GPU, a kernel that was not decorated as interpreted (TRITON_INTERPRET set to something else than 1)
raises `TritonUnavailable`, saying what to set.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from memplan.errors import MemplanError

IMPORTED_BEFORE = "triton" in sys.modules
"""Whether something imported triton before this module (it then saw the environment we did not set)."""
HAS_GPU = torch.cuda.is_available()
"""Whether kernels run natively; without a GPU they run under the interpreter."""
ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
"""TRITON_INTERPRET as this module found it (None: unset)."""

if not HAS_GPU and ENV_BEFORE is None:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (after the environment is set, on purpose)
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether kernels decorated from now on run under the interpreter."""
LIBRARY_INTERPRETED = isinstance(tl.zeros, InterpretedFunction)
"""Whether triton's own `@jit` library functions were decorated for the interpreter (at triton's import)."""

if not HAS_GPU and INTERPRETED and not LIBRARY_INTERPRETED:
    warnings.warn(
        "triton was imported before memplan.kernels without TRITON_INTERPRET=1 and there is no GPU: "
        "memplan's kernels run under the interpreter, but Triton kernels that call triton.language library "
        "functions (tl.zeros, tl.sum, tl.max, ...) will fail; set TRITON_INTERPRET=1 before anything "
        "imports triton",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "HAS_GPU",
    "INTERPRETED",
    "LIBRARY_INTERPRETED",
    "TritonUnavailable",
    "check_launchable",
    "tl",
    "triton",
]


class TritonUnavailable(MemplanError):
    """A Triton kernel cannot launch here: no GPU, and the kernel was not built for the interpreter."""


def check_launchable(kernel: object) -> None:
    """Raise TritonUnavailable, saying why and what to do, when `kernel` cannot launch on this machine."""
    if HAS_GPU or isinstance(kernel, InterpretedFunction):
        return
    before = "triton was imported before memplan.kernels and " if IMPORTED_BEFORE else ""
    raise TritonUnavailable(
        f"no CUDA device, and Triton kernel {getattr(kernel, '__name__', kernel)!r} is not interpreted: "
        f"{before}TRITON_INTERPRET was {ENV_BEFORE!r} when memplan's kernels were defined. Unset it (memplan "
        f"then sets it to 1) or set TRITON_INTERPRET=1 before the process imports triton; or use "
        f"memplan.kernels.linear's CPU paths, which need no triton"
    )
