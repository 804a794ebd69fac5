"""How much the loss suffers when each weight is stored in each candidate format: the bitwidth pass's
costs, measured on the real model and a small calibration set (so it lives above the runtime).

For a weight W (a 2-D `nn.Linear` or GPT-2 `Conv1D` weight not shared with any other kind of module) and a
format q, the second-order Taylor expansion of the loss around the trained weights, with the Hessian
replaced by its mean diagonal (HAWQ-V2, Dong et al., NeurIPS 2020; HAWQ-V3's Omega), gives

    cost(W, q) = 1/2 * Tr(H_W) / n * ||W - dequantize(quantize(W, q))||^2        (nats)

Tr(H_W) is estimated with Hutchinson's method: E[v^T H v] over Rademacher vectors v, each H v one double
backward (`torch.autograd.grad` of the gradient with `grad_outputs=v`), a few probes on each calibration
batch, and more until every weight's estimate has a standard error within `rel_error` of it (or
`max_probes`): v spans all weights at once, so a weight of small curvature has its estimate swamped by the
cross terms of the others' (on tiny-lm, 4 probes put one weight's trace 13x low, bench/bitwidth).
`estimator="fisher"` uses the mean squared gradient instead (one backward per batch, no double
backward): cheaper, noisier, and biased low at small batches. A Hutchinson estimate that comes out <= 0
(noise, or negative curvature) falls back to that tensor's Fisher value scaled by the median ratio of the
two over the tensors whose trace is positive, and says so (`estimator` of its row). The quantization error
uses the same `memplan.kernels.quantize` the runtime stores the weight with.

The loss: next-token cross-entropy for a language model (inputs are token ids, the output holds logits
[batch, seq, vocab]); otherwise cross-entropy against the float model's own argmax (self-distillation).
An embedding model (a sentence encoder: [batch, dim] vectors out) is measured with `loss=embedding_loss`,
the mean cosine distance to the float model's own embedding: its cost then predicts the drop in cosine
similarity to fp32. That loss is 0 with a zero gradient at the float weights, so its Hessian is the
Gauss-Newton one (positive semi-definite: every Hutchinson probe is >= 0) and the Fisher estimate is 0;
measure it with `hutchinson`.
Calibration batches: windows of the tiny-lm training text when the zoo's trained tiny-lm is cached, seeded
random token ids for other zoo language models, the example inputs for a module given by the caller.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memplan.errors import InvalidInput
from memplan.kernels.quantize import dequantize, quantize
from memplan.passes.bitwidth_problem import SensitivityTable, TensorSensitivity
from memplan.plans.decisions import Candidate

Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class SensitivitySettings:
    """`estimator` (hutchinson or fisher), the calibration set (`batches` of `batch_size` x `seq` tokens),
    Rademacher `probes` per batch at least and `max_probes` at most (more while some weight's trace estimate
    has a standard error above `rel_error` of it), and the seed of the probes and of random token ids."""

    estimator: str = "hutchinson"
    batches: int = 2
    batch_size: int = 4
    seq: int = 128
    probes: int = 4
    max_probes: int = 32
    rel_error: float = 0.1
    seed: int = 0


@dataclass(frozen=True, slots=True)
class QuantizableWeight:
    """A weight the bitwidth pass may quantize: its parameter name, the module that multiplies by it, and
    whether it is stored [in, out] (`Conv1D`)."""

    name: str
    module: str
    transposed: bool
    param: nn.Parameter


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `transformers.pytorch_utils.Conv1D`: a linear layer whose weight is [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantizable_weights(model: nn.Module) -> list[QuantizableWeight]:
    """The 2-D weights of `nn.Linear` and `Conv1D` modules, by their first parameter name, leaving out any
    shared with a module of another kind (a tied embedding: its lookup needs the float table)."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), []).append((path, module))
    out = []
    for name, p in model.named_parameters():
        owners = users.get(id(p), [])
        linear = [m for _, m in owners if isinstance(m, nn.Linear) or is_conv1d(m)]
        if p.dim() != 2 or not name.endswith(".weight") or not owners or len(linear) != len(owners):
            continue
        if any(m.weight is not p for m in linear):  # e.g. a bias of the same shape
            continue
        out.append(QuantizableWeight(name, name.removesuffix(".weight"), is_conv1d(linear[0]), p))
    return out


def squared_errors(
    weight: torch.Tensor, transposed: bool, candidates: Sequence[Candidate]
) -> dict[str, float]:
    """||W - dequantize(quantize(W, c))||^2 for every candidate, on the matrix the kernels multiply by."""
    stored = weight.detach().float()
    matrix = stored.T if transposed else stored  # [out, in]
    out = {}
    for c in candidates:
        spec = c.for_tensor(0, tuple(stored.shape), transposed)
        if c.format.startswith("int"):
            approx = dequantize(quantize(matrix, spec))
        else:
            approx = matrix.to(FLOAT_DTYPES[c.format]).float()
        out[c.label] = float(((matrix - approx) ** 2).sum())
    return out


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of the logits `model(ids)` gives (a tensor or `.logits`)."""
    out = model(ids)
    logits = getattr(out, "logits", out)  # [batch, seq, vocab]
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def self_distillation_loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the output against its own argmax (labels from the float model, no gradient)."""
    out = model(inputs)
    logits = getattr(out, "logits", out).float()
    flat = logits.reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(flat, flat.detach().argmax(-1))


def embedding_loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cosine similarity of the embeddings `model(inputs)` gives ([batch, dim]) to themselves
    detached: the float model's own embedding, no gradient."""
    emb = model(inputs).float().flatten(1)
    return (1 - nn.functional.cosine_similarity(emb, emb.detach(), dim=-1)).mean()


