"""tiny-lm: a small byte-level GPT that memplan trains itself, offline, in minutes on a CPU.

Why: quantization and KV-budget passes must be checked on a model whose weights mean something (a
randomly initialised model has no accuracy to lose), and no weights can be downloaded. So memplan
trains its own, deterministically, on text every Python installation carries: the standard library's
own sources.

- Model: Hugging Face `GPT2LMHeadModel` (so every capture path of the zoo applies unchanged), vocab
  256 (one token per byte), 4 layers, width 256, 4 heads, context 256, tied embeddings, no dropout.
- Data: `*.py` under `sysconfig.get_paths()["stdlib"]`, sorted by path, leaving out test suites and
  site-packages; every 10th file (in that order) is held out for validation. Files are joined by a
  blank line into one byte stream per split.
- Training: AdamW, linear warm-up then cosine decay, batches of random windows drawn by a seeded
  generator, `torch.use_deterministic_algorithms(True)`: the same seed, steps and thread count give
  bitwise-equal weights.
- Cache: `$MEMPLAN_CACHE/tiny-lm/` (or `~/.cache/memplan/tiny-lm/`) holds `model.safetensors` and
  `meta.json` (config, data, steps, losses, seed, versions), each written to a temporary file and
  moved into place with `os.replace`, metadata last, so a reader never sees half a cache.

Train with `python examples/train_tiny_lm.py`; results are in `docs/tiny-lm.md`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_model, save_model
from transformers import GPT2Config, GPT2LMHeadModel

from memplan.errors import MemplanError
from memplan.files import atomic_write, atomic_write_text

TRAIN_COMMAND = "python examples/train_tiny_lm.py"
"""The command that trains and caches tiny-lm (quoted in errors)."""

DEFAULT_STEPS = 400
"""Optimizer steps of the reference run (1.6M training bytes; minutes on 2 CPU cores, see docs/tiny-lm.md)."""

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
META_FORMAT = 1
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_VAL_EVERY = 10
"""Every 10th source file goes to the validation split."""


class ModelNotCached(MemplanError):
    """tiny-lm's trained weights are not in the cache (or belong to another configuration)."""


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Hyper-parameters of a training run other than its number of steps."""

    batch: int = 16
    """Windows per step; a step sees `batch * context` bytes."""
    lr: float = 2e-3
    """Peak learning rate, reached after `warmup` steps, then cosine-decayed to `lr * min_lr_ratio`."""
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    """Seeds the weight init and the order of training windows."""
    eval_windows: int = 32
    """Fixed windows (evenly spaced in each split) on which train and validation loss are measured."""
    eval_every: int = 100
    """Steps between validation measurements kept in the report's history."""


