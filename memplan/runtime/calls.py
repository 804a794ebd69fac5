"""What a call of a model under `memplan.applied` must match to run the planned step, and what it gets else.

A plan holds one captured step: the shapes, dtypes and devices of the inputs it was made for and the autocast
state it was captured under are baked into its ops (every `view` has its sizes). A call that differs (the
last, smaller batch of an epoch, a new sequence length, autocast switched on) would run those ops on the
wrong tensors, so it is refused with `PlanMismatch`, or planned anew through the caller's `replan` callback
(the runtime does not plan itself). `CallSpec` is what is compared.

The planned step is one forward then its backward: `Turns` numbers the forwards, so that a backward of a
forward a later one has replaced (two micro-batches summed before one backward) is refused instead of
running over the later one's tensors. Gradient accumulation (each micro-batch's backward before the next
forward) runs as planned.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from memplan.errors import PlanMismatch

AUTOCAST_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The device types autocast is on for, with their dtypes."""
    on = []
    for dev in AUTOCAST_DEVICES:
        if (dev == "cpu" or torch.cuda.is_available()) and torch.is_autocast_enabled(dev):
            on.append((dev, torch.get_autocast_dtype(dev)))
    return tuple(on)


def _describe(x: Any) -> tuple[Any, ...]:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    return ("value", repr(x))


@dataclass(frozen=True)
class CallSpec:
    """The inputs of one call (shape, dtype, device of each tensor; other values by repr) and autocast."""

    inputs: tuple[tuple[Any, ...], ...]
    autocast: tuple[tuple[str, torch.dtype], ...]

    @classmethod
    def of(cls, inputs: Sequence[Any]) -> CallSpec:
        return cls(tuple(_describe(x) for x in inputs), autocast_state())

    def difference(self, other: CallSpec) -> str | None:
        """How `other` differs from this spec, in words (None: it does not)."""
        if len(other.inputs) != len(self.inputs):
            return f"number of inputs is {len(other.inputs)} where the plan has {len(self.inputs)}"
        for i, (a, b) in enumerate(zip(self.inputs, other.inputs, strict=True)):
            if a != b:
                return f"input {i} has {_words(b)} where the plan has {_words(a)}"
        if other.autocast != self.autocast:
            now, planned = _autocast_words(other.autocast), _autocast_words(self.autocast)
            return f"autocast is {now} where the plan has {planned}"
        return None


def _words(d: tuple[Any, ...]) -> str:
    if d[0] == "tensor":
        return f"shape {list(d[1])} ({str(d[2]).removeprefix('torch.')} on {d[3]})"
    return f"the value {d[1]}"


def _autocast_words(state: tuple[tuple[str, torch.dtype], ...]) -> str:
    if not state:
        return "off"
    return "on (" + ", ".join(f"{dev}: {str(dt).removeprefix('torch.')}" for dev, dt in state) + ")"


def refuse(planned: CallSpec, got: CallSpec) -> PlanMismatch:
    """The error for a call the plan was not made for (see module docstring)."""
    return PlanMismatch(
        f"memplan.applied: this call's {planned.difference(got)}; a plan runs the one step shape it was "
        "made for. Re-plan for this call (memplan.plan(model, inputs, mode='train', ...), under the same "
        "autocast), pass replan=lambda inputs: memplan.plan(model, inputs, ...) to memplan.applied to plan "
        "each new shape once, or keep every batch the planned shape (DataLoader(..., drop_last=True))"
    )


@contextmanager
def autocast_off() -> Iterator[None]:
    """Run captured ops as captured: autocast's casts are already ops of the graph, so it must not cast
    again (backward ops called inside the user's `torch.autocast` would be cast to its dtype)."""
    with ExitStack() as stack:
        for dev, _ in autocast_state():
            stack.enter_context(torch.autocast(dev, enabled=False))
        yield


@dataclass
class Turns:
    """Which forward of a planned step is the current one, and whether its backward is still to run."""

    current: int = 0
    open: bool = False

    def begin(self) -> tuple[int, bool]:
        """A forward starts: its turn, and whether it replaces one whose backward did not run."""
        replaced = self.open
        self.current += 1
        self.open = True
        return self.current, replaced

    def end(self, turn: int) -> None:
        """The backward of forward `turn` starts: refused unless it is the current, open one."""
        if turn != self.current or not self.open:
            raise PlanMismatch(
                "memplan.applied: backward of a planned forward that a later forward replaced (one planned "
                "step runs at a time: two micro-batches' losses summed before one backward, or a loss kept "
                "across forwards); call backward on each loss before the next forward, as gradient "
                "accumulation does"
            )
        self.open = False


@contextmanager
def patched_method(obj: Any, name: str, fn: Any) -> Iterator[None]:
    """`obj.name` is `fn` inside the block; on exit it is what it was (an instance attribute another
    context set stays, so patches nest)."""
    had = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, fn)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)
