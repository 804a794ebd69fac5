"""Execute a training step's joint graph exactly as a `remat_swap` plan says.

The interpreter walks the captured graph's ops in schedule order on real tensors. It holds a storage only
while the plan has it on the device: a value is dropped when its device interval ends, swapped values are
copied out to their tier (asynchronously) and prefetched back into a buffer allocated when the plan's
prefetch step comes, and recomputed values are rebuilt just before their first backward use by re-running
their recompute closure (the members of a checkpointed block by one re-run of the block's forward). A split
value sends its first k rows to the tier; at its first backward use those
rows come back into the buffer allocated at the prefetch step and the closure, run on the rows [k:] of its
inputs, writes the other rows into the same buffer (the producing op's `out=` overload). The memory it uses
is therefore the plan's residency, step by step, and the live storage tracker can check it.
A random op run again draws what its first run drew (`memplan.runtime.rng`); a swapped storage the forward
writes in place leaves after its last write and comes back as written (`memplan.runtime.writes`).

`PlannedStep` splits the run at the loss: `forward()` runs the forward ops and returns the loss,
`backward()` runs the backward ops and returns the gradients; `memplan.runtime.applied` wires the two into
autograd so that a training script keeps calling `loss.backward()` and `opt.step()`.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from memplan.errors import PlanMismatch
from memplan.ir.frontends.fx_lower import Capture
from memplan.ir.graph import PERSISTENT_ROLES, Graph
from memplan.ir.phases import last_reads, phases
from memplan.ir.row_ops import ROW_VIEWS
from memplan.plans.decisions import TensorRemat
from memplan.plans.plan import Plan, fingerprint
from memplan.runtime.out_variants import DIRECT_WRITERS, bind_arguments, out_call_kwargs, out_variant
from memplan.runtime.rng import RngReplay, refuse_random_split
from memplan.runtime.tiers.api import Handle, TierStore
from memplan.runtime.writes import last_forward_writes, writes_in_place


@dataclass
class _Schedule:
    """What happens around each step, derived once from the plan."""

    drop_after: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    swap_out: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    release: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    prefetch: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    arrive: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    recompute: dict[int, list[tuple[int, tuple[int, ...], frozenset[int]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Step -> (value, ops to re-run, the storages those ops may rebuild: the value and its transients)."""
    views: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Ops that rebuild the views of a swapped value once it is back."""
    split: dict[int, list[tuple[int, tuple[int, ...], int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Step -> (value, its closure, rows swapped) for the split values rebuilt there."""
    swap_rows: dict[int, int] = field(default_factory=dict)
    """Split value -> how many of its leading rows go to the tier."""
    reruns: dict[int, list[tuple[tuple[int, ...], frozenset[int], dict[int, list[int]]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Step -> checkpointed blocks re-run there: (ops, storages they rebuild, transients to drop after an
    op)."""


def _schedule(plan: Plan, graph: Graph) -> _Schedule:
    """Drop points from the device residency; swap and recompute points from the pass's decisions (its op
    ids turned into steps of `graph`, the plan's effective order)."""
    sch = _Schedule()
    remat = plan.decisions.remat
    decided = {t.value_id: t for t in (remat.tensors if remat else ())}
    moved = {vid for vid, t in decided.items() if t.decision != "keep"}
    step_of = {op.id: i for i, op in enumerate(graph.ops)}
    n = len(plan.ops)
    written = last_forward_writes(graph, phases(graph).fwd_end)
    for iv in plan.residency:
        if iv.tier == "device" and iv.value_id not in moved and iv.end < n:
            sch.drop_after[iv.end - 1].append(iv.value_id)
    for vid, t in decided.items():
        ops = tuple(step_of[i] for i in t.recompute_ops)
        if t.decision in ("swap", "split"):  # copied out once its forward writes are done
            views = tuple(step_of[i] for i in t.view_ops)
            _schedule_swap(sch, vid, t, views, max(t.produced, written.get(vid, -1)))
        if t.decision == "split":
            sch.swap_rows[vid] = t.swap_rows
            sch.split[t.first_bwd_use].append((vid, ops, t.swap_rows))
        elif t.decision == "recompute" and t.block is not None:
            sch.drop_after[t.last_fwd_use].append(vid)  # its block's re-run rebuilds it
        elif t.decision == "recompute":
            _schedule_recompute(sch, vid, t, ops)
        if t.decision != "keep" and t.last_use + 1 < n:
            sch.drop_after[t.last_use].append(vid)
    for b in remat.blocks if remat else ():  # checkpointed blocks: one re-run each
        ops = tuple(step_of[i] for i in b.ops)
        rebuilt = frozenset([*b.members, *b.transient])
        held = set(b.peak_transient)  # the plan counts these through step B: hold them as long
        drops = {i: [r for r in rs if r not in held] for i, rs in last_reads(graph, ops, b.transient).items()}
        sch.reruns[b.rebuild_step].append((ops, rebuilt, drops))
        sch.drop_after[b.rebuild_step].extend(held)
    return sch


def _schedule_swap(
    sch: _Schedule, vid: int, t: TensorRemat, view_steps: tuple[int, ...], final: int
) -> None:
    sch.swap_out[final + 1].append(vid)
    sch.release[t.write_done_step].append(vid)
    sch.prefetch[t.prefetch_step].append(vid)
    sch.arrive[t.first_bwd_use].append(vid)
    sch.views[vid] = view_steps


def _schedule_recompute(sch: _Schedule, vid: int, t: TensorRemat, ops: tuple[int, ...]) -> None:
    """Dropped after its last forward use, rebuilt before its first backward use; the values rebuilt on the
    way (not saved activations themselves) are dropped right after that step."""
    sch.drop_after[t.last_fwd_use].append(vid)
    sch.recompute[t.first_bwd_use].append((vid, ops, frozenset([vid, *t.recompute_transient])))
    sch.drop_after[t.first_bwd_use].extend(t.recompute_transient)


def _rerun_ops(sch: _Schedule) -> set[int]:
    """The ops the plan runs a second time: recompute closures, block re-runs, views redone on arrival."""
    ops = {i for at_step in sch.recompute.values() for _, o, _ in at_step for i in o}
    ops |= {i for at_step in sch.reruns.values() for o, _, _ in at_step for i in o}
    return ops | {i for o in sch.views.values() for i in o}


class PlannedStep:
    """One training step of `cap` run under `plan`; create once, call `forward` then `backward` each step."""

    def __init__(self, plan: Plan, cap: Capture, store: TierStore | None) -> None:
        if plan.model.fingerprint != fingerprint(cap.graph):
            raise PlanMismatch(
                "the captured step differs from the plan's model; re-plan it with `memplan plan`"
            )
        self.plan, self.cap, self.store = plan, cap, store
        self.graph = plan.graph()
        self.phases = phases(self.graph)
        self.sched = _schedule(plan, self.graph)
        self.nodes = {n.name: n for n in cap.gm.graph.nodes}
        self.members: dict[int, list[int]] = defaultdict(list)
        for v in self.graph.values:
            self.members[self.graph.storage_of(v.id)].append(v.id)
        self.env: dict[int, torch.Tensor] = {}
        self.handles: dict[int, Handle] = {}
        self.pending: dict[int, torch.Tensor] = {}
        self.layouts: dict[int, tuple[int, ...]] = {}
        """Swapped values stored as a contiguous permutation of themselves: the dims that undo it."""
        self.parts: dict[int, torch.Tensor] = {}
        """Split values: the rows of the prefetch buffer the tier's part is read into."""
        self.scratch: list[dict[int, torch.Tensor]] = []
        """Rows rebuilt on the way by split rebuilds, held to the end of the step, as the plan counts them."""
        self.seed: torch.Tensor | None = None
        self.seed_step = next(
            (
                i
                for i in range(self.phases.fwd_end, self.phases.bwd_end)
                if self.graph.ops[i].target == "aten.ones_like.default"
            ),
            -1,
        )
        reruns = _rerun_ops(self.sched)
        self.rng = RngReplay.for_reruns({i: self.nodes[self.graph.ops[i].name] for i in reruns}, reruns)
        for vid, ops, _ in (s for at_step in self.sched.split.values() for s in at_step):
            refuse_random_split(self.graph.value(vid).name, [self.nodes[self.graph.ops[i].name] for i in ops])

    # -- running ---------------------------------------------------------------------------------------
    def bind(self, args: Sequence[Any]) -> None:
        """Bind the placeholders (parameters, buffers, optimizer state, inputs) in the graph's order."""
        placeholders = [n for n in self.cap.gm.graph.nodes if n.op == "placeholder"]
        for node, val in zip(placeholders, args, strict=True):
            for vid in self.cap.node_values.get(node.name, ()):
                self.env[vid] = val
        for node in self.cap.gm.graph.nodes:  # constants the trace lifted (a cache's `torch.tensor([])`)
            if node.op == "get_attr" and node.name in self.cap.node_values:
                self.env[self.cap.node_values[node.name][0]] = getattr(self.cap.gm, str(node.target))

    def forward(self) -> torch.Tensor:
        self._run(0, self.phases.fwd_end)
        return self.env[self.graph.outputs[0]] if self.graph.outputs[0] in self.env else self._loss()

    def backward(self, seed: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run the backward ops and return the gradients. `seed`, the gradient of the loss autograd passes
        in, stands for the graph's own `ones_like` seed, so gradients scale with it (loss scaling) and no
        second seed is allocated."""
        if seed is not None:
            self.seed = seed
        self._run(self.phases.fwd_end, self.phases.bwd_end)
        self.seed = None
        grads = [self.env[g] for g in self.graph.outputs[1:]]
        self.reset()
        return grads

    def reset(self) -> None:
        """Forget this step's tensors (also of a forward whose backward will not run) and its tier copies."""
        if self.store is not None:
            for h in self.handles.values():
                self.store.wait(h)
                self.store.free(h)
            self.store.flush()
        for held in (self.env, self.handles, self.pending, self.parts, self.layouts):
            held.clear()
        self.rng.clear()

    def _loss(self) -> torch.Tensor:
        return self.env[self.graph.storage_of(self.graph.outputs[0])]

    def _run(self, start: int, end: int) -> None:
        for step in range(start, end):
            self._before(step)
            if step == self.seed_step and self.seed is not None:
                self.env[self.graph.ops[step].outputs[0]] = self.seed
            else:
                self.rng.record(step)
                self._execute(step)
            self._after(step)

    def _before(self, step: int) -> None:
        for vid in self.sched.release.get(step, ()):  # the plan frees the device copy once written out
            assert self.store is not None
            self.store.wait(self.handles[vid])
            self._drop(vid)
        for vid in self.sched.prefetch.get(step, ()):
            self._start_prefetch(vid)
        for vid in self.sched.arrive.get(step, ()):
            self._arrive(vid)
        for _, ops, rebuilt in self.sched.recompute.get(step, ()):
            for i in ops:
                with self.rng.replay(i):
                    self._execute(i, only=rebuilt)
        for ops, rebuilt, drops in self.sched.reruns.get(step, ()):
            for i in ops:
                with self.rng.replay(i):
                    self._execute(i, only=rebuilt)
                for root in drops.get(i, ()):
                    self._drop(root)
        for vid, ops, k in self.sched.split.get(step, ()):
            self._rebuild_rows(vid, ops, k)

    def _after(self, step: int) -> None:
        for vid in self.sched.swap_out.get(step + 1, ()):
            assert self.store is not None
            k = self.sched.swap_rows.get(vid)
            t = self.env[vid]
            order = _dense_order(t) if k is None else None
            if order is not None:  # a permuted layout (SDPA's output): stored and rebuilt in it, no copy
                self.layouts[vid] = tuple(order.index(d) for d in range(t.dim()))
                t = t.permute(order)
            self.handles[vid] = self.store.put(str(vid), t if k is None else _rows(t)[:k])
        for vid in self.sched.drop_after.get(step, ()):
            self._drop(vid)
        self.scratch.clear()

    def _execute(self, index: int, only: frozenset[int] | None = None) -> None:
        """Run op `index` on the values in the environment. A recompute passes `only`: the storages it may
        rebuild; its op's other outputs (say, the statistics of a layer norm rebuilt for its output) are
        dropped at once, and values still on the device are not replaced."""
        op = self.graph.ops[index]
        node = self.nodes[op.name]
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), self._lookup)
        out = node.target(*args, **kwargs)
        del args, kwargs
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [t for t in outs if isinstance(t, torch.Tensor)]
        del out, outs
        for vid, t in zip(op.outputs, tensors, strict=True):
            if only is None or (self.graph.storage_of(vid) in only and vid not in self.env):
                self.env[vid] = t

    def _lookup(self, node: torch.fx.Node) -> Any:
        if node.op == "call_function" and node.target is operator.getitem:
            return self.env[self.cap.node_values[node.name][0]]
        vids = self.cap.node_values.get(node.name)
        if vids is None:
            raise PlanMismatch(f"value of node {node.name} is not available at this step")
        if len(vids) == 1 and not isinstance(node.meta.get("val"), (tuple, list)):
            return self.env[vids[0]]
        return tuple(self.env.get(v) for v in vids)

    # -- memory ----------------------------------------------------------------------------------------
    def _drop(self, root: int) -> None:
        """Forget a storage and every view of it."""
        for vid in self.members[root]:
            self.env.pop(vid, None)

    def _start_prefetch(self, vid: int) -> None:
        """Allocate the read-back buffer here (the plan has it on the device from now) and start the read;
        a split value's buffer holds all its rows, the tier's part lands in the first ones."""
        assert self.store is not None
        h = self.handles[vid]
        if vid in self.sched.swap_rows:
            v = self.graph.value(vid)
            self.pending[vid] = torch.empty(v.shape, dtype=h.dtype)
            self.parts[vid] = _rows(self.pending[vid])[: h.shape[0]]
        else:
            self.pending[vid] = torch.empty(h.shape, dtype=h.dtype)
        self.store.prefetch(h, out=self.parts.get(vid, self.pending[vid]))

    def _arrive(self, vid: int) -> None:
        assert self.store is not None
        handle = self.handles.pop(vid)
        buffer = self.pending.pop(vid)
        self.store.get(handle, out=self.parts.pop(vid, buffer))
        self.env[vid] = buffer
        self.store.free(handle)
        if vid in self.layouts:  # back in the producer's strides, which its views and readers expect
            self.env[vid] = buffer.permute(self.layouts.pop(vid))
        for i in self.sched.views.get(vid, ()):
            op = self.graph.ops[i]
            if writes_in_place(self.nodes[op.name].target):  # its write is in the copy: it is its argument
                for out in op.outputs:
                    self.env[out] = self.env[self.graph.value(out).alias_of]  # type: ignore[index]
            else:
                self._execute(i)

    # -- split values: rebuilding rows ---------------------------------------------------------------
    def _rebuild_rows(self, vid: int, ops: tuple[int, ...], k: int) -> None:
        """Run the closure of `vid` on the rows [k:] of its inputs; the producing op writes straight into the
        rows [k:] of the buffer the tier's rows arrived in (views of `vid` were redone on arrival)."""
        producer = self.graph.producer(vid)
        scratch: dict[int, torch.Tensor] = {}
        for i in ops:
            if i == producer:
                self._execute_rows(i, k, scratch, into=(vid, _rows(self.env[vid])[k:]))
            elif i not in self.sched.views.get(vid, ()):
                self._execute_rows(i, k, scratch)
        self.scratch.append(scratch)

    def _execute_rows(
        self,
        index: int,
        k: int,
        scratch: dict[int, torch.Tensor],
        into: tuple[int, torch.Tensor] | None = None,
    ) -> None:
        """Op `index` on row blocks: inputs that carry rows (activations) enter as their rows [k:] in
        [rows, last] form, parameters whole; views that keep the last dim are the identity there, `mean.dim`
        reduces the last dim. With `into` = (value, slot), the op writes that output into the slot."""
        op = self.graph.ops[index]
        node = self.nodes[op.name]

        def rows_of(n: torch.fx.Node) -> Any:
            vids = self.cap.node_values.get(n.name)
            if vids is None:
                raise PlanMismatch(f"value of node {n.name} is not available for a split rebuild")
            if n.target is operator.getitem:
                vids = vids[:1]
            got = [self._row_block(v, k, scratch) for v in vids]
            return got[0] if len(got) == 1 else tuple(got)

        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), rows_of)
        if op.target in ROW_VIEWS:  # a view, or a copying reshape that made the value (`_unsafe_view`)
            if into is not None:
                into[1].copy_(args[0])
            else:
                scratch[op.outputs[0]] = args[0]
            return
        if op.target == "aten.mean.dim":
            args = (args[0], [-1], *args[2:])
        if into is None:
            out = node.target(*args, **kwargs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for out_vid, t in zip(op.outputs, outs, strict=True):
                scratch[out_vid] = t
            return
        _write_into(node.target, args, kwargs, op.outputs.index(into[0]), len(op.outputs), into[1])

    def _row_block(self, vid: int, k: int, scratch: dict[int, torch.Tensor]) -> torch.Tensor:
        if vid in scratch:
            return scratch[vid]
        t = self.env[vid]
        if self.graph.value(self.graph.storage_of(vid)).role in PERSISTENT_ROLES or t.dim() == 0:
            return t
        return _rows(t)[k:]


def _dense_order(t: torch.Tensor) -> list[int] | None:
    """The dim order in which a non-contiguous `t` is contiguous (its layout a permutation of a dense one,
    as SDPA's [batch, seq, heads, dim]-laid output), or None: contiguous already, or not dense."""
    if t.is_contiguous():
        return None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as [rows, last dim] (a view of a contiguous tensor)."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


def _write_into(
    target: Any, args: Any, kwargs: dict[str, Any], which: int, n_out: int, slot: torch.Tensor
) -> None:
    """Run ATen op `target` with output `which` written into `slot`, through its `out=` overload (the other
    outputs resized from empty), a direct writer, or, for an op with neither, a copy."""
    bound = bind_arguments(target._schema, args, kwargs)
    if target in DIRECT_WRITERS and DIRECT_WRITERS[target](slot, bound):
        return
    variant = out_variant(target)
    if variant is None:
        out = target(*args, **kwargs)
        slot.copy_(out if n_out == 1 else out[which])
        return
    slots = [slot if i == which else torch.empty(0, dtype=slot.dtype) for i in range(n_out)]
    variant(**out_call_kwargs(variant._schema, bound, slots))
