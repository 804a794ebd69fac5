"""Execute an exported inference graph inside one preallocated arena per tier, at the plan's offsets.

The `allocate` pass gives every storage a byte offset in its tier's arena; this module shows that the
offsets are real. `run_in_arena` allocates one `torch.empty(arena_bytes, dtype=torch.uint8)` per tier,
gives every storage with an offset a view of its slot (`arena[off:off + size].view(dtype).as_strided(...)`
with the shape, strides and storage offset of the capture's fake tensor), and walks the plan's schedule op
by op, in the style of `memplan.runtime.executor`:

- an op whose outputs all alias an input (views, `split_with_sizes`, `alias`) runs as is on the arena
  tensors: its results are views of the arena;
- an op with an `out=` overload writes straight into its slots. The overload is found by schema: the
  same arguments minus the tensor options the out tensor already fixes (`dtype`, `device`...), and one
  mutable out argument per return (`native_layer_norm.out(..., out0, out1, out2)`). `clone`, `_to_copy`
  and `embedding`, whose out overloads are PyTorch's generated compute-then-copy wrappers, are written
  directly instead (`copy_` into the slot; `index_select(..., out=slot)`);
- any other op runs normally, its result is `copy_`-ed into its slot and the temporary dropped at once.
  For the zoo's language models no op needs this; `in_place=False` forces it for every op (an ablation).
  Zero-byte outputs have no offset and are kept as computed.

State and inputs: the plan gives parameters, buffers and inputs offsets too (they are live over the whole
schedule), so they are copied into the arena once before the first op. The whole working set then lives
in the arena; the module's own parameters are only the source of that copy and are not counted.

Limits: inference only, and each storage in one tier (moving storages is `memplan.runtime.executor`'s
job), except the schedule pass's replacement: a storage with `evict` / `swap_in` events has its device slot
(its values live there) and a slot on the next tier; an eviction copies the device slot there, a reload
copies it back, and an input or weight the schedule loads is bound into its next-tier slot.

Generated out overloads that remain (`native_layer_norm.out`, `scalar_tensor.out`) compute into an
internal temporary that the live-storage tracker cannot see, like any kernel's workspace; `ArenaRun`
counts them. With `debug=True` every write is first checked against the plan's residency (no other live
storage may share a byte of the slot) and every read against the reader's residency: `InternalError`.
"""

from __future__ import annotations

import gc
import operator
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._ops import OpOverload
from torch.utils._pytree import tree_leaves

from memplan.errors import InternalError, InvalidInput, PlanMismatch, internal_assert
from memplan.ir.analysis import Interval
from memplan.ir.frontends.fx_lower import Capture
from memplan.plans.plan import Plan, fingerprint
from memplan.plans.verify import verify_plan
from memplan.runtime.measure import bind_placeholders
from memplan.runtime.out_variants import (
    DIRECT_WRITERS,
    bind_arguments,
    options_fit,
    out_call_kwargs,
    out_variant,
)
from memplan.runtime.tracker import LiveStorageTracker


@dataclass(frozen=True, slots=True)
class ArenaRun:
    """What one arena run did. `wall_s` is the op loop alone; `setup_s` allocates the arenas and copies
    state and inputs in."""

    outputs: tuple[torch.Tensor, ...]
    """The graph's outputs, flattened, copied out of the arena."""
    arena_bytes: dict[str, int]
    ops_out: int
    """Ops that wrote their results into their slots (out= overload or a direct writer)."""
    ops_out_generated: int
    """Of `ops_out`, those through PyTorch's generated compute-then-copy out overloads."""
    ops_copied: int
    """Ops computed into a temporary and copied into their slots."""
    ops_view: int
    """Ops whose outputs are views of the arena (no bytes written)."""
    ops_unplanned: int
    """Ops whose outputs have no offset (zero-byte storages), kept as computed."""
    copied_targets: tuple[str, ...]
    """The distinct operators that fell back to a copy."""
    state_bytes: int
    """Bytes of parameters, buffers and inputs copied into the arena before the first op."""
    max_temporary_bytes: int
    """Largest temporary of one copy fallback."""
    peak_bytes: int
    """Peak live storage bytes the tracker saw over setup and the op loop."""
    wall_s: float
    setup_s: float

    @property
    def in_place_share(self) -> float:
        """Share of the ops that write bytes that wrote them in place."""
        written = self.ops_out + self.ops_copied
        return self.ops_out / written if written else 1.0


