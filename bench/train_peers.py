"""Helpers of `bench/train.py`: the models, one measured training step, the two peers, and the comparison.

- `load_bench_model` builds a model whose `module(*inputs)` returns the loss: a zoo model, or
  `llama-gpt2size`, a Llama-style model of GPT-2 small's size (12 x 768, 12 heads, MLP 2048, vocab 32000,
  134M parameters) wrapped the way the zoo wraps its models.
- `measure` runs warm-up steps (compilation), then one step under the live-storage tracker (peak, loss,
  gradients); `time_rounds` then times the methods compared at one memory level (and the plain step) in
  rounds, outside the tracker: the tracker's per-op Python hook costs every method time in proportion to
  its op count, so it measures memory, never speed.
- `StepTracker` is `memplan.runtime.tracker.CompiledCodeTracker`, the live-storage tracker under which
  compiled code runs compiled (a plain one makes dynamo run the frame eagerly). Eager and memplan steps
  never enter dynamo, so for them it is the plain tracker.
- Peer 1, `checkpointed`: every transformer block's forward wrapped in
  `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`.
- Peer 2, `compiled`: `torch.compile(backend="aot_eager_decomp_partition")` under one value of
  `torch._functorch.config.activation_memory_budget`, dynamo reset before and after.
- `level_notes` compares memplan with each peer point at that point's measured peak (memplan's "twin" of the
  point, planned with that peak as its budget); `write_pareto` draws measured peak against overhead.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._functorch.config
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from memplan.planner.models import load_model
from memplan.runtime.tracker import CompiledCodeTracker
from memplan.zoo.catalog import INPUT_SEED, build_from_config, llama_config

MiB = 2**20
RTOL, ATOL = 1e-5, 1e-6
"""Tolerance for a step whose ops differ from the plain step's (recomputation, decompositions)."""
LLAMA_GPT2SIZE = "llama-gpt2size"
"""A Llama-style model of GPT-2 small's size; every other name is a zoo model."""

LossCall = Callable[..., torch.Tensor]


StepTracker = CompiledCodeTracker


class _LossModule(nn.Module):
    """`module(input_ids, labels)` is the causal-LM loss of `model` (as `ZooModel.loss_module` does)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.model(input_ids=input_ids, labels=labels, use_cache=False).loss
        return loss


@dataclass(frozen=True)
class BenchModel:
    """A model ready to step: `module(*inputs)` returns the loss; `blocks` are its transformer blocks."""

    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    blocks: tuple[nn.Module, ...]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


def load_bench_model(name: str, batch: int, seq: int) -> BenchModel:
    """Build `name` on the CPU (seeded init) in train mode, with inputs of `batch` x `seq` tokens."""
    if name == LLAMA_GPT2SIZE:
        config = llama_config(768, 2048, 12, 12, 12, vocab=32000, max_positions=1024)
        module: nn.Module = _LossModule(build_from_config(LlamaForCausalLM, config, "cpu", torch.float32))
        gen = torch.Generator().manual_seed(INPUT_SEED)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)  # [batch, seq] token ids
        inputs: tuple[torch.Tensor, ...] = (ids, ids.clone())  # the model shifts labels itself
    else:
        loaded = load_model(f"zoo:{name}", "train", batch=batch, seq=seq, device="cpu")
        assert loaded.module is not None
        module, inputs = loaded.module, loaded.example_inputs
    module.train()
    blocks = tuple(m for m in module.modules() if isinstance(m, GradientCheckpointingLayer))
    return BenchModel(name, module, inputs, blocks)


@dataclass
class StepRun:
    """One method's measured step: peak (tracked step), step times (untracked steps), correctness."""

    peak_bytes: int
    warmup_s: float
    """Wall time of the first warm-up step (includes compilation), 0 without one."""
    ops: int
    """Aten ops the tracker saw in the tracked step."""
    loss: torch.Tensor
    grads: list[torch.Tensor | None]
    """Kept only when asked (the reference step); empty otherwise."""
    equal: str = "-"
    """How loss and gradients compare with the reference: bitwise, allclose, or DIFFERENT (...)."""
    times: list[float] = field(default_factory=list)
    """Wall seconds of each timed step (outside the tracker), one per round of `time_rounds`."""
    plain_times: list[float] = field(default_factory=list)
    """The plain step's times in the same rounds."""

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    @property
    def overhead(self) -> float:
        """Median step time over the plain step's median in the same rounds, minus 1."""
        return self.step_s / statistics.median(self.plain_times) - 1.0


