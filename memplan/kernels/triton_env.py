"""Triton, set up so that memplan's kernels launch on this machine: on a GPU natively, without one under
Triton's CPU interpreter.

Triton decides at each `@triton.jit` *decoration* whether the kernel is interpreted (`TRITON_INTERPRET=1`
in `os.environ` at that moment); without it, and without a GPU, every launch fails ("0 active drivers").
So this module, which every kernel module imports triton from, sets `TRITON_INTERPRET=1` when no CUDA
device is present and the variable is unset, *before* importing triton, and the kernel modules decorate
only after importing it. That works whether or not triton was imported earlier in the process (the flag
is read at decoration, not at import). The variable is process-wide: other triton kernels decorated later
in this process are interpreted too, which is the only way they could run without a GPU anyway.

Kernels call `check_launchable(kernel)` before launching: without a GPU, a kernel that was not decorated
as interpreted (TRITON_INTERPRET set to something else than 1, or an old triton that read it at import)
raises `TritonUnavailable`, saying what to set and whether triton had been imported before memplan's
kernels.
"""

from __future__ import annotations

import os
import sys

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

__all__ = ["HAS_GPU", "INTERPRETED", "TritonUnavailable", "check_launchable", "tl", "triton"]


class TritonUnavailable(MemplanError):
    """A Triton kernel cannot launch here: no GPU, and the kernel was not built for the interpreter."""


def check_launchable(kernel: object) -> None:
    """Raise TritonUnavailable, saying why and what to do, when `kernel` cannot launch on this machine."""
    if HAS_GPU or isinstance(kernel, InterpretedFunction):
        return
    before = (
        "triton was imported before memplan.kernels and " if IMPORTED_BEFORE else ""
    )
    raise TritonUnavailable(
        f"no CUDA device, and Triton kernel {getattr(kernel, '__name__', kernel)!r} is not interpreted: "
        f"{before}TRITON_INTERPRET was {ENV_BEFORE!r} when memplan's kernels were defined. Unset it (memplan "
        f"then sets it to 1) or set TRITON_INTERPRET=1 before the process imports triton; or use "
        f"memplan.kernels.linear's CPU paths, which need no triton"
    )