@dataclass(frozen=True, slots=True)
class ArenaCheck:
    """An arena run against two references. The same exported graph run normally must be bit-identical
    (`torch.equal`: the same kernels on the same inputs, only the output buffers differ); the eager module
    must be `allclose` (rtol = atol = 1e-6), since export decomposes some ops and the arithmetic may differ
    in the last bits. Also: the arena sizes equal the plan's, and `verify_plan` passes."""

    equal_to_graph: bool
    close_to_eager: bool
    max_abs_diff_eager: float
    arena_matches_plan: bool
    plan_verified: bool

    @property
    def ok(self) -> bool:
        return self.equal_to_graph and self.close_to_eager and self.arena_matches_plan and self.plan_verified


# -- the arena's layout -----------------------------------------------------------------------------------
def _value_meta(cap: Capture) -> dict[int, torch.Tensor]:
    """Value id -> the capture's fake tensor for it (shape, strides, storage offset, dtype)."""
    meta: dict[int, torch.Tensor] = {}
    for node in cap.gm.graph.nodes:
        if node.op not in ("placeholder", "call_function") or node.target is operator.getitem:
            continue
        val = node.meta.get("val")
        meta.update(zip(cap.node_values.get(node.name, ()), _tensors(val), strict=False))
    return meta


def _tier_of(plan: Plan) -> dict[int, str]:
    """The tier of every storage's slot: its one tier, or the device for a storage the schedule pass evicts
    and reloads (its copies go to the next tier's slot); any other storage that moves is refused."""
    tiers: dict[int, set[str]] = defaultdict(set)
    for iv in plan.residency:
        tiers[iv.value_id].add(iv.tier)
    replaced = _replaced(plan)
    for v in replaced:
        if v in tiers and len(tiers[v]) == 2 and "device" in tiers[v]:
            tiers[v] = {"device"}
    moving = sorted(v for v, ts in tiers.items() if len(ts) > 1)
    if moving:
        raise InvalidInput(
            f"this plan moves {len(moving)} storages between tiers (e.g. value {moving[0]}); "
            "the arena runner keeps each storage in one arena: run it with `memplan run`"
        )
    return {v: next(iter(ts)) for v, ts in tiers.items()}


def _replaced(plan: Plan) -> dict[int, str]:
    """Storages with the schedule pass's `evict` / `swap_in` events -> the tier their copies go to."""
    out: dict[int, str] = {}
    for e in plan.events:
        if e.kind == "evict" and e.value_id is not None and e.dst_tier:
            out[e.value_id] = e.dst_tier
        elif e.kind == "swap_in" and e.value_id is not None and e.src_tier:
            out[e.value_id] = e.src_tier
    return out


def _slot(arena: torch.Tensor, offset: int, nbytes: int, meta: torch.Tensor) -> torch.Tensor:
    """The tensor living at `arena[offset:offset + nbytes]`, with the fake tensor's layout."""
    size = meta.element_size()
    internal_assert(
        offset % size == 0 and nbytes % size == 0 and offset + nbytes <= arena.numel(),
        f"slot [{offset}, {offset + nbytes}) of a {meta.dtype} tensor is misaligned or outside "
        f"the {arena.numel()}-byte arena",
    )
    flat = arena[offset : offset + nbytes].view(meta.dtype)
    extent = meta.storage_offset() + sum((n - 1) * s for n, s in zip(meta.shape, meta.stride(), strict=True))
    internal_assert(
        meta.numel() == 0 or extent < flat.numel(),
        f"a {tuple(meta.shape)} tensor with strides {meta.stride()} reaches element {extent}; "
        f"its slot holds {flat.numel()}",
    )
    return flat.as_strided(meta.shape, meta.stride(), flat.storage_offset() + meta.storage_offset())


def _live_by_step(intervals: Sequence[Interval], n_steps: int) -> list[list[Interval]]:
    """For each schedule step, the intervals live at it (`start <= step < end`)."""
    live: list[list[Interval]] = [[] for _ in range(max(n_steps, 1))]
    for iv in intervals:
        for step in range(iv.start, min(iv.end, n_steps)):
            live[step].append(iv)
    return live


def _tensors(result: Any) -> list[torch.Tensor]:
    """The tensors of an op's result (one tensor, or a tuple or list holding some)."""
    items = result if isinstance(result, (tuple, list)) else [result]
    return [t for t in items if isinstance(t, torch.Tensor)]


