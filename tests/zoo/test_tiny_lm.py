"""Tests of tiny-lm: data, determinism of short runs, and the cache (never the full training)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from memplan.errors import MemplanError
from memplan.zoo import catalog as zoo
from memplan.zoo import tiny_lm
from memplan.zoo.tiny_lm import ModelNotCached, TrainReport, TrainSettings

# Small and fast: 5 steps of 4 windows, evaluated on 4 windows.
QUICK = TrainSettings(batch=4, warmup=2, eval_windows=4, eval_every=2)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Train on one thread: these matmuls are tiny, and two threads on a busy machine stall on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> tiny_lm.Corpus:
    return tiny_lm.load_corpus()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: tiny_lm.Corpus) -> tuple[Path, TrainReport]:
    out = tmp_path_factory.mktemp("cache") / "tiny-lm"
    return out, tiny_lm.train_tiny_lm(steps=5, out_dir=out, progress=False, settings=QUICK, corpus=corpus)


def test_corpus_is_the_sorted_stdlib_without_tests(corpus: tiny_lm.Corpus) -> None:
    files = tiny_lm.source_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    assert corpus.train_files + corpus.val_files == len(files)
    assert corpus.val_files == len(files) // 10
    assert corpus.train.numel() > 1_000_000 and corpus.val.numel() > 100_000


def test_unigram_baseline() -> None:
    uniform = torch.arange(256, dtype=torch.uint8).repeat(4)
    anything = torch.tensor([0, 7, 200], dtype=torch.uint8)
    assert tiny_lm.unigram_bits_per_byte(uniform, anything) == pytest.approx(8.0)
    skewed = torch.zeros(1000, dtype=torch.uint8)  # only byte 0: p(0) = 1001 / 1256
    assert tiny_lm.unigram_bits_per_byte(skewed, skewed[:3]) == pytest.approx(-math.log2(1001 / 1256))


def test_learning_rate_schedule() -> None:
    s = TrainSettings(lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert tiny_lm._lr_at(0, 100, s) == pytest.approx(1e-4)
    assert tiny_lm._lr_at(9, 100, s) == pytest.approx(1e-3)
    assert tiny_lm._lr_at(10, 100, s) == pytest.approx(1e-3)
    assert tiny_lm._lr_at(100, 100, s) == pytest.approx(1e-4)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def test_short_runs_are_bitwise_deterministic(
    tmp_path: Path, corpus: tiny_lm.Corpus, trained: tuple[Path, TrainReport]
) -> None:
    first_dir, first = trained
    second = tiny_lm.train_tiny_lm(steps=5, out_dir=tmp_path, progress=False, settings=QUICK, corpus=corpus)
    assert (second.train_loss, second.val_loss) == (first.train_loss, first.val_loss)
    assert second.history == first.history
    a = _state(tiny_lm.load_tiny_lm(out_dir=first_dir))
    b = _state(tiny_lm.load_tiny_lm(out_dir=tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored


def test_another_seed_gives_other_weights(
    tmp_path: Path, corpus: tiny_lm.Corpus, trained: tuple[Path, TrainReport]
) -> None:
    other = TrainSettings(batch=QUICK.batch, warmup=QUICK.warmup, eval_windows=QUICK.eval_windows, seed=1)
    tiny_lm.train_tiny_lm(steps=1, out_dir=tmp_path, progress=False, settings=other, corpus=corpus)
    a, b = _state(tiny_lm.load_tiny_lm(out_dir=trained[0])), _state(tiny_lm.load_tiny_lm(out_dir=tmp_path))
    assert not torch.equal(a["transformer.h.0.attn.c_attn.weight"], b["transformer.h.0.attn.c_attn.weight"])


def test_a_few_steps_already_learn(trained: tuple[Path, TrainReport]) -> None:
    _, report = trained
    assert report.val_loss < math.log(256) - 0.5  # below the loss of a uniform guess
    assert report.val_bits_per_byte == pytest.approx(report.val_loss / math.log(2))
    assert report.tokens_seen == 5 * QUICK.batch * 256
    assert [step for step, _ in report.history] == [2, 4]


def test_cache_round_trip(corpus: tiny_lm.Corpus, trained: tuple[Path, TrainReport]) -> None:
    out, report = trained
    assert sorted(p.name for p in out.iterdir()) == [tiny_lm.META_FILE, tiny_lm.WEIGHTS_FILE]  # no temp left
    model = tiny_lm.load_tiny_lm(out_dir=out)
    assert not model.training
    assert tiny_lm.evaluate(model, corpus.val, QUICK.eval_windows, 256) == report.val_loss
    meta = json.loads((out / tiny_lm.META_FILE).read_text())
    assert meta["report"]["steps"] == 5 and meta["report"]["val_loss"] == report.val_loss
    assert meta["seed"] == QUICK.seed and meta["torch_version"] == torch.__version__
    assert meta["data"]["sha256"] == corpus.sha256 and meta["config"]["n_layer"] == 4


def test_missing_cache_names_the_command(tmp_path: Path) -> None:
    assert not tiny_lm.is_cached(tmp_path)
    with pytest.raises(ModelNotCached, match="python examples/train_tiny_lm.py"):
        tiny_lm.load_tiny_lm(out_dir=tmp_path)


def test_stale_cache_is_refused(tmp_path: Path, trained: tuple[Path, TrainReport]) -> None:
    for name in (tiny_lm.META_FILE, tiny_lm.WEIGHTS_FILE):
        (tmp_path / name).write_bytes((trained[0] / name).read_bytes())
    meta = json.loads((tmp_path / tiny_lm.META_FILE).read_text())
    meta["config"]["n_layer"] = 6
    (tmp_path / tiny_lm.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelNotCached, match="from another version"):
        tiny_lm.load_tiny_lm(out_dir=tmp_path)


def test_cache_dir_follows_memplan_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path))
    assert tiny_lm.cache_dir() == tmp_path / "tiny-lm"
    monkeypatch.delenv("MEMPLAN_CACHE")
    assert tiny_lm.cache_dir() == Path.home() / ".cache" / "memplan" / "tiny-lm"


def test_zoo_build_uses_the_cache_when_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, trained: tuple[Path, TrainReport]
) -> None:
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path))
    entry = zoo.get("tiny-lm")
    random_init = _state(entry.build())
    cached = _state(tiny_lm.load_tiny_lm(out_dir=trained[0]))
    assert not torch.equal(random_init["transformer.wte.weight"], cached["transformer.wte.weight"])

    monkeypatch.setenv("MEMPLAN_CACHE", str(trained[0].parent))
    loaded = _state(entry.build(dtype=torch.bfloat16))
    assert all(torch.equal(loaded[k], cached[k].to(torch.bfloat16)) for k in cached)
    assert all(p.device.type == "meta" for p in entry.build("meta").parameters())


def test_steps_must_be_positive(corpus: tiny_lm.Corpus) -> None:
    with pytest.raises(MemplanError, match="at least 1"):
        tiny_lm.train_tiny_lm(steps=0, progress=False, corpus=corpus)
