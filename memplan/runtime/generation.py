"""Run a generation plan: `model.generate` with the weights where the placement pass put them, streamed to
the device ahead of each unit that needs them and dropped after it.

    plan = memplan.plan(model, input_ids, mode="infer", budget="8GiB", gen=32)
    with memplan.applied(plan, model) as run:
        out = model.generate(input_ids, max_new_tokens=32, do_sample=False)
    print(run.measured().describe(plan))

On entry the model is checked against the plan (parameter names, shapes, dtypes), every weight the plan
puts off the device is written to its tier (the SSD tier: one file laid out by the `allocate` pass, see
`weight_file`; host or CXL: that tier's store) and its device storage released. Hooks on the units
follow the plan's schedule: before unit call `s`, the copies whose `prefetch_step` is `s` start on a
background thread into buffers allocated then (the SSD tier reads each run of adjacent weights as one
aligned `O_DIRECT` read), then the copies unit `s` reads are waited for and bound to their parameters;
after it, the copies whose `evict_step` is `s` are dropped. A live-storage tracker counts every device
byte from entry to exit (resident weights, prefetch buffers, KV cache, activations). A call with another
batch or prompt than planned, or more forwards than the plan's `gen`, is refused with `PlanMismatch`. On
exit the model gets its weights back and the tiers are emptied (the weight file deleted).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from memplan.errors import InvalidInput, PlanMismatch
from memplan.ir.graph import Role
from memplan.plans.plan import Plan
from memplan.runtime.calls import patched_method
from memplan.runtime.kv_offload import CompressedKVOffload, KVOffload
from memplan.runtime.tiers.api import Handle, TierStore
from memplan.runtime.tiers.direct_io import ALIGN, round_up
from memplan.runtime.tiers.factory import open_tier
from memplan.runtime.tiers.tensor_bytes import flat_bytes, from_bytes, meta_of
from memplan.runtime.tracker import LiveStorageTracker
from memplan.runtime.weight_file import WeightFile, aligned_buffer

GAP_BYTES = 1 << 20
"""Weights issued together closer than this in the file are read as one range (the gap is read too)."""


@dataclass
class GenerationMeasurement:
    """What a planned generation did: device peak (live-storage tracker), bytes read per tier, I/O time
    hidden behind compute and exposed (the main thread waited), prefill and per-token decode time."""

    batch: int
    prompt: int
    forwards: int = 0
    peak_bytes: int = 0
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)
    bytes_read: dict[str, int] = field(default_factory=dict)
    io_busy_s: dict[str, float] = field(default_factory=dict)
    io_wait_s: float = 0.0
    tier_peak_bytes: dict[str, int] = field(default_factory=dict)
    """Peak bytes each tier other than the device held (the SSD tier: its weight file)."""
    wall_s: float = 0.0
    backends: dict[str, str] = field(default_factory=dict)
    kv_peak_bytes: int | None = None
    """With the plan's KV budgets: the most bytes the compressed caches' storages held (`kv_cache`)."""
    kv: Any = None
    """With KV budgets: the compressed cache's own measurement (`kv_cache.KVMeasurement`)."""

    @property
    def decode_per_token_s(self) -> float:
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.batch / self.decode_per_token_s if self.decode_s else 0.0

    @property
    def io_hidden_s(self) -> float:
        """Transfer time the main thread did not wait through (overlapped with compute)."""
        return max(0.0, sum(self.io_busy_s.values()) - self.io_wait_s)


@dataclass
class _Copy:
    """A device copy under way or bound: its buffer, the tensor view(s) in it, and the read's future."""

    tensor: torch.Tensor | None = None
    future: Future[None] | None = None
    handle: Handle | None = None
    store: TierStore | None = None


@dataclass
class _Holder:
    """Where one weight lives in the model: the tensors that hold it (its parameter's data, or a quantized
    module's codes, scales and zero points) and how to put others in their place (empty ones release it)."""

    get: Callable[[], list[torch.Tensor]]
    put: Callable[[list[torch.Tensor]], None]