def _curvatures(
    model: nn.Module, weights: list[QuantizableWeight], batches: Sequence[torch.Tensor], loss: Loss,
    s: SensitivitySettings,
) -> tuple[list[float], list[float], list[int]]:  # fmt: skip
    """Per weight: the Hutchinson estimate of Tr(H)/n (empty under fisher) and the mean squared gradient;
    the probes each batch took. Each batch gets `s.probes` probes, then more (up to `s.max_probes`) while
    `_settled` says the noise of some weight's estimate is still above `s.rel_error` of it."""
    params = [w.param for w in weights]
    gen = torch.Generator().manual_seed(s.seed)
    samples: list[list[list[float]]] = [[] for _ in params]  # [weight][batch][probe]: v^T H v
    fisher = [0.0] * len(params)
    hutchinson = s.estimator == "hutchinson"
    most = max(s.probes, s.max_probes)
    counts = []
    for ids in batches:
        grads = torch.autograd.grad(loss(model, ids), params, create_graph=hutchinson)
        for i, g in enumerate(grads):
            fisher[i] += float((g.detach() ** 2).sum()) / len(batches)
            samples[i].append([])
        k = 0
        while hutchinson and k < most and (k < s.probes or not _settled(samples, s.rel_error)):
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for i, (hv, v) in enumerate(zip(hvs, vs, strict=True)):
                samples[i][-1].append(float((hv * v).sum()))
            k += 1
        counts.append(k)
        del grads
    n = [w.param.numel() for w in weights]
    if not hutchinson:
        return [], [f / m for f, m in zip(fisher, n, strict=True)], counts
    means = [statistics.fmean(statistics.fmean(b) for b in per) for per in samples]
    traces = [t / m for t, m in zip(means, n, strict=True)]
    return traces, [f / m for f, m in zip(fisher, n, strict=True)], counts


def _settled(samples: list[list[list[float]]], rel_error: float) -> bool:
    """Whether every weight's positive trace estimate (the mean over batches of each batch's mean over
    probes) has a standard error within `rel_error` of it; one probe in a batch has no spread yet (False)."""
    for per in samples:
        if any(len(b) < 2 for b in per):
            return False
        mean = statistics.fmean(statistics.fmean(b) for b in per)
        if mean <= 0:
            continue  # a trace estimated at <= 0 is replaced by the scaled Fisher anyway
        var = sum(statistics.variance(b) / len(b) for b in per) / len(per) ** 2
        if math.sqrt(var) > rel_error * mean:
            return False
    return True


def measure_sensitivity(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    candidates: Sequence[Candidate],
    settings: SensitivitySettings = SensitivitySettings(),
    loss: Loss | None = None,
) -> SensitivityTable:
    """The sensitivity of every quantizable weight of `model` (see the module docstring) on `batches`, for
    each of `candidates` (give the bitwidth options' `resolved_candidates()`)."""
    if settings.estimator not in ("hutchinson", "fisher"):
        raise InvalidInput(f"unknown sensitivity estimator {settings.estimator!r}; use hutchinson or fisher")
    weights = quantizable_weights(model)
    if not weights:
        raise InvalidInput(f"{type(model).__name__} has no nn.Linear or Conv1D weights to quantize")
    if any(w.param.device.type == "meta" for w in weights):
        raise InvalidInput("measuring sensitivity needs the model's real weights, not a meta-device model")
    chosen = loss or (lm_loss if _is_lm(model, batches[0]) else self_distillation_loss)
    was_training, flags = model.training, [w.param.requires_grad for w in weights]
    model.eval()
    try:
        for w in weights:
            w.param.requires_grad_(True)
        traces, fisher, counts = _curvatures(model, weights, batches, chosen, settings)
    finally:
        model.train(was_training)
        for w, flag in zip(weights, flags, strict=True):
            w.param.requires_grad_(flag)
    curv, estimators = _combine(traces, fisher)
    rows = tuple(
        TensorSensitivity(w.name, c, squared_errors(w.param, w.transposed, candidates), w.transposed, e)
        for w, c, e in zip(weights, curv, estimators, strict=True)
    )
    shape = "x".join(str(d) for d in batches[0].shape)
    spread = f"{min(counts)}-{max(counts)}" if min(counts) < max(counts) else f"{min(counts)}"
    probes = f", {spread} Rademacher probes each" if settings.estimator == "hutchinson" else ""
    fallback = sum(e == "fisher" for e in estimators) if settings.estimator == "hutchinson" else 0
    text = f"{settings.estimator}, {len(batches)} batches of {shape}{probes}, {chosen.__name__}"
    if fallback:
        text += f"; {fallback} traces <= 0 replaced by scaled Fisher"
    return SensitivityTable(rows, text)


def _combine(traces: list[float], fisher: list[float]) -> tuple[list[float], list[str]]:
    """Hutchinson traces where positive, else the Fisher value scaled by the median trace/Fisher ratio."""
    if not traces:
        return fisher, ["fisher"] * len(fisher)
    ratios = [t / f for t, f in zip(traces, fisher, strict=True) if t > 0 and f > 0]
    scale = statistics.median(ratios) if ratios else 1.0
    curv = [t if t > 0 else f * scale for t, f in zip(traces, fisher, strict=True)]
    return curv, ["hutchinson" if t > 0 else "fisher" for t in traces]


def _is_lm(model: nn.Module, batch: Any) -> bool:
    """Token ids in, [batch, seq, vocab] logits out (checked on one sample, without gradient)."""
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.long or batch.dim() != 2:
        return False
    with torch.no_grad():
        out = model(batch[:1])
    return getattr(out, "logits", out).dim() == 3