def _one_step(call: LossCall, model: BenchModel) -> torch.Tensor:
    for p in model.params:
        p.grad = None
    loss = call(*model.inputs)
    loss.backward()
    return loss.detach()


def time_steps(call: LossCall, model: BenchModel, reps: int) -> list[float]:
    """Wall seconds of `reps` steps, outside any tracker; gradients are dropped after."""
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        _one_step(call, model)
        times.append(time.perf_counter() - t0)
    for p in model.params:
        p.grad = None
    return times


def measure(call: LossCall, model: BenchModel, warmup: int, reference: StepRun | None = None,
            keep_grads: bool = False) -> StepRun:
    """Warm up, then track one step (peak, loss, gradients) and compare it with `reference`; the step is
    timed later, by `time_rounds`, outside the tracker."""
    warm = time_steps(call, model, warmup)
    gc.collect()
    with StepTracker(record_timeline=False) as tracker:
        tracker.track([*model.params, *model.module.buffers(), *model.inputs])
        loss = call(*model.inputs)
        loss.backward()
    loss = loss.detach()
    grads = [p.grad for p in model.params]
    equal = compare_step(loss, grads, reference.loss, reference.grads) if reference is not None else "-"
    for p in model.params:
        p.grad = None
    return StepRun(tracker.result.peak_bytes, warm[0] if warm else 0.0, tracker.result.ops, loss,
                   grads if keep_grads else [], equal)


@dataclass
class Rounds:
    """What `time_rounds` measured: one list of step times per entry, and the entries whose step raised
    (index -> the error; such an entry is left out of the later rounds)."""

    times: list[list[float]]
    errors: dict[int, str]


def time_rounds(steps: Sequence[tuple[LossCall, BenchModel]], reps: int) -> Rounds:
    """Wall seconds of `reps` rounds of steps: each round times one step of every entry, the order rotated
    by one each round, so that the methods compared share the machine's speed of the moment and each
    follows each other equally often."""
    out = Rounds([[] for _ in steps], {})
    for r in range(reps):
        for i in (k % len(steps) for k in range(r, r + len(steps))):
            if i in out.errors:
                continue
            try:
                out.times[i] += time_steps(*steps[i], 1)
            except Exception as e:  # recorded for that entry; the others go on
                out.errors[i] = f"{e!r}"[:300]
    return out


def compare_step(loss: torch.Tensor, grads: Sequence[torch.Tensor | None], ref_loss: torch.Tensor,
                 ref_grads: Sequence[torch.Tensor | None], rtol: float = RTOL, atol: float = ATOL) -> str:
    """'bitwise' if loss and every gradient are identical, 'allclose' if within tolerance, else
    'DIFFERENT (...)' with the largest absolute difference."""
    pairs = [(loss, ref_loss), *zip(grads, ref_grads, strict=True)]
    if any((a is None) != (b is None) for a, b in pairs):
        return "DIFFERENT (a gradient is missing)"
    tensors = [(a, b) for a, b in pairs if a is not None and b is not None]
    if all(torch.equal(a, b) for a, b in tensors):
        return "bitwise"
    if all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in tensors):
        return "allclose"
    worst = max(float((a - b).abs().max()) for a, b in tensors)
    return f"DIFFERENT (max |diff| {worst:.3g})"