def _param_holder(p: torch.nn.Parameter) -> _Holder:
    def put(parts: list[torch.Tensor]) -> None:
        p.data = parts[0]

    return _Holder(lambda: [p.data], put)


def _blob(parts: list[torch.Tensor]) -> torch.Tensor:
    """The bytes of `parts`, one after another, as a uint8 tensor (what a tier stores): a view of a single
    contiguous part (the tiers copy what they store), else a new tensor."""
    flat = [flat_bytes(t) for t in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def _split(data: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of uint8 `data` shaped as `like`, laid out as `_blob` wrote them."""
    out, at = [], 0
    for t in like:
        meta = meta_of("", t)
        out.append(from_bytes(data[at : at + meta.nbytes], meta))
        at += meta.nbytes
    return out


def _empties(like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty(0, dtype=t.dtype) for t in like]


class GenerationRun:
    """The state of one `applied` block; see the module docstring."""

    def __init__(self, plan: Plan, model: torch.nn.Module, ssd_dir: str | None) -> None:
        self.plan = plan
        self.model = model
        self.graph = plan.graph()
        if not self.graph.ops or not all(op.target.startswith("unit:") for op in self.graph.ops):
            raise PlanMismatch(
                "this plan's graph is not a generation's (one op per unit call): plan the generation with "
                "gen=N (memplan plan ... --gen N)"
            )
        placement = plan.decisions.placement
        placed = {p.value_id: p for p in placement.tensors} if placement else {}
        kv: dict[int, tuple[int, str]] = {}
        for vid, p in placed.items():
            v = self.graph.value(vid)
            if v.role == Role.KV_CACHE and v.layer is not None:
                kv[vid] = (v.layer, p.tier)
            elif v.role != Role.PARAMETER:
                raise InvalidInput(f"the plan puts {v.name} ({v.role}) on the {p.tier} tier; this runtime "
                                   "moves weights and KV caches only")  # fmt: skip
        self.placed = {v: p for v, p in placed.items() if v not in kv}
        w = plan.workload
        budgeted = plan.decisions.kv is not None and bool(plan.decisions.kv.budgets)
        offload = CompressedKVOffload if budgeted else KVOffload
        self.kv = offload(kv, (w.seq or 0) + w.gen - 1) if kv else None
        self.params = _params_by_value(plan, model)
        self.holders = {v: _param_holder(p) for v, p in self.params.items()}
        on = {p.device.type for p in self.params.values()}
        if on != {"cpu"}:
            raise InvalidInput(
                f"the model's weights are on {', '.join(sorted(on))}: this runtime streams weights into CPU "
                "memory (the cpu preset's device tier); streaming onto a CUDA device is not built yet"
            )
        self.units = [op.module_path for op in self.graph.ops]
        self.per_forward = sum(1 for op in self.graph.ops if op.name.startswith("prefill:"))
        self.step = 0
        self.issue: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.drop: dict[int, list[int]] = defaultdict(list)
        for vid, p in placed.items():
            for c in p.copies:
                self.issue[c.prefetch_step].append((vid, c.evict_step))
                self.drop[c.evict_step].append(vid)
        self.live: dict[int, _Copy] = {}
        self.originals: dict[int, list[torch.Tensor]] = {}
        self.file: WeightFile | None = None
        self.stores: dict[str, TierStore] = {}
        self.handles: dict[int, Handle] = {}
        self.tracker = LiveStorageTracker(record_timeline=False)
        self.measured = GenerationMeasurement(plan.workload.batch, plan.workload.seq or 0)
        self._ssd_dir = ssd_dir
        self._forward_t0 = 0.0
        self._hooks: list[Any] = []
        self.kv_run: Any = None
        """The compressed KV cache's run when the plan has KV budgets (`kv_cache.applied_kv`)."""

    # -- set-up and tear-down -------------------------------------------------------------------------
    def hold_quantized(self, modules: dict[int, Any]) -> None:
        """Weights the plan stores quantized are held by these modules (value id -> a module with `parts`
        and `hold`, `memplan.runtime.quantized`): those are what is placed and streamed."""
        for v, m in modules.items():
            self.holders[v] = _Holder(m.parts, m.hold)

    def place(self) -> None:
        """Write every off-device weight to its tier and release its device storage."""
        by_tier: dict[str, list[int]] = defaultdict(list)
        for vid, p in self.placed.items():
            by_tier[p.tier].append(vid)
        hw = self.plan.hardware
        if by_tier.get("ssd"):
            offsets = self.plan.offsets.get("ssd", {})
            missing = [v for v in by_tier["ssd"] if v not in offsets]
            if missing:
                raise InvalidInput("the plan has no SSD offsets: run the allocate pass after placement")
            tensors = {v: (self.graph.value(v).name, _blob(self.holders[v].get())) for v in by_tier["ssd"]}
            size = round_up(max(offsets[v] + self.graph.value(v).size_bytes for v in by_tier["ssd"]))
            self.file = WeightFile.create(self._ssd_dir or hw.tier("ssd").path, tensors, offsets, size)
            self.measured.backends["ssd"] = self.file.description
        for tier, vids in by_tier.items():
            if tier == "ssd":
                continue
            store = self.stores.setdefault(tier, open_tier(hw, tier, emulate=frozenset(hw.emulated)))
            for v in vids:
                self.handles[v] = store.put(self.graph.value(v).name, _blob(self.holders[v].get()))
            store.flush()
            self.measured.backends[tier] = store.stats().backend
        for v in self.placed:
            self.originals[v] = self.holders[v].get()
            self.holders[v].put(_empties(self.originals[v]))

    def restore(self) -> None:
        """Give the model its weights back and empty the tiers."""
        for v, original in self.originals.items():
            self.holders[v].put(original)
        self.originals.clear()
        self.live.clear()
        if self.kv is not None:
            self.kv.close()
        for store in self.stores.values():
            store.close()
        if self.file is not None:
            self.file.close()

    def hook(self) -> None:
        modules = dict(self.model.named_modules())
        for path in dict.fromkeys(self.units):
            if path not in modules:
                raise PlanMismatch(f"the plan streams unit {path!r}, which this model does not have")
            self._hooks.append(modules[path].register_forward_pre_hook(self._before(path)))
            self._hooks.append(modules[path].register_forward_hook(self._after(path)))
        self._hooks.append(self.model.register_forward_pre_hook(self._check_call, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._forward_done))

    def unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- the schedule ---------------------------------------------------------------------------------
    def _check_call(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.kv is not None:
            self.kv.set_cache(kwargs.get("past_key_values"))
        f = self.step // self.per_forward if self.per_forward else 0
        w = self.plan.workload
        if self.step >= len(self.units):
            raise PlanMismatch(
                f"the plan is for {w.gen} new tokens ({len(self.units) // self.per_forward} forwards); this "
                "generation runs more: plan with the max_new_tokens you generate"
            )
        want = (w.batch, w.seq) if f == 0 else (w.batch, 1)
        if isinstance(ids, torch.Tensor) and tuple(ids.shape) != want:
            raise PlanMismatch(
                f"forward {f} of the generation gets input_ids of shape {tuple(ids.shape)}; the plan is for "
                f"batch {w.batch}, prompt {w.seq} ({want}): plan this shape"
            )
        self._forward_t0 = time.perf_counter()

    def _forward_done(self, *_: Any) -> None:
        took = time.perf_counter() - self._forward_t0
        if self.measured.forwards == 0:
            self.measured.prefill_s = took
        else:
            self.measured.decode_s.append(took)
        self.measured.forwards += 1

    def _before(self, path: str) -> Any:
        def hook(*_: Any) -> None:
            s = self.step
            if s >= len(self.units) or self.units[s] != path:
                want = self.units[s] if s < len(self.units) else "nothing (the plan has ended)"
                raise PlanMismatch(f"unit call {s} is {path!r}; the plan expects {want}")
            self._start(s)
            for vid in self.graph.ops[s].inputs:
                if vid in self.placed:
                    self._bind(vid)
                elif self.kv is not None and vid in self.kv.placed:
                    self.kv.bind(vid)

        return hook

    def _after(self, path: str) -> Any:
        def hook(*_: Any) -> None:
            s = self.step
            if self.kv is not None:
                op = self.graph.ops[s]
                for vid in (*op.inputs, *op.outputs):
                    if vid in self.kv.placed:
                        self.kv.store(vid)
            for vid in self.drop.get(s, ()):
                if vid in self.placed:
                    self.holders[vid].put(_empties(self.originals[vid]))
                    self.live.pop(vid, None)
            self.step += 1

        return hook

    def _start(self, step: int) -> None:
        """Start the copies issued at `step`: SSD runs as one read each, other tiers through their store."""
        issued = [vid for vid, _ in self.issue.get(step, ()) if vid in self.placed]
        if self.kv is not None:
            for vid, _ in self.issue.get(step, ()):
                if vid in self.kv.placed:
                    self.kv.issue(vid)
        by_evict: dict[int, list[int]] = defaultdict(list)
        """One read buffer per run of weights dropped at the same step: a buffer lives until its last view
        goes, so weights dropped at different steps must not share one."""
        for v, evict in self.issue.get(step, ()):
            if v in self.placed and self.placed[v].tier == "ssd":
                by_evict[evict].append(v)
        for v in issued:
            if self.placed[v].tier != "ssd":
                store = self.stores[self.placed[v].tier]
                size = sum(t.numel() * t.element_size() for t in self.originals[v])
                out = torch.empty(size, dtype=torch.uint8)
                store.prefetch(self.handles[v], out=out)
                self.live[v] = _Copy(out, None, self.handles[v], store)
        for run in [r for vids in by_evict.values() for r in _runs(self.file, vids)] if self.file else ():
            start = run[0][1] - run[0][1] % ALIGN
            end = round_up(max(off + self.file.stored[v].nbytes for v, off in run))
            _, buf = aligned_buffer(end - start)
            future = self.file.read_into(start, buf, [v for v, _ in run])
            for v, off in run:
                n = self.file.stored[v].nbytes
                self.live[v] = _Copy(buf[off - start : off - start + n], future)

    def _bind(self, vid: int) -> None:
        copy = self.live.get(vid)
        if copy is None:
            raise PlanMismatch(
                f"{self.graph.value(vid).name} is read at unit call {self.step} with no copy planned"
            )
        t0 = time.perf_counter()
        if copy.future is not None:
            copy.future.result()
        elif copy.store is not None and copy.handle is not None:
            copy.tensor = copy.store.get(copy.handle)
            copy.store = None
        self.measured.io_wait_s += time.perf_counter() - t0
        assert copy.tensor is not None
        self.holders[vid].put(_split(copy.tensor, self.originals[vid]))

    def finish(self) -> GenerationMeasurement:
        m = self.measured
        if self.kv_run is not None:
            m.kv = self.kv_run.finish()
            m.kv_peak_bytes = m.kv.peak_kv_bytes
        m.peak_bytes = self.tracker.result.peak_bytes
        m.wall_s = self.tracker.result.wall_s
        if self.file is not None:
            m.bytes_read["ssd"] = self.file.stats.bytes_read
            m.io_busy_s["ssd"] = self.file.stats.busy_s
            m.tier_peak_bytes["ssd"] = sum(s.nbytes for s in self.file.stored.values())
        if self.kv is not None:
            kv = self.kv.stats
            for tier, n in kv.tier_bytes.items():
                m.bytes_read[tier] = m.bytes_read.get(tier, 0) + kv.bytes_read
                m.io_busy_s[tier] = m.io_busy_s.get(tier, 0.0) + kv.busy_s
                m.tier_peak_bytes[tier] = m.tier_peak_bytes.get(tier, 0) + n
            m.io_wait_s += kv.wait_s
        for tier, store in self.stores.items():
            st = store.stats()
            m.bytes_read[tier] = m.bytes_read.get(tier, 0) + st.bytes_read
            m.io_busy_s[tier] = m.io_busy_s.get(tier, 0.0) + st.busy_s
            m.tier_peak_bytes[tier] = m.tier_peak_bytes.get(tier, 0) + st.peak_bytes
        return m


def _runs(file: WeightFile, vids: list[int]) -> list[list[tuple[int, int]]]:
    """Weights issued together, by file offset, grouped into runs read as one range."""
    placed = sorted((file.stored[v].offset, v) for v in vids)
    runs: list[list[tuple[int, int]]] = []
    end = -1
    for off, v in placed:
        if runs and off - end <= GAP_BYTES:
            runs[-1].append((v, off))
        else:
            runs.append([(v, off)])
        end = max(end, off + file.stored[v].nbytes)
    return runs


def _params_by_value(plan: Plan, model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    """The model's parameter for every parameter value of the plan; `PlanMismatch` listing what differs."""
    have = dict(model.named_parameters())
    want = {v.name: v for v in plan.tensors if v.role == Role.PARAMETER and v.alias_of is None}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = [
        f"{n}: plan {want[n].shape} {want[n].dtype}, model {tuple(have[n].shape)} {_dtype_name(have[n])}"
        for n in sorted(set(want) & set(have))
        if tuple(have[n].shape) != want[n].shape or _dtype_name(have[n]) != want[n].dtype
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the model: {', '.join(missing[:5])}")
        if extra:
            parts.append(f"not in the plan: {', '.join(extra[:5])}")
        if shapes:
            parts.append("different: " + "; ".join(shapes[:5]))
        raise PlanMismatch(f"the plan was made for another model ({plan.model.name}): " + "; ".join(parts))
    return {v.id: have[v.name] for v in want.values()}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@contextmanager
def applied_generation(
    plan: Plan, model: torch.nn.Module, ssd_dir: str | None = None
) -> Iterator[GenerationRun]:
    """Run `model.generate` (or any loop of forwards with a KV cache) under `plan`; see the module
    docstring. Yields the run, whose `finish()` (after the block) gives the measurement."""
    if plan.workload.gen < 1:
        raise InvalidInput("this plan is not for a generation (gen 0): plan with gen=N")
    from memplan.runtime.quantized import model_state, swap_modules

    run = GenerationRun(plan, model, ssd_dir)
    was_training = model.training
    model.eval()
    stack = ExitStack()
    undo: list[tuple[Any, ...]] = []
    try:
        bits = plan.decisions.bits
        if bits is not None and bits.tensors:
            quantized, undo = swap_modules(plan, model, None, frozenset(run.placed))
            run.hold_quantized(quantized.by_value)
        with torch.no_grad():
            run.place()
        run.hook()
        stack.enter_context(_checked_generate(model, plan.workload.gen))
        kv = plan.decisions.kv
        if kv is not None and kv.budgets:
            from memplan.runtime.kv_cache import applied_kv

            run.kv_run = stack.enter_context(applied_kv(kv, model))
            if isinstance(run.kv, CompressedKVOffload):
                run.kv.tracker = run.kv_run.tracker
        with run.tracker:
            run.tracker.track(model_state(model))
            yield run
    finally:
        stack.close()
        run.unhook()
        run.restore()
        for parent, attr, module in reversed(undo):
            setattr(parent, attr, module)
        model.train(was_training)


@contextmanager
def _checked_generate(model: torch.nn.Module, gen: int) -> Iterator[None]:
    """`model.generate` refuses a `max_new_tokens` other than the plan's `gen` while the plan is applied."""
    original = getattr(model, "generate", None)
    if original is None:
        yield
        return

    def generate(*args: Any, **kwargs: Any) -> Any:
        asked = kwargs.get("max_new_tokens")
        if asked is not None and asked != gen:
            raise PlanMismatch(
                f"the plan is for gen={gen} new tokens; generate asks for max_new_tokens={asked}: plan with "
                f"gen={asked}"
            )
        return original(*args, **kwargs)

    with patched_method(model, "generate", generate):
        yield