def _call(node: torch.fx.Node, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Run a call_function node's operator on real arguments."""
    target = node.target
    if not callable(target):
        raise PlanMismatch(f"node {node.name} calls {target!r}, which is not a function")
    return target(*args, **kwargs)


# -- the run ------------------------------------------------------------------------------------------------
class _ArenaRunner:
    """One run of `plan` over `cap` in freshly allocated arenas: create, `bind`, `run`, `outputs`."""

    def __init__(self, plan: Plan, cap: Capture, debug: bool, in_place: bool) -> None:
        self.plan, self.cap, self.debug, self.in_place = plan, cap, debug, in_place
        self.graph = plan.graph()
        self.nodes = {n.name: n for n in cap.gm.graph.nodes}
        self.tier_of = _tier_of(plan)
        self.live = _live_by_step(plan.residency, len(plan.ops)) if debug else []
        self.arenas = {
            t: torch.empty(plan.predictions.arena_bytes.get(t, 0), dtype=torch.uint8) for t in plan.offsets
        }
        meta = _value_meta(cap)
        self.slots = {
            v: _slot(self.arenas[t], plan.offsets[t][v], self.graph.value(v).size_bytes, meta[v])
            for v, t in self.tier_of.items()
            if v in plan.offsets.get(t, {}) and v in meta
        }
        self.copies = {
            v: _slot(self.arenas[t], plan.offsets[t][v], self.graph.value(v).size_bytes, meta[v])
            for v, t in _replaced(plan).items()
            if v in plan.offsets.get(t, {}) and v in meta and v in self.slots
        }
        """The next tier's slot of every storage the schedule pass evicts (its copy while off the device)."""
        self.loads: dict[int, list[int]] = defaultdict(list)
        self.evicts: dict[int, list[int]] = defaultdict(list)
        for e in plan.events:
            if e.value_id in self.copies and e.kind == "swap_in":
                self.loads[e.step].append(e.value_id)
            elif e.value_id in self.copies and e.kind == "evict":
                self.evicts[e.step].append(e.value_id)
        self.env: dict[int, torch.Tensor] = {}
        self.counts = {"out": 0, "generated": 0, "copy": 0, "view": 0, "unplanned": 0}
        self.copied: set[str] = set()
        self.max_temporary = 0

    def bind(self, args: Sequence[Any]) -> int:
        """Copy state and inputs into their slots, in the graph's placeholder order; returns the bytes."""
        placeholders = [n for n in self.cap.gm.graph.nodes if n.op == "placeholder"]
        copied = 0
        for node, val in zip(placeholders, args, strict=True):
            for vid in self.cap.node_values.get(node.name, ()):
                root = self.graph.storage_of(vid)
                if vid in self.copies:  # into its next-tier slot; its first load fills the device slot
                    self.copies[vid].copy_(val)
                    self.env[vid] = self.slots[vid]
                    copied += self.graph.value(vid).size_bytes
                elif vid in self.slots:
                    self._check_write(0, vid)
                    self.env[vid] = self.slots[vid].copy_(val)
                    copied += self.graph.value(vid).size_bytes
                elif root != vid and root in self.env and self.env[root].shape == val.shape:
                    self.env[vid] = self.env[root]  # a tied weight: the same arena tensor
                else:
                    self.env[vid] = val
        return copied

    def run(self) -> None:
        for step, op in enumerate(self.graph.ops):
            for vid in self.loads.get(step, ()):  # the schedule's reloads: next tier -> device slot
                self._check_write(step, vid)
                self.slots[vid].copy_(self.copies[vid])
            if self.debug:
                self._check_reads(step, op.inputs)
            self._execute(step)
            for vid in self.evicts.get(step, ()):  # its evictions: device slot -> next tier
                self.copies[vid].copy_(self.slots[vid])

    def outputs(self) -> tuple[torch.Tensor, ...]:
        out_node = next(n for n in self.cap.gm.graph.nodes if n.op == "output")
        tree = torch.fx.node.map_arg(out_node.args, self._lookup)
        return tuple(t.clone() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))

    # -- one op ---------------------------------------------------------------------------------------------
    def _execute(self, step: int) -> None:
        op = self.graph.ops[step]
        node = self.nodes[op.name]
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), self._lookup)
        fresh = [v for v in op.outputs if self.graph.value(v).alias_of is None]
        if not fresh:
            self._bind_outputs(op.outputs, _call(node, args, kwargs))
            self.counts["view"] += 1
            return
        for vid in fresh:
            self._check_write(step, vid)
        planned = len(fresh) == len(op.outputs) and all(v in self.slots for v in fresh)
        if not (planned and self.in_place and self._write_in_place(node, args, kwargs, fresh)):
            self._copy_in(node, args, kwargs, op.outputs)

    def _write_in_place(
        self, node: torch.fx.Node, args: Sequence[Any], kwargs: dict[str, Any], outs: list[int]
    ) -> bool:
        """Write the op's results straight into its slots; False when no direct writer nor out= fits."""
        target = node.target
        if not isinstance(target, OpOverload):
            return False
        slots = [self.slots[v] for v in outs]
        bound = bind_arguments(target._schema, args, kwargs)
        variant = out_variant(target)
        if not options_fit(bound, slots[0]):
            return False
        before = [(s.data_ptr(), s.shape, s.stride()) for s in slots]
        if target in DIRECT_WRITERS and DIRECT_WRITERS[target](slots[0], bound):
            self.counts["out"] += 1
        elif variant is not None:
            variant(**out_call_kwargs(variant._schema, bound, slots))
            self.counts["out"] += 1
            self.counts["generated"] += torch.Tag.generated in variant.tags
        else:
            return False
        internal_assert(
            before == [(s.data_ptr(), s.shape, s.stride()) for s in slots],
            f"{node.name} resized or moved its out tensor: real shapes differ from the capture's",
        )
        self._bind_outputs(outs, tuple(slots))
        return True

    def _copy_in(
        self, node: torch.fx.Node, args: Sequence[Any], kwargs: dict[str, Any], outs: tuple[int, ...]
    ) -> None:
        """Run the op normally, copy each fresh result into its slot and drop the temporary."""
        tensors = _tensors(_call(node, args, kwargs))
        temporary = 0
        for i, (vid, t) in enumerate(zip(outs, tensors, strict=True)):
            if vid in self.slots and self.graph.value(vid).alias_of is None:
                internal_assert(
                    t.shape == self.slots[vid].shape,
                    f"{node.name}: real shape {tuple(t.shape)} differs from the capture's",
                )
                temporary += t.untyped_storage().nbytes()
                tensors[i] = self.slots[vid].copy_(t)
        self._bind_outputs(outs, tensors)
        self.max_temporary = max(self.max_temporary, temporary)
        self.counts["copy" if temporary else "unplanned"] += 1
        if temporary:
            self.copied.add(str(node.target))

    def _bind_outputs(self, outs: Sequence[int], result: Any) -> None:
        for vid, t in zip(outs, _tensors(result), strict=True):
            self.env[vid] = t

    def _lookup(self, node: torch.fx.Node) -> Any:
        vids = self.cap.node_values.get(node.name)
        if vids is None:
            raise PlanMismatch(f"value of node {node.name} is not available at this step")
        single = len(vids) == 1 and not isinstance(node.meta.get("val"), (tuple, list))
        if node.target is operator.getitem or single:
            return self.env[vids[0]]
        return tuple(self.env.get(v) for v in vids)

    # -- debug checks ---------------------------------------------------------------------------------------
    def _check_write(self, step: int, vid: int) -> None:
        """No other storage live at `step` on the same tier may share a byte with `vid`'s slot."""
        if not self.debug or vid not in self.slots:
            return
        tier = self.tier_of[vid]
        offsets = self.plan.offsets[tier]
        lo, hi = offsets[vid], offsets[vid] + self.graph.value(vid).size_bytes
        for iv in self.live[step]:
            other = offsets.get(iv.value_id, hi) if iv.tier == tier and iv.value_id != vid else hi
            if other < hi and lo < other + iv.size_bytes:
                raise InternalError(
                    f"step {step}: writing value {vid} to {tier} bytes [{lo}, {hi}) would overwrite value "
                    f"{iv.value_id} at [{other}, {other + iv.size_bytes}), live over [{iv.start}, {iv.end})"
                )

    def _check_reads(self, step: int, inputs: Sequence[int]) -> None:
        """Every arena storage an op reads must be resident at its step (else its bytes may be reused)."""
        live = {iv.value_id for iv in self.live[step] if iv.tier == self.tier_of.get(iv.value_id)}
        for vid in inputs:
            root = self.graph.storage_of(vid)
            if root in self.slots and root not in live:
                raise InternalError(
                    f"step {step} ({self.graph.ops[step].name}) reads value {vid}, whose "
                    f"storage {root} is not resident then: its arena bytes may be reused"
                )