@contextmanager
def checkpointed(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, every block's forward runs under non-reentrant `torch.utils.checkpoint`."""

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    for block in blocks:
        block.forward = wrap(block.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def without_checkpoints(module: nn.Module, blocks: Sequence[nn.Module]) -> LossCall:
    """The plain forward of `module` while `checkpointed(blocks)` is active (to time both in rounds)."""

    def run(*inputs: Any) -> torch.Tensor:
        saved = [block.__dict__.pop("forward") for block in blocks]
        try:
            return module(*inputs)  # type: ignore[no-any-return]
        finally:
            for block, forward in zip(blocks, saved, strict=True):
                block.forward = forward  # type: ignore[method-assign]

    return run


@dataclass
class CompileStats:
    """What dynamo did for one compiled model: graphs compiled and graph breaks (0 means one whole graph)."""

    graphs: int = 0
    graph_breaks: int = 0


@contextmanager
def compiled(module: nn.Module, memory_budget: float) -> Iterator[tuple[LossCall, CompileStats]]:
    """`torch.compile(module, backend="aot_eager_decomp_partition")` with `activation_memory_budget` set for
    the whole block (the partitioner reads it when the first call compiles); dynamo is reset around it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    stats = CompileStats()
    try:
        with torch._functorch.config.patch(activation_memory_budget=memory_budget):
            yield torch.compile(module, backend="aot_eager_decomp_partition"), stats
            stats.graphs = int(counters["stats"].get("unique_graphs", 0))
            stats.graph_breaks = sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# Comparison at equal memory, and the plot


def peer_label(row: dict[str, Any]) -> str:
    """How a peer point is named in its memplan twin's `twin_of` field."""
    return f"{row['method']} {row['knob']}"


def level_notes(rows: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """One note per peer point, comparing it with memplan at its memory level. With a twin (memplan planned at
    the peer's measured peak, timed in the same rounds): the twin's overhead. Without one (the twin's run
    failed): the cheapest memplan point whose measured peak is at or below the peer's (no interpolation).
    A twin that is infeasible means memplan cannot reach that level. Returns (notes, goal met)."""
    notes: list[str] = []
    met = True
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == model and r["method"] == "memplan"]
        for peer in (r for r in rows if r["model"] == model and r["method"] in ("checkpoint", "compile")):
            if "peak_MiB" not in peer:
                continue
            head = (f"{model}, {peer_label(peer)} ({peer['peak_MiB']:.4g} MiB, {peer['overhead_%']:+.1f}%)")
            twin = next((r for r in ours if r.get("twin_of") == peer_label(peer)), None)
            if twin is not None and "lower_bound_bytes" in twin:
                low = twin["lower_bound_bytes"] / MiB
                notes.append(f"{head}: memplan cannot reach it (lower bound {low:.4g} MiB)")
                met = False
                continue
            if twin is not None and "peak_MiB" in twin:
                best, how = twin, ""
            else:
                below = [r for r in ours if "peak_MiB" in r and r["peak_MiB"] <= peer["peak_MiB"]]
                if not below:
                    notes.append(f"{head}: no memplan point at or below {peer['peak_MiB']:.4g} MiB")
                    met = False
                    continue
                best, how = min(below, key=lambda r: r["overhead_%"]), " (cheapest point at or below)"
            won = best["overhead_%"] < peer["overhead_%"]
            met &= won
            notes.append(f"{head}: memplan {best['knob']}{how} reaches {best['peak_MiB']:.4g} MiB at "
                         f"{best['overhead_%']:+.1f}%: {'lower' if won else 'NOT lower'} overhead")
    return notes, met


def _short(knob: str) -> str:
    """A point's label on the plot: memplan's budget share, compile's memory budget."""
    return knob.split()[-1] if knob.startswith("activation") else knob.split(" (")[0].split()[-1]


def write_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    """Measured peak (x) vs step-time overhead (y), one subplot per model, one series per method; written
    atomically (temporary file in the same folder, then renamed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(6 * len(models), 4.5))
    FigureCanvasAgg(fig)
    styles = {"plain": ("k", "*"), "memplan": ("C0", "o"), "memplan twin": ("C0", "x"),
              "memplan-torch": ("C4", "D"), "checkpoint": ("C1", "s"), "compile": ("C2", "^")}

    def series(r: dict[str, Any]) -> str:
        return "memplan twin" if r.get("twin_of") else r["method"]

    for i, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        for method, (color, marker) in styles.items():
            pts = sorted((r["peak_MiB"], r["overhead_%"], _short(r["knob"])) for r in rows
                         if r["model"] == model and series(r) == method and "peak_MiB" in r)
            if not pts:
                continue
            xs, ys, _ = zip(*pts, strict=True)
            line = "-" if len(pts) > 1 and method != "memplan twin" else "none"
            ax.plot(xs, ys, color=color, marker=marker, label=f"{model} {method}", linestyle=line)
            for x, y, label in pts if method in ("memplan", "compile") else ():
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=color)
        ax.set_xlabel("measured peak (MiB)")
        ax.set_ylabel("step-time overhead vs plain (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
