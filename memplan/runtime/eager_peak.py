"""The torch mechanism's device peak, predicted before it runs: a dry run of the step on fake tensors.

`memplan.applied(plan, model, mechanism="torch")` cannot hold every plan's budget: SAC rebuilds all of a
checkpointed block's recomputed tensors when its backward starts (the plan rebuilds each just before its
use) and re-runs the block's forward up to the last of them, autograd keeps what the plan decided outside
the blocks, and swaps happen when autograd saves and unpacks a tensor, not at the plan's steps. Rather than
model all that, `predict_peak` runs the step itself (`model(*inputs)`, then `loss.backward()`) with the
mechanism installed, on fake tensors (`FakeTensorMode`: shapes and storages, no data, nothing allocated),
under the live storage tracker, which counts fake storages exactly as it counts real ones. The inputs are
fake tensors of the plan's input shapes; the parameters, buffers and inputs are counted from the start, as
the plan counts them; the swaps go to a `FakeStore` whose read-backs are counted when backward reads them
(when the tracker sees them in a real run too). `applied_torch` calls it at entry and refuses, with
`TorchOverBudget`, a plan whose device budget the step would exceed.

What a dry run cannot see: a swapped storage stays on the device in a real run until its asynchronous
copy out is done (a dry run drops it at once), and a step other than `model(*inputs); loss.backward()`
(inputs of other shapes, gradient accumulation, a loss computed outside the model) has another peak.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Self

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memplan.errors import InvalidInput, MemplanError
from memplan.ir.graph import Role
from memplan.plans.plan import Plan
from memplan.runtime.eager import installed
from memplan.runtime.eager_setup import EagerInfo, Mechanism, prepare
from memplan.runtime.eager_swap import Swapper
from memplan.runtime.tiers.api import Handle, TierStats
from memplan.runtime.tracker import LiveStorageTracker


class TorchOverBudget(MemplanError):
    """The torch mechanism would exceed the plan's device budget; the message says by how much and what
    to do instead."""

    def __init__(self, message: str, peak_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.peak_bytes = peak_bytes
        self.budget_bytes = budget_bytes


@dataclass(frozen=True)
class TorchPeak:
    """The predicted device peak of one step under the torch mechanism, and the plan's budget."""

    peak_bytes: int
    budget_bytes: int | None
    peak_op: str
    """The aten op at which the dry run reached its peak."""
    plan_peak_bytes: int
    """The plan's own predicted peak (what the graph mechanism reaches)."""

    @property
    def excess_bytes(self) -> int:
        """By how much the peak exceeds the budget (0 within it or without a budget)."""
        return max(0, self.peak_bytes - self.budget_bytes) if self.budget_bytes is not None else 0


class FakeStore:
    """A tier store for the dry run: remembers what was put, gives back fresh (fake) bytes of its size."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self._ids = itertools.count()
        self._live: dict[int, torch.device] = {}

    def put(self, key: str, t: torch.Tensor) -> Handle:
        nbytes = t.numel() * t.element_size()
        handle = Handle(next(self._ids), key, self.tier, nbytes, t.dtype, tuple(t.shape))
        self._live[handle.id] = t.device
        return handle

    def get(self, handle: Handle, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.empty(handle.nbytes, dtype=torch.uint8, device=self._live[handle.id])

    def prefetch(self, handle: Handle, out: torch.Tensor | None = None) -> None:
        """Nothing to read ahead: the tracker counts read-back bytes when backward asks for them."""

    def wait(self, handle: Handle) -> None:
        """Copies out are instant here."""

    def free(self, handle: Handle) -> None:
        self._live.pop(handle.id, None)

    def flush(self) -> None:
        """Copies out are instant here."""

    def stats(self) -> TierStats:
        return TierStats(self.tier, "dry run", True, 0, 0, 0, 0, len(self._live), 0, 0.0, 0.0, 0.0, 0.0)

    def close(self) -> None:
        self._live.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fake_inputs(plan: Plan, mode: FakeTensorMode, device: torch.device) -> list[torch.Tensor]:
    """Fake tensors shaped like the plan's step inputs (INPUT values that no op writes), in order."""
    graph = plan.graph()
    values = [v for v in graph.values if v.role == Role.INPUT and graph.producer(v.id) is None]
    with mode:
        return [torch.empty(v.shape, dtype=getattr(torch, v.dtype), device=device) for v in values]