def run_in_arena(
    plan: Plan,
    cap: Capture,
    module: torch.nn.Module,
    inputs: Sequence[Any],
    debug: bool = True,
    in_place: bool = True,
) -> ArenaRun:
    """Run the captured inference graph of `module` on `inputs` inside the plan's arenas, under the
    live-storage tracker (see the module docstring). `debug` checks every write and read against the plan's
    residency (`InternalError` on a clash); `in_place=False` copies every result into place instead."""
    if plan.workload.mode != "infer":
        raise InvalidInput("the arena runner executes inference plans; train plans run with `memplan run`")
    if plan.model.fingerprint != fingerprint(cap.graph):
        raise PlanMismatch("the captured graph differs from the plan's model; re-plan it with `memplan plan`")
    if not plan.offsets:
        raise InvalidInput("this plan has no offsets: plan it with the `allocate` pass")
    args = bind_placeholders(cap, module, inputs)
    gc.collect()
    with torch.no_grad(), LiveStorageTracker(record_timeline=False) as tracker:
        t0 = time.perf_counter()
        runner = _ArenaRunner(plan, cap, debug, in_place)
        state = runner.bind(args)
        t1 = time.perf_counter()
        runner.run()
        t2 = time.perf_counter()
    c = runner.counts
    arenas = {t: a.numel() for t, a in runner.arenas.items()}
    return ArenaRun(
        runner.outputs(),
        arenas,
        c["out"],
        c["generated"],
        c["copy"],
        c["view"],
        c["unplanned"],
        tuple(sorted(runner.copied)),
        state,
        runner.max_temporary,
        tracker.result.peak_bytes,
        t2 - t1,
        t1 - t0,
    )