@dataclass(frozen=True, slots=True)
class Corpus:
    """The byte streams of both splits and what they were made from."""

    train: torch.Tensor
    """uint8, [train_bytes]."""
    val: torch.Tensor
    """uint8, [val_bytes]."""
    root: str
    train_files: int
    val_files: int
    sha256: str
    """Hash of the train stream followed by the validation stream."""

    def describe(self) -> dict[str, object]:
        return {
            "source": "Python standard library *.py sources, sorted by path, without test suites",
            "root": self.root, "python": platform.python_version(),
            "train_files": self.train_files, "val_files": self.val_files,
            "train_bytes": int(self.train.numel()), "val_bytes": int(self.val.numel()),
            "split": f"every {_VAL_EVERY}th file is validation", "sha256": self.sha256,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class TrainReport:
    """What a training run did and reached. Losses are in nats per byte; bits per byte = nats / ln 2."""

    steps: int
    seconds: float
    """Wall-clock time of training and evaluation (not of reading the corpus or writing the cache)."""
    cpu_seconds: float
    """CPU time of this process over the same span, summed over threads (less sensitive to other load)."""
    threads: int
    train_loss: float
    """Mean loss on the fixed training windows after the last step."""
    val_loss: float
    """Mean loss on the fixed validation windows after the last step."""
    val_bits_per_byte: float
    unigram_bits_per_byte: float
    """Baseline: validation bytes coded with the training split's byte frequencies."""
    tokens_seen: int
    settings: TrainSettings
    history: tuple[tuple[int, float], ...] = field(default=())
    """(step, validation loss) every `settings.eval_every` steps."""
    out_dir: str | None = None


def tiny_lm_config() -> GPT2Config:
    """tiny-lm's architecture: byte vocabulary, 4 layers x 256 wide, 4 heads, 256 positions."""
    return GPT2Config(
        vocab_size=256, n_positions=256, n_embd=256, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        attn_implementation="eager", bos_token_id=10, eos_token_id=10,
    )  # fmt: skip


def cache_dir() -> Path:
    """The cache: `$MEMPLAN_CACHE/tiny-lm` if that variable is set, else `~/.cache/memplan/tiny-lm`."""
    root = os.environ.get("MEMPLAN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "memplan") / "tiny-lm"


# ---------------------------------------------------------------------------------------------------
# Data


def source_files(root: Path | None = None) -> list[Path]:
    """The standard library's `*.py` files, sorted by path, without test suites and site-packages."""
    base = root if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in base.rglob("*.py") if p.is_file())
    return sorted(p for p in files if not _SKIPPED_DIRS.intersection(p.relative_to(base).parts))


def load_corpus(root: Path | None = None) -> Corpus:
    """Read the sources into a train and a validation byte stream (every 10th file is validation)."""
    base = root if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = source_files(base)
    if len(files) < _VAL_EVERY:
        raise MemplanError(f"found {len(files)} Python sources under {base}; tiny-lm needs {_VAL_EVERY}+")
    train_files = [f for i, f in enumerate(files) if i % _VAL_EVERY != _VAL_EVERY - 1]
    val_files = [f for i, f in enumerate(files) if i % _VAL_EVERY == _VAL_EVERY - 1]
    train = b"\n\n".join(f.read_bytes() for f in train_files)
    val = b"\n\n".join(f.read_bytes() for f in val_files)
    return Corpus(
        train=torch.frombuffer(bytearray(train), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val), dtype=torch.uint8),
        root=str(base), train_files=len(train_files), val_files=len(val_files),
        sha256=hashlib.sha256(train + val).hexdigest(),
    )  # fmt: skip


