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
writes in place leaves after its last write and comes back as written (`memplan.runtime.writes`). What
happens at each step comes from `memplan.runtime.step_actions`; a split's rows are rebuilt by
`memplan.runtime.split_rows`.

`PlannedStep` splits the run at the loss: `forward()` runs the forward ops and returns the loss,
`backward()` runs the backward ops and returns the gradients; `memplan.runtime.applied` wires the two into
autograd so that a training script keeps calling `loss.backward()` and `opt.step()`.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from memplan.errors import PlanMismatch
from memplan.ir.frontends.fx_lower import Capture
from memplan.ir.phases import phases
from memplan.plans.plan import Plan, fingerprint
from memplan.runtime.rng import RngReplay, refuse_random_split
from memplan.runtime.split_rows import rebuild_rows, rows
from memplan.runtime.step_actions import rerun_ops, step_actions
from memplan.runtime.tiers.api import Handle, TierStore
from memplan.runtime.writes import writes_in_place


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
        self.sched = step_actions(plan, self.graph)
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
        self.spilled: dict[int, Any] = {}
        """Storages the schedule pass evicted: (host copy, device, layouts of its values), or, for a storage
        the caller bound (state, inputs), its own tensors, which are the copy on the next tier."""
        self.bound: set[int] = set()
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
        reruns = rerun_ops(self.sched)
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
                self.bound.add(self.graph.storage_of(vid))
        for node in self.cap.gm.graph.nodes:  # constants the trace lifted (a cache's `torch.tensor([])`)
            if node.op == "get_attr" and node.name in self.cap.node_values:
                self.env[self.cap.node_values[node.name][0]] = getattr(self.cap.gm, str(node.target))

    def forward(self) -> torch.Tensor:
        self._run(0, self.phases.fwd_end)
        return self._value(self.graph.outputs[0]) if self._has(self.graph.outputs[0]) else self._loss()

    def backward(self, seed: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run the backward ops and return the gradients. `seed`, the gradient of the loss autograd passes
        in, stands for the graph's own `ones_like` seed, so gradients scale with it (loss scaling) and no
        second seed is allocated."""
        if seed is not None:
            self.seed = seed
        self._run(self.phases.fwd_end, self.phases.bwd_end)
        self.seed = None
        grads = [self._value(g) for g in self.graph.outputs[1:]]
        self.reset()
        return grads

    def reset(self) -> None:
        """Forget this step's tensors (also of a forward whose backward will not run) and its tier copies."""
        if self.store is not None:
            for h in self.handles.values():
                self.store.wait(h)
                self.store.free(h)
            self.store.flush()
        for held in (self.env, self.handles, self.pending, self.parts, self.layouts, self.spilled):
            held.clear()
        self.rng.clear()

    def _loss(self) -> torch.Tensor:
        return self._value(self.graph.storage_of(self.graph.outputs[0]))

    def _has(self, vid: int) -> bool:
        return vid in self.env or self.graph.storage_of(vid) in self.spilled

    def _value(self, vid: int) -> torch.Tensor:
        """A value the step returns, read back first if the schedule evicted it (its final store)."""
        if vid not in self.env:
            self._load(self.graph.storage_of(vid))
        return self.env[vid]

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
        for root in self.sched.load.get(step, ()):
            self._load(root)
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
            self._rerun(ops, rebuilt, drops)
        for vid, ops, k in self.sched.split.get(step, ()):
            rebuild_rows(self, vid, ops, k)

    def _rerun(self, ops: tuple[int, ...], rebuilt: frozenset[int], drops: dict[int, list[int]]) -> None:
        """Re-run a checkpointed block's forward: an op that rebuilds nothing (it makes only values still on
        the device) is skipped, and each transient is dropped after its last read in the re-run."""
        for i in ops:
            if {self.graph.storage_of(v) for v in self.graph.ops[i].outputs} & rebuilt:
                with self.rng.replay(i):
                    self._execute(i, only=rebuilt)
            for root in drops.get(i, ()):
                self._drop(root)

    def _after(self, step: int) -> None:
        for root in self.sched.evict.get(step, ()):
            self._evict(root)
        for vid in self.sched.swap_out.get(step + 1, ()):
            assert self.store is not None
            k = self.sched.swap_rows.get(vid)
            t = self.env[vid]
            order = _dense_order(t) if k is None else None
            if order is not None:  # a permuted layout (SDPA's output): stored and rebuilt in it, no copy
                self.layouts[vid] = tuple(order.index(d) for d in range(t.dim()))
                t = t.permute(order)
            self.handles[vid] = self.store.put(str(vid), t if k is None else rows(t)[:k])
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
    def _evict(self, root: int) -> None:
        """Send a storage off the device: copy its bytes to host memory and forget its values (a storage the
        caller bound is only forgotten: the caller's tensor is its copy)."""
        held = {v: self.env.pop(v) for v in self.members[root] if v in self.env}
        if not held:
            return
        base = held.get(root, next(iter(held.values())))
        storage = base.untyped_storage()
        shared = all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in held.values())
        if root in self.bound or not shared:
            self.spilled[root] = held
            return
        host = torch.UntypedStorage(storage.nbytes(), device="cpu")
        host.copy_(storage)
        layouts = {v: (t.dtype, t.shape, t.stride(), t.storage_offset()) for v, t in held.items()}
        self.spilled[root] = (host, base.device, layouts)

    def _load(self, root: int) -> None:
        """Bring an evicted storage back: a fresh device buffer with its bytes, its values as they were."""
        spilled = self.spilled.pop(root, None)
        if spilled is None:
            return
        if isinstance(spilled, dict):
            self.env.update(spilled)
            return
        host, device, layouts = spilled
        storage = torch.UntypedStorage(host.nbytes(), device=device)
        storage.copy_(host)
        for v, (dtype, shape, stride, offset) in layouts.items():
            self.env[v] = torch.empty(0, dtype=dtype, device=device).set_(storage, offset, shape, stride)

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
            self.parts[vid] = rows(self.pending[vid])[: h.shape[0]]
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


def _dense_order(t: torch.Tensor) -> list[int] | None:
    """The dim order in which a non-contiguous `t` is contiguous (its layout a permutation of a dense one,
    as SDPA's [batch, seq, heads, dim]-laid output), or None: contiguous already, or not dense."""
    if t.is_contiguous():
        return None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None