class _Step(torch.nn.Module):
    """One training step of `model` as a module call, so that `functional_call` keeps the fake parameters
    in place through the backward too (SAC's recomputation reads the blocks' parameters again there)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> None:
        self.model(*inputs).backward()


def dry_run(plan: Plan, model: torch.nn.Module, mech: Mechanism) -> tuple[int, str]:
    """(peak bytes, op at the peak) of `model(*inputs); loss.backward()` with `mech` installed, on fake
    tensors: the model's parameters and buffers are swapped for fake ones for the run (`functional_call`),
    its own tensors, gradients and RNG state are left as they were."""
    mode = FakeTensorMode()
    mode.cache_enabled = False  # its dispatch cache keeps the storages given to `set_` alive
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    fake_params = {  # leaves without a .grad (the step starts with none, as after zero_grad)
        f"model.{n}": mode.from_tensor(p.detach()).requires_grad_(p.requires_grad) for n, p in params.items()
    }
    fake_buffers = {f"model.{n}": mode.from_tensor(b) for n, b in buffers.items()}
    inputs = _fake_inputs(plan, mode, device)
    info = EagerInfo(sorted(mech.checkpointed), sorted(mech.specs), mech.tier)
    swapper = Swapper(FakeStore(mech.tier or "device"), info) if mech.specs else None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), mode, installed(mech, swapper, info):
        with LiveStorageTracker(record_timeline=False) as tracker:
            tracker.track([*fake_params.values(), *fake_buffers.values(), *inputs])
            torch.func.functional_call(
                _Step(model), (fake_params, fake_buffers), tuple(inputs), tie_weights=True, strict=False
            )
    return tracker.result.peak_bytes, tracker.result.peak_op


def predict_peak(plan: Plan, model: torch.nn.Module, mech: Mechanism | None = None) -> TorchPeak:
    """The device peak of one step of `model` under `plan` with the torch mechanism (module docstring)."""
    mech = mech if mech is not None else prepare(plan, model)[0]
    try:
        peak, op = dry_run(plan, model, mech)
    except MemplanError:
        raise
    except Exception as e:
        raise InvalidInput(
            "memplan.applied(mechanism='torch'): could not predict the step's peak by running "
            f"`model(*inputs); loss.backward()` on fake tensors of the plan's input shapes ({e!r:.300}); "
            "use mechanism='graph', or `applied_torch(..., refuse_over_budget=False)` to run unchecked"
        ) from e
    budget = plan.budget_bytes.get("device")
    return TorchPeak(peak, budget, op, plan.predictions.peak_bytes.get("device", 0))


def check_peak(plan: Plan, model: torch.nn.Module, mech: Mechanism, refuse: bool = True) -> TorchPeak | None:
    """The predicted peak (None when not `refuse`: nothing is checked then); raises `TorchOverBudget` if it
    exceeds the plan's device budget."""
    if not refuse:
        return None
    peak = predict_peak(plan, model, mech)
    if peak.excess_bytes > 0:
        raise TorchOverBudget(over_budget_message(peak), peak.peak_bytes, peak.budget_bytes or 0)
    return peak


def over_budget_message(peak: TorchPeak) -> str:
    """What the refusal says: the predicted peak, the budget, the excess, what to do."""
    budget = peak.budget_bytes or 0
    return (
        f"memplan.applied(mechanism='torch'): this plan's step would peak at {peak.peak_bytes} B on the "
        f"device (predicted by a dry run on fake tensors, at {peak.peak_op}), over the plan's budget of "
        f"{budget} B by {peak.excess_bytes} B ({peak.excess_bytes / budget:.1%}); the plan itself "
        f"predicts {peak.plan_peak_bytes} B. Use mechanism='graph', which holds the plan's budget, or accept "
        f"a budget of at least {peak.peak_bytes} B for this plan under mechanism='torch' "
        "(memplan.planner.torch_mechanism.plan_for_torch plans lower until the torch mechanism fits a budget)"
    )