def unigram_bits_per_byte(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy (bits per byte) of `val` under the add-one-smoothed byte frequencies of `train`."""
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0
    log2_p = torch.log2(counts / counts.sum())  # [256]
    return float(-log2_p[val.long()].mean())


def _windows(stream: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    """Token windows `stream[s : s + context]` for each start: [len(starts), context] int64."""
    offsets = starts[:, None] + torch.arange(context)[None, :]  # [n, context]
    return stream[offsets].long()


def _eval_starts(stream: torch.Tensor, n: int, context: int) -> torch.Tensor:
    """`n` evenly spaced window starts covering the stream: the fixed evaluation set."""
    return torch.linspace(0, stream.numel() - context - 1, n).long()


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, stream: torch.Tensor, windows: int, context: int) -> float:
    """Mean next-byte loss (nats) of `model` on `windows` fixed windows of `stream`."""
    was_training = model.training
    model.eval()
    starts = _eval_starts(stream, windows, context)
    losses = [
        float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        for ids in _windows(stream, starts, context).split(16)
    ]
    model.train(was_training)
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------------
# Training


def _lr_at(step: int, steps: int, s: TrainSettings) -> float:
    """Linear warm-up to `s.lr`, then cosine decay to `s.lr * s.min_lr_ratio` at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Turn on deterministic algorithms for the block, restoring the caller's setting afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int, str], None]]:
    """A rich progress bar (or nothing); yields `update(steps_done, status_text)`."""
    if not enabled:
        yield lambda done, text: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("tiny-lm"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, TextColumn("{task.description}")) as bar:
        task = bar.add_task("", total=total)
        yield lambda done, text: bar.update(task, completed=done, description=text)


def _new_model(seed: int) -> GPT2LMHeadModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(tiny_lm_config())


def _optimizer(model: GPT2LMHeadModel, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def _train_loop(
    model: GPT2LMHeadModel, corpus: Corpus, steps: int, s: TrainSettings, update: Callable[[int, str], None]
) -> list[tuple[int, float]]:
    """Run `steps` optimizer steps in place; returns the validation history."""
    context = model.config.n_positions
    opt = _optimizer(model, s)
    gen = torch.Generator().manual_seed(s.seed)
    history: list[tuple[int, float]] = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, s)
        starts = torch.randint(0, corpus.train.numel() - context - 1, (s.batch,), generator=gen)
        ids = _windows(corpus.train, starts, context)  # [batch, context]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if (step + 1) % s.eval_every == 0:
            history.append((step + 1, evaluate(model, corpus.val, s.eval_windows, context)))
        val_text = f" val {history[-1][1]:.3f}" if history else ""
        update(step + 1, f"loss {loss.item():.3f}{val_text}")
    model.eval()
    return history


def train_tiny_lm(
    steps: int = DEFAULT_STEPS,
    out_dir: Path | str | None = None,
    progress: bool = True,
    settings: TrainSettings = TrainSettings(),
    corpus: Corpus | None = None,
) -> TrainReport:
    """Train tiny-lm from scratch and cache it in `out_dir` (default `cache_dir()`).

    Deterministic: the same `steps`, `settings` and thread count give bitwise-equal weights. The
    caller's RNG state and deterministic-algorithms setting are left unchanged.
    """
    if steps < 1:
        raise MemplanError(f"steps must be at least 1, got {steps}")
    corpus = corpus if corpus is not None else load_corpus()
    target = Path(out_dir) if out_dir is not None else cache_dir()
    start, cpu_start = time.perf_counter(), time.process_time()
    with _deterministic(), _progress(steps, progress) as update:
        model = _new_model(settings.seed)
        history = _train_loop(model, corpus, steps, settings, update)
        context = model.config.n_positions
        train_loss = evaluate(model, corpus.train, settings.eval_windows, context)
        val_loss = evaluate(model, corpus.val, settings.eval_windows, context)
    report = TrainReport(
        steps=steps, seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
        threads=torch.get_num_threads(),
        train_loss=train_loss, val_loss=val_loss, val_bits_per_byte=val_loss / math.log(2),
        unigram_bits_per_byte=unigram_bits_per_byte(corpus.train, corpus.val),
        tokens_seen=steps * settings.batch * context, settings=settings, history=tuple(history),
        out_dir=str(target),
    )  # fmt: skip
    save_tiny_lm(model, report, corpus, target)
    return report


# ---------------------------------------------------------------------------------------------------
# Cache


def save_tiny_lm(model: GPT2LMHeadModel, report: TrainReport, corpus: Corpus, out_dir: Path) -> None:
    """Cache weights and metadata in `out_dir`; the metadata goes last, as the cache's commit mark."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # invalidate before the weights change
    atomic_write(out_dir / WEIGHTS_FILE, lambda p: save_model(model, str(p)))
    meta = {
        "format": META_FORMAT, "model": "tiny-lm", "config": model.config.to_dict(),
        "data": corpus.describe(), "report": asdict(report), "seed": report.settings.seed,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
    }  # fmt: skip
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    atomic_write_text(out_dir / META_FILE, text)


def read_meta(out_dir: Path | None = None) -> dict[str, object]:
    """The cached metadata; `ModelNotCached` (with the command to run) if there is no usable cache."""
    directory = out_dir if out_dir is not None else cache_dir()
    meta_path, weights = directory / META_FILE, directory / WEIGHTS_FILE
    if not (meta_path.is_file() and weights.is_file()):
        raise ModelNotCached(f"tiny-lm is not trained yet (no cache in {directory}); run `{TRAIN_COMMAND}`")
    meta: dict[str, object] = json.loads(meta_path.read_text(encoding="utf-8"))
    if not _is_current(meta):
        raise ModelNotCached(f"{directory} holds a tiny-lm from another version; run `{TRAIN_COMMAND}`")
    return meta


def _is_current(meta: dict[str, object]) -> bool:
    """Whether cached metadata has this format and this architecture."""
    cached, expected = meta.get("config"), tiny_lm_config().to_dict()
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    return (
        meta.get("format") == META_FORMAT
        and isinstance(cached, dict)
        and all(cached.get(k) == expected[k] for k in keys)
    )


def is_cached(out_dir: Path | None = None) -> bool:
    """Whether a usable tiny-lm cache exists."""
    try:
        read_meta(out_dir)
    except ModelNotCached:
        return False
    return True


def load_tiny_lm(
    device: str | torch.device = "cpu", out_dir: Path | None = None, dtype: torch.dtype = torch.float32
) -> GPT2LMHeadModel:
    """The trained tiny-lm from the cache, in eval mode; `ModelNotCached` says how to train it."""
    directory = out_dir if out_dir is not None else cache_dir()
    read_meta(directory)
    model = GPT2LMHeadModel(tiny_lm_config())
    load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    return model.to(device=device, dtype=dtype).eval()
