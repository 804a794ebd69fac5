"""The calibration set and the float model `memplan.plan` measures sensitivity on, when the pipeline holds
the bitwidth pass and its options carry no sensitivity table.

A zoo model is planned from the meta device; its sensitivity needs real weights, so it is built again on
the CPU (tiny-lm with its trained weights when cached, every other zoo model with its seeded random init:
the same weights `memplan run` rebuilds) and wrapped as the capture wraps it, so parameter names match the
plan's. Calibration batches come from `calibration_batches`; a module the caller gave is measured as it is,
on its example inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from memplan.errors import InvalidInput
from memplan.passes.bitwidth import BitwidthOptions
from memplan.passes.bitwidth_problem import SensitivityTable
from memplan.planner.models import LoadedModel
from memplan.planner.sensitivity import SensitivitySettings, measure_sensitivity


def calibration_batches(vocab: int, context: int, s: SensitivitySettings, text: bool) -> list[torch.Tensor]:
    """`s.batches` batches of `s.batch_size` x min(`s.seq`, `context`) token ids: windows of the tiny-lm
    training text (`text`), else seeded random ids below `vocab`."""
    seq = min(s.seq, context)
    gen = torch.Generator().manual_seed(s.seed)
    if text:
        from memplan.zoo import tiny_lm

        train = tiny_lm.load_corpus().train
        starts = torch.randint(0, train.numel() - seq - 1, (s.batches, s.batch_size), generator=gen)
        offsets = starts[..., None] + torch.arange(seq)  # [batches, batch, seq]
        return list(train[offsets].long())
    return list(torch.randint(0, vocab, (s.batches, s.batch_size, seq), generator=gen))


def with_sensitivity(
    options: BitwidthOptions, spec: str | nn.Module, loaded: LoadedModel, gen: int, dtype: torch.dtype
) -> BitwidthOptions:
    """`options` with the sensitivity measured on the plan's model (see the module docstring)."""
    settings = SensitivitySettings(estimator=options.estimator)
    model, batches = model_and_batches(spec, loaded, gen, dtype, settings)
    table: SensitivityTable = measure_sensitivity(model, batches, options.resolved_candidates(), settings)
    return replace(options, sensitivity=table)


def model_and_batches(
    spec: str | nn.Module, loaded: LoadedModel, gen: int, dtype: torch.dtype, s: SensitivitySettings
) -> tuple[nn.Module, Sequence[Any]]:
    if isinstance(spec, nn.Module):
        if loaded.module is None:
            raise InvalidInput("the bitwidth pass needs the model's weights to measure sensitivity")
        return loaded.module, [loaded.example_inputs[0]]
    if not spec.startswith("zoo:"):
        raise InvalidInput(
            f"the bitwidth pass measures sensitivity on zoo models and nn.Modules; for {spec!r} give "
            "BitwidthOptions(sensitivity=memplan.planner.sensitivity.measure_sensitivity(...))"
        )
    from memplan.zoo import catalog, tiny_lm

    entry = catalog.get(spec)
    if entry.family == "resnet":
        raise InvalidInput(f"{spec}: the bitwidth pass measures sensitivity on language models")
    model = entry.build(device="cpu", dtype=dtype)
    config = entry.make_config()
    context = getattr(config, "n_positions", None) or config.max_position_embeddings
    trained = entry.name == "tiny-lm" and tiny_lm.is_cached()
    batches = calibration_batches(config.vocab_size, context, s, trained)
    return (model if gen else entry.inference_module(model)), batches
