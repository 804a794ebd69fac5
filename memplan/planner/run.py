"""`memplan run`: rebuild the model a plan names, check it is the plan's, run the planned step for real
and compare what the live-storage tracker measured with the plan's prediction.

This is a door (it resolves models by name, which the runtime does not), so it lives above the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memplan.errors import InternalError, InvalidInput, PlanMismatch
from memplan.ir.frontends.fx_lower import Capture
from memplan.planner.models import LoadedModel, capture, load_causal_lm, load_model
from memplan.plans.compare import Comparison, GenerationComparison, compare, compare_generation
from memplan.plans.plan import Plan, fingerprint
from memplan.runtime.arena import check_arena_run, describe, run_in_arena
from memplan.runtime.generation import GenerationMeasurement
from memplan.runtime.measure import run_inference, run_step
from memplan.runtime.quantized import quantize_model
from memplan.runtime.quantized_graph import run_quantized_inference
from memplan.runtime.tracker import Measurement
from memplan.runtime.training import applied


def check_fingerprint(plan: Plan, loaded: LoadedModel) -> Capture | None:
    """Refuse to run a plan on a model it was not made for; returns the fresh capture."""
    graph, cap = capture(loaded, plan.workload.mode, plan.workload.optimizer)
    got = fingerprint(graph)
    if got != plan.model.fingerprint:
        raise PlanMismatch(
            f"this plan was made for model {plan.model.name!r} (fingerprint {plan.model.fingerprint}), "
            "but the "
            f"model given has fingerprint {got}: different parameters or ops. Re-plan with `memplan plan`."
        )
    return cap


def run_plan(
    plan: Plan,
    module: torch.nn.Module | None = None,
    example_inputs: Sequence[Any] | None = None,
    emulate: Sequence[str] = (),
) -> tuple[Measurement, Comparison]:
    """Check the model is the plan's, run the step the plan describes, and compare with its prediction.

    Inference runs the captured graph in the planned schedule (with quantized weights where the plan has
    them: `memplan.runtime.quantized_graph`); training runs the step (forward, backward, optimizer) from an
    ordinary eager loop, under `memplan.applied` when the plan moves activations.
    `emulate` names tiers to back with host memory (`cxl`), said so in every report. Zoo plans rebuild
    their model from `plan.model.source`; any other plan needs `module` and `example_inputs`.
    """
    w = plan.workload
    if module is None:
        if not plan.model.source.startswith("zoo:"):
            raise InvalidInput(
                f"plan for {plan.model.source!r}: pass the module and example inputs to run it"
            )
        loaded = load_model(plan.model.source, w.mode, None, w.batch, w.seq, device="cpu", dtype=_dtype(plan))
    else:
        loaded = load_model(module, w.mode, example_inputs, w.batch, w.seq)
    cap = check_fingerprint(plan, loaded)
    assert loaded.module is not None
    if _quantizes(plan) and cap is not None:
        measured = run_quantized_inference(plan, cap, loaded.module, loaded.example_inputs)
    elif w.mode == "infer" and cap is not None:
        measured = run_inference(cap, loaded.module, loaded.example_inputs)
    elif plan.decisions.remat is not None:
        with applied(plan, loaded.module, emulate=frozenset(emulate)):
            measured = run_step(loaded.module, loaded.example_inputs, w.mode, w.optimizer)
    else:
        measured = run_step(loaded.module, loaded.example_inputs, w.mode, w.optimizer)
    return measured, compare(plan, measured)


@dataclass(frozen=True)
class GenerationResult:
    """A planned generation next to the plain model's: same tokens?, and the plan's comparison."""

    tokens_equal: bool
    plain_s: float
    planned_s: float
    comparison: GenerationComparison
    measured: GenerationMeasurement
    lossy: bool = False
    """The plan quantizes weights or budgets the KV cache: `tokens_equal` compares with the model so
    changed, every weight in memory; `float_agreement`: the share of new tokens the float model agrees on."""
    float_agreement: float = 1.0

    def describe(self) -> str:
        same = "identical to" if self.tokens_equal else "DIFFERENT from"
        whose = (
            "the model as the plan changes it (quantized weights, compressed KV cache) with every weight in "
            f"memory; {100 * self.float_agreement:.1f}% of the new tokens equal the float model's"
            if self.lossy
            else "the plain model's"
        )
        backends = "; ".join(f"{t}: {b}" for t, b in self.measured.backends.items())
        return (
            f"{self.comparison.describe()}\ngenerated tokens {same} {whose} (greedy); wall time "
            f"{self.planned_s:.2f} s planned vs {self.plain_s:.2f} s plain (all weights in memory)."
            + (f"\ntiers: {backends}" if backends else "")
        )


def _quantizes(plan: Plan) -> bool:
    return plan.decisions.bits is not None and bool(plan.decisions.bits.tensors)


def run_generation_plan(plan: Plan, prompt_file: str | None = None) -> GenerationResult:
    """`memplan run` of a generation plan: rebuild the zoo model in memory, generate greedily with the
    model as the plan changes it (quantized weights, compressed KV cache) but with every weight in memory,
    then under the plan, and compare the tokens (placement must not change them) and the predictions; the
    plain float model's tokens are the reference for what the lossy decisions cost."""
    import time

    from memplan.runtime.generation import applied_generation
    from memplan.runtime.kv_cache import applied_kv

    w = plan.workload
    if not plan.model.source.startswith("zoo:"):
        raise InvalidInput(f"plan for {plan.model.source!r}: run it with memplan.applied(plan, model)")
    loaded = load_causal_lm(plan.model.source, None, w.batch, w.seq, device="cpu", dtype=_dtype(plan))
    assert loaded.module is not None
    ids = prompt_ids(prompt_file, w.batch, w.seq or 1) if prompt_file else loaded.example_inputs[0]
    model = loaded.module

    def generate(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m.generate(ids, max_new_tokens=w.gen, min_new_tokens=w.gen, do_sample=False)

    t0 = time.perf_counter()
    plain = generate(model)
    plain_s = time.perf_counter() - t0
    expected = plain
    kv = plan.decisions.kv if plan.decisions.kv is not None and plan.decisions.kv.budgets else None
    if _quantizes(plan) or kv is not None:
        reference = model
        if _quantizes(plan):
            reference = load_causal_lm(plan.model.source, None, w.batch, w.seq, device="cpu",
                                       dtype=_dtype(plan)).module  # fmt: skip
            assert reference is not None
            quantize_model(plan, reference)
        if kv is not None:
            with applied_kv(kv, reference):
                expected = generate(reference)
        else:
            expected = generate(reference)
    with applied_generation(plan, model) as run:
        t0 = time.perf_counter()
        out = generate(model)
        planned_s = time.perf_counter() - t0
    measured = run.finish()
    new = slice(ids.shape[1], None)
    agree = float((out[:, new] == plain[:, new]).float().mean())
    return GenerationResult(
        torch.equal(expected, out), plain_s, planned_s, compare_generation(plan, measured), measured,
        lossy=expected is not plain, float_agreement=agree,
    )  # fmt: skip


def prompt_ids(path: str, batch: int, prompt: int) -> torch.Tensor:
    """Token ids from a text file, one per byte (valid for every vocabulary of at least 256), repeated to
    fill `batch` rows of `prompt` tokens."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"no prompt file at {file}")
    data = file.read_bytes()
    if not data:
        raise InvalidInput(f"prompt file {file} is empty")
    need = batch * prompt
    ids = torch.tensor(list((data * (need // len(data) + 1))[:need]), dtype=torch.long)
    return ids.view(batch, prompt)


def run_arena_for_plan(plan: Plan) -> str:
    """`memplan run --arena`: rebuild the zoo model the plan names, run it in the plan's arenas, check it
    against the exported graph and eager execution, and describe the run in one paragraph."""
    w = plan.workload
    if not plan.model.source.startswith("zoo:"):
        raise InvalidInput(
            f"plan for {plan.model.source!r}: `--arena` rebuilds zoo models only; call "
            "memplan.runtime.arena.run_in_arena with the module and its inputs"
        )
    if w.mode != "infer":
        raise InvalidInput("`--arena` runs inference plans; this one is a training plan")
    if _quantizes(plan):
        raise InvalidInput(
            "`--arena` runs the captured graph, whose ops multiply float weights; a plan with quantized "
            "weights runs with `memplan run` (no --arena)"
        )
    loaded = load_model(plan.model.source, w.mode, None, w.batch, w.seq, device="cpu", dtype=_dtype(plan))
    cap, module = check_fingerprint(plan, loaded), loaded.module
    if cap is None or module is None:
        raise InternalError(f"zoo model {plan.model.source} came without a capture or a module")
    run = run_in_arena(plan, cap, module, loaded.example_inputs)
    check = check_arena_run(run, plan, cap, module, loaded.example_inputs)
    ref = run_inference(cap, module, loaded.example_inputs)
    return describe(run, check, ref.wall_s, ref.peak_bytes)


def _dtype(plan: Plan) -> torch.dtype:
    dtypes = {v.dtype for v in plan.tensors if v.role.value == "parameter"}
    return getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32
