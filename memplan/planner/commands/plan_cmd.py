"""`memplan plan MODEL --mode train|infer --budget SIZE [--budget TIER=SIZE ...] [--hardware NAME|FILE]
[--batch N] [--seq N] [--passes remat_swap,allocate] [--bits-limit SIZE] [--sensitivity fisher]
[--gen N --kv-budget 20%] -o plan.json`.

`--budget 6GiB` bounds the device's peak; `--budget host=32GiB --budget ssd=200GiB` bound other tiers (a
tier without a budget is held to its capacity). `--passes bitwidth,allocate` quantizes weights (the
bitwidth pass runs only when named): by default to what fits the device budget, or to `--bits-limit` bytes
of quantized weights; `--sensitivity` picks how their sensitivity is measured. `--kv-budget` bounds a
generation's KV cache (the kv_budget pass; `--kv-method`, `--kv-bits`, `--kv-per-head`, `--kv-sink`,
`--kv-recent` shape it).
"""

from __future__ import annotations

import argparse

from memplan.errors import InvalidInput
from memplan.units import format_size, parse_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "plan", help="plan a model's step under a device budget and write plan.json", description=__doc__
    )
    p.add_argument("model", help="zoo:NAME, a path to an .onnx file, or package.module:factory")
    p.add_argument("--mode", choices=["train", "infer"], default="infer")
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="[TIER=]SIZE",
        help="peak budget of the device (16GiB, 512MiB, 2GB or bytes), or of TIER (host=32GiB); repeatable "
        "(default: each tier's capacity)",
    )
    p.add_argument(
        "--passes",
        help="comma-separated passes to run, in order (default: every built pass that applies: "
        "remat_swap,placement,allocate)",
    )
    p.add_argument(
        "--bits-limit",
        metavar="SIZE",
        help="bitwidth: the most bytes the quantizable weights may take (default: what fits the budget)",
    )
    p.add_argument(
        "--sensitivity",
        choices=["hutchinson", "fisher"],
        help="bitwidth: Hessian trace by Hutchinson probes (default) or the cheaper mean squared gradient",
    )
    p.add_argument(
        "--kv-budget",
        metavar="BUDGET",
        help="a generation's KV cache: bytes (2GiB), a share of the full cache (20%%) or tokens per layer "
        "(96 tokens); runs the kv_budget pass",
    )
    p.add_argument(
        "--kv-method",
        choices=["memplan", "uniform", "pyramidkv", "prefixkv", "zigzagkv"],
        help="how the KV budget is shared among layers (default memplan: tokens and bits per layer, an ILP)",
    )
    p.add_argument(
        "--kv-bits",
        metavar="LIST",
        help="bit widths the memplan method may store KV tokens at, e.g. full,8,4 (default full,8,4,2)",
    )
    p.add_argument("--kv-per-head", action="store_true", help="KV budgets per key/value head (memplan)")
    p.add_argument("--kv-sink", type=int, help="KV tokens at the start never evicted (default 4)")
    p.add_argument("--kv-recent", type=int, help="latest KV tokens never evicted (default 16)")
    p.add_argument(
        "--hardware",
        default="cpu",
        help="preset name (cpu, t4-16gb, a100-40gb, a100-80gb, h100-80gb) or a hardware JSON file",
    )
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int, help="sequence length (in a generation: the prompt's)")
    p.add_argument("--prompt", type=int, help="prompt tokens of a generation (same as --seq)")
    p.add_argument(
        "--gen", type=int, default=0, help="plan a generation of this many new tokens (mode infer)"
    )
    p.add_argument(
        "--optimizer",
        choices=["none", "sgd", "adamw"],
        default="none",
        help="include the optimizer update (and its state) in a training step",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="parameter dtype of zoo models (default fp32)",
    )
    p.add_argument("-o", "--output", default="plan.json", help="where to write the plan (default plan.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memplan.planner.api import plan

    console = Console(stderr=True)
    passes = args.passes.split(",") if args.passes else None
    options = {**(bits_options(args, passes) or {}), **kv_options(args)} or None
    with console.status("planning...") as status:
        result = plan(
            args.model,
            mode=args.mode,
            budget=budgets_of(args.budget),
            hardware=args.hardware,
            batch=args.batch,
            seq=args.prompt or args.seq,
            gen=args.gen,
            optimizer=args.optimizer,
            dtype=args.dtype,
            passes=passes,
            options=options,
            progress=lambda s: status.update(f"planning: {s}"),
            kv_budget=args.kv_budget,
        )
    result.save(args.output)
    for report in result.passes[1:]:
        s = report.solver
        console.print(
            f"{report.name}: {s.solver} {s.status} in {s.time_s:.2f} s; " + "; ".join(report.notes),
            highlight=False,
        )
    fits = ", ".join(
        f"{tier} peak {format_size(result.predictions.peak_bytes.get(tier, 0))} <= {format_size(budget)}"
        for tier, budget in result.budget_bytes.items()
        if result.predictions.peak_bytes.get(tier, 0) or tier == "device"
    )
    console.print(f"[green]fits[/green]: {fits}; wrote {args.output}")
    return 0


def bits_options(args: argparse.Namespace, passes: list[str] | None) -> dict[str, object] | None:
    """The bitwidth pass's options from `--bits-limit` and `--sensitivity` (None when neither is given)."""
    if args.bits_limit is None and args.sensitivity is None:
        return None
    if passes is None or "bitwidth" not in passes:
        raise InvalidInput(
            "--bits-limit and --sensitivity set the bitwidth pass: add it, --passes bitwidth,allocate"
        )
    from memplan.passes.bitwidth import BitwidthOptions

    limit = parse_size(args.bits_limit) if args.bits_limit is not None else None
    return {"bitwidth": BitwidthOptions(size_limit_bytes=limit, estimator=args.sensitivity or "hutchinson")}


def kv_options(args: argparse.Namespace) -> dict[str, object]:
    """The kv_budget pass's options from the --kv-* flags (empty when none is given)."""
    given = {"method": args.kv_method, "sink_tokens": args.kv_sink, "recent_tokens": args.kv_recent}
    changes: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    if args.kv_bits is not None:
        changes["bits"] = tuple(None if b.strip() == "full" else _int(b) for b in args.kv_bits.split(","))
    if args.kv_per_head:
        changes["per_head"] = True
    if not changes:
        return {}
    if args.kv_budget is None:
        raise InvalidInput("the --kv-* flags set the kv_budget pass: give its budget too, --kv-budget 20%")
    from memplan.passes.kv_budget import KVBudgetOptions

    return {"kv_budget": KVBudgetOptions(**changes)}  # type: ignore[arg-type]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"--kv-bits {text!r}: give bit widths (8, 4, 2) or full, with commas") from None


def budgets_of(given: list[str]) -> dict[str, str]:
    """`["6GiB", "host=32GiB"]` as {"device": "6GiB", "host": "32GiB"}; a tier named twice is refused."""
    out: dict[str, str] = {}
    for text in given:
        tier, _, size = text.rpartition("=")
        tier = tier.strip() or "device"
        if tier in out:
            raise InvalidInput(f"--budget given twice for {tier} ({out[tier]} and {size}); give it once")
        out[tier] = size.strip()
    return out