def check_arena_run(
    run: ArenaRun, plan: Plan, cap: Capture, module: torch.nn.Module, inputs: Sequence[Any]
) -> ArenaCheck:
    """Compare an arena run with the same graph run normally and with the eager module (see `ArenaCheck`)."""

    with torch.no_grad():
        graph_out = _tensors(tuple(tree_leaves(cap.gm(*bind_placeholders(cap, module, inputs)))))
        eager_out = _tensors(tuple(tree_leaves(module(*inputs))))
    pairs = list(zip(eager_out, run.outputs, strict=False))
    shapes_ok = len(eager_out) == len(run.outputs) and all(a.shape == b.shape for a, b in pairs)
    same = len(graph_out) == len(run.outputs) and all(map(torch.equal, graph_out, run.outputs))
    diffs = [(a - b).abs().max().item() for a, b in pairs if a.numel()] if shapes_ok else [float("inf")]
    close = shapes_ok and all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in pairs)
    planned = {t: plan.predictions.arena_bytes.get(t, 0) for t in run.arena_bytes}
    return ArenaCheck(same, close, max(diffs, default=0.0), planned == run.arena_bytes, verify_plan(plan).ok)


def describe(run: ArenaRun, check: ArenaCheck, ref_wall_s: float, ref_peak_bytes: int) -> str:
    """One paragraph: sizes, how the ops wrote, the checks, the measured peak and time."""
    arenas = ", ".join(f"{t} {n:,} bytes" for t, n in run.arena_bytes.items())
    copied = f" ({', '.join(run.copied_targets)})" if run.copied_targets else ""
    return (
        f"arena run {'OK' if check.ok else 'FAILED'}: arenas {arenas} (equal to the plan's: "
        f"{check.arena_matches_plan}), {run.state_bytes:,} bytes of parameters and inputs copied in first. "
        f"{run.ops_out} ops wrote in place ({run.ops_out_generated} through PyTorch's generated "
        f"compute-then-copy out= overloads), {run.ops_copied} were copied into place{copied}, {run.ops_view} "
        f"are views of the arena: {run.in_place_share:.0%} of the writing ops in place. Outputs equal to the "
        f"exported graph run normally: {check.equal_to_graph}; allclose to eager (1e-6): "
        f"{check.close_to_eager} (max |diff| {check.max_abs_diff_eager:.1e}); plan verified: "
        f"{check.plan_verified}. Tracker peak {run.peak_bytes:,} bytes (arenas plus largest copy temporary: "
        f"{sum(run.arena_bytes.values()) + run.max_temporary_bytes:,}; plain graph run: {ref_peak_bytes:,}). "
        f"Ops took {run.wall_s * 1e3:.1f} ms (+{run.setup_s * 1e3:.1f} ms setup), the plain graph run "
        f"{ref_wall_s * 1e3:.1f} ms."
    )
