"""Replay the random stream of re-run ops: a recomputed dropout must draw the mask its first run drew.

The first execution of a captured step runs its ATen ops in the order eager PyTorch runs them, on the same
default generators, so it draws the same numbers as the plain step (dropout is `empty_like` + `bernoulli_`
on a CPU tensor, `native_dropout` on a CUDA one, in the captured graph as in eager). An op the plan runs
again (a recompute closure, a checkpointed block's re-run) must draw them again: `RngReplay` records the
state of the generator of the op's device right before its first run, and a re-run sets that state, runs,
and puts the generator back where it was, so the stream the rest of the step (and the next step) sees is
untouched: what `torch.utils.checkpoint` does with `preserve_rng_state`, per op.

The generator state of a CPU tensor is the Mersenne Twister's (`torch.get_rng_state`, 5 KiB); that of a
CUDA tensor is Philox's seed and offset (`torch.cuda.get_rng_state`): replaying the offset with the same
op on the same shape launches the same kernel on the same counters, so the same numbers come out.
Other accelerators go through `torch.get_device_module(type)`, which has the same two functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from memplan.errors import InternalError, PlanMismatch


def is_random(target: Any) -> bool:
    """Whether an ATen op reads a generator (dropout, `bernoulli_`, `rand*`, `normal_`...): the op tag
    `nondeterministic_seeded` marks every such overload."""
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def refuse_random_split(value: str, closure: Iterable[torch.fx.Node]) -> None:
    """A split rebuilds rows [k:] by running its closure on fewer rows: a random op there would draw the
    first rows' numbers (MKL streams skipped ahead by chunk on CPU, Philox offsets by element on CUDA), not
    those of rows [k:]. The planner never splits through one (its row ops read no generator); refuse a plan
    that does."""
    bad = [str(n.target) for n in closure if is_random(n.target)]
    if bad:
        raise PlanMismatch(
            f"the plan splits {value}, whose rows' rebuild re-runs the random op {bad[0]}: a part of a "
            "random draw cannot be replayed, only a whole re-run; re-plan it with this memplan version"
        )


def op_device(node: torch.fx.Node) -> torch.device:
    """The device whose generator op `node` draws from: that of its (first) tensor output."""
    val = node.meta.get("val")
    for t in val if isinstance(val, (tuple, list)) else (val,):
        if isinstance(t, torch.Tensor):
            return t.device
    raise InternalError(f"random op {node.name} produces no tensor: cannot tell its generator")


def get_state(device: torch.device) -> torch.Tensor:
    """The state of `device`'s default generator."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def set_state(device: torch.device, state: torch.Tensor) -> None:
    """Set the state of `device`'s default generator."""
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


class RngReplay:
    """Generator states recorded at the first run of the random ops in `watched` (op index -> its device),
    replayed around their re-runs."""

    def __init__(self, watched: dict[int, torch.device]) -> None:
        self.watched = watched
        self.states: dict[int, torch.Tensor] = {}

    @classmethod
    def for_reruns(cls, nodes: dict[int, torch.fx.Node], reruns: Iterable[int]) -> RngReplay:
        """Watch the random ops among `reruns` (op indices the plan runs again); `nodes`: index -> node."""
        watched = {i: op_device(nodes[i]) for i in sorted(set(reruns)) if is_random(nodes[i].target)}
        return cls(watched)

    def record(self, index: int) -> None:
        """Before op `index`'s first run: keep its generator's state if the plan runs it again."""
        device = self.watched.get(index)
        if device is not None:
            self.states[index] = get_state(device)

    @contextmanager
    def replay(self, index: int) -> Iterator[None]:
        """Around a re-run of op `index`: its generator as at the first run, then back as it was."""
        device = self.watched.get(index)
        if device is None:
            yield
            return
        if index not in self.states:
            raise InternalError(f"op {index} re-run before its first run recorded its generator state")
        now = get_state(device)
        set_state(device, self.states[index])
        try:
            yield
        finally:
            set_state(device, now)

    def clear(self) -> None:
        """Forget the states of this step (the next step records its own)."""
        self.states.clear()
