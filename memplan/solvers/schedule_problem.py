"""The scheduling problem of the `schedule` pass, as plain data: an operator order and, for a device of a
given capacity, which tensors leave the device and come back (tensor replacement, after COSMA: Li, Gupta,
Malik). Knows nothing of torch or plans.

Ops are numbered in their captured order (a topological order); tensors are storages with a size in bytes.
An op *uses* the tensors it reads or writes (all must be on the device while it runs) and *writes* some of
them; `preds` are the ops that must run before it (data edges, and whatever else the caller orders).

Two memory models:

- `peak` (no capacity): the plan's model. An `initial` tensor (input, weight) is live over the whole step;
  a produced tensor from its producer to its last use, or to the end when `keep` (graph output, state).
- `capacity`: everything starts off the device; a tensor is on the device only between uses the plan keeps
  it across. Before an op, missing tensors are loaded; to make room, a tensor is evicted, written out when
  it is dirty (written since it was last copied out), and read back before its next use. After its last use
  a tensor leaves the device; a `keep` tensor that is dirty is stored then.

Traffic is bytes loaded plus bytes stored. Compulsory traffic, which no order or replacement avoids and is
never counted as savings: the first load of every used initial tensor and one store of every kept tensor
the step writes. `Replacement.moved_bytes` is the rest.

Positions are steps of an order (step k runs `order[k]`); a `Residence` is on the device over steps
`[start, end)`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from memplan.errors import InfeasibleBudget, InternalError


@dataclass(frozen=True)
class ScheduleProblem:
    """Ops 0..n-1 in captured order over tensors 0..m-1 (see the module docstring)."""

    sizes: tuple[int, ...]
    uses: tuple[tuple[int, ...], ...]
    """Per op: the tensors it reads or writes."""
    writes: tuple[tuple[int, ...], ...]
    """Per op: the tensors it writes (a subset of its uses)."""
    preds: tuple[tuple[int, ...], ...]
    """Per op: the ops that must run before it."""
    initial: tuple[bool, ...]
    """Per tensor: exists before the first op (no producer), clean off the device."""
    keep: tuple[bool, ...]
    """Per tensor: must exist after the last op (graph output or model state)."""
    segments: tuple[int, ...] = ()
    """Per op: its segment (non-decreasing in captured order); no op leaves its segment. Empty: one."""
    groups: tuple[int | None, ...] = ()
    """Per op: its repeated block (transformer layer), None outside one; regions follow these."""
    keys: tuple[str, ...] = ()
    """Per op: what it computes (its operator), for recognising repeated regions."""
    tensor_names: tuple[str, ...] = ()
    op_names: tuple[str, ...] = ()

    @property
    def n_ops(self) -> int:
        return len(self.uses)

    @property
    def n_tensors(self) -> int:
        return len(self.sizes)

    def segment(self, op: int) -> int:
        return self.segments[op] if self.segments else 0

    def producer(self) -> list[int | None]:
        """Per tensor: the captured-order index of the first op that writes it (None for initial ones)."""
        prod: list[int | None] = [None] * self.n_tensors
        for v in range(self.n_ops):
            for t in self.writes[v]:
                if prod[t] is None and not self.initial[t]:
                    prod[t] = v
        return prod

    def users(self) -> list[list[int]]:
        """Per tensor: the ops that use it, in captured order."""
        out: list[list[int]] = [[] for _ in range(self.n_tensors)]
        for v in range(self.n_ops):
            for t in self.uses[v]:
                out[t].append(v)
        return out


@dataclass(frozen=True, slots=True)
class Residence:
    """Tensor `tensor` on the device over steps `[start, end)`: `loaded` (read in before `start`) or made by
    the op at `start`; `stored`: written out when it leaves (it was dirty)."""

    tensor: int
    start: int
    end: int
    loaded: bool
    stored: bool


@dataclass(frozen=True)
class Replacement:
    """Which tensors are on the device when, under one order, and the traffic that costs."""

    residences: tuple[Residence, ...]
    load_bytes: int
    store_bytes: int
    compulsory_bytes: int
    peak_bytes: int

    @property
    def traffic_bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    @property
    def moved_bytes(self) -> int:
        """The non-compulsory traffic: what a better order or replacement can remove."""
        return self.traffic_bytes - self.compulsory_bytes


def compulsory_bytes(p: ScheduleProblem) -> int:
    """First loads of the used initial tensors plus one store of every kept tensor the step writes."""
    used = {t for u in p.uses for t in u}
    written = {t for w in p.writes for t in w}
    return sum(p.sizes[t] for t in used if p.initial[t]) + sum(
        p.sizes[t] for t in written if p.keep[t]
    )


def check_order(p: ScheduleProblem, order: list[int] | tuple[int, ...]) -> None:
    """Raise `InternalError` unless `order` is a permutation of the ops that respects `preds` and segments."""
    if sorted(order) != list(range(p.n_ops)):
        raise InternalError("schedule: the order is not a permutation of the ops")
    pos = positions(order)
    for v in range(p.n_ops):
        for u in p.preds[v]:
            if pos[u] >= pos[v]:
                raise InternalError(f"schedule: op {v} runs before its predecessor {u}")
    segs = [p.segment(v) for v in order]
    if segs != sorted(segs):
        raise InternalError("schedule: an op left its segment")


def positions(order: list[int] | tuple[int, ...]) -> list[int]:
    """Op -> its step in `order`."""
    pos = [0] * len(order)
    for k, v in enumerate(order):
        pos[v] = k
    return pos


def use_steps(p: ScheduleProblem, order: list[int] | tuple[int, ...]) -> list[list[int]]:
    """Per tensor: the steps of `order` that use it, ascending."""
    out: list[list[int]] = [[] for _ in range(p.n_tensors)]
    for k, v in enumerate(order):
        for t in p.uses[v]:
            out[t].append(k)
    return out


def live_profile(p: ScheduleProblem, order: list[int] | tuple[int, ...], model: str = "peak") -> list[int]:
    """Bytes live at every step of `order` with nothing evicted, in the `peak` or `capacity` model."""
    n = len(order)
    diff = [0] * (n + 1)
    steps = use_steps(p, order)
    for t, s in enumerate(steps):
        if not s and not (model == "peak" and p.initial[t]):
            continue
        if model == "peak":
            start = 0 if p.initial[t] else s[0]
            end = n if (p.initial[t] or p.keep[t]) else s[-1] + 1
        else:
            start, end = s[0], s[-1] + 1
        diff[start] += p.sizes[t]
        diff[end] -= p.sizes[t]
    out, cur = [], 0
    for k in range(n):
        cur += diff[k]
        out.append(cur)
    return out


def peak(p: ScheduleProblem, order: list[int] | tuple[int, ...], model: str = "peak") -> int:
    return max(live_profile(p, order, model), default=0)


def need_bound(p: ScheduleProblem) -> tuple[int, int]:
    """(bytes, op): the largest working set of one op, a lower bound on any plan's device peak."""
    best, op = 0, 0
    for v, u in enumerate(p.uses):
        b = sum(p.sizes[t] for t in set(u))
        if b > best:
            best, op = b, v
    return best, op


def require_capacity(p: ScheduleProblem, capacity: int) -> None:
    """Raise `InfeasibleBudget` when one op's working set alone exceeds `capacity`."""
    need, op = need_bound(p)
    if need <= capacity:
        return
    ts = sorted(set(p.uses[op]), key=lambda t: -p.sizes[t])
    names = [f"{p.tensor_names[t] if p.tensor_names else t} ({p.sizes[t]} bytes)" for t in ts]
    what = p.op_names[op] if p.op_names else f"op {op}"
    raise InfeasibleBudget(
        f"device capacity {capacity} bytes is below what {what} alone needs on the device: "
        f"{need} bytes (its operands: {', '.join(names[:8])}). No order or replacement can go below "
        f"{need} bytes; raise the capacity to at least that.",
        need,
        capacity,
        names,
    )


def replay(
    p: ScheduleProblem, order: list[int] | tuple[int, ...], kept: dict[tuple[int, int], bool]
) -> Replacement:
    """The replacement in which tensor t stays on the device between its i-th and (i+1)-th use when
    `kept[(t, i)]` (missing: it leaves), with its traffic and the peak of the resulting residency."""
    steps = use_steps(p, order)
    writers = _write_steps(p, order)
    residences: list[Residence] = []
    loads = stores = 0
    for t, s in enumerate(steps):
        if not s:
            continue
        dirty, start, loaded = False, s[0], p.initial[t] or s[0] not in writers[t]
        for i, k in enumerate(s):
            dirty = dirty or k in writers[t]
            last = i == len(s) - 1
            if not last and kept.get((t, i), False):
                continue
            stored = dirty and (not last or p.keep[t])
            residences.append(Residence(t, start, k + 1, loaded, stored))
            loads += p.sizes[t] if loaded else 0
            stores += p.sizes[t] if stored else 0
            if stored:
                dirty = False
            if not last:
                start, loaded = s[i + 1], True
    return _finish(p, order, residences, loads, stores)


def _write_steps(p: ScheduleProblem, order: list[int] | tuple[int, ...]) -> list[set[int]]:
    out: list[set[int]] = [set() for _ in range(p.n_tensors)]
    for k, v in enumerate(order):
        for t in p.writes[v]:
            out[t].add(k)
    return out


def _finish(
    p: ScheduleProblem, order: list[int] | tuple[int, ...], res: list[Residence], loads: int, stores: int
) -> Replacement:
    n = len(order)
    diff = [0] * (n + 1)
    for r in res:
        diff[r.start] += p.sizes[r.tensor]
        diff[r.end] -= p.sizes[r.tensor]
    top = cur = 0
    for k in range(n):
        cur += diff[k]
        top = max(top, cur)
    res.sort(key=lambda r: (r.start, r.tensor))
    return Replacement(tuple(res), loads, stores, compulsory_bytes(p), top)


def belady(p: ScheduleProblem, order: list[int] | tuple[int, ...], capacity: int) -> Replacement:
    """Belady's replacement on `order`: load what an op needs just before it, and when the device is full
    evict the tensor whose next use is furthest away (written out if dirty)."""
    require_capacity(p, capacity)
    steps = use_steps(p, order)
    writers = _write_steps(p, order)
    nxt = [0] * p.n_tensors  # index into steps[t] of the next use
    resident: dict[int, tuple[int, bool]] = {}  # tensor -> (start, loaded)
    dirty = [False] * p.n_tensors
    heap: list[tuple[int, int]] = []
    total = loads = stores = 0
    residences: list[Residence] = []

    def leave(t: int, end: int, final: bool) -> None:
        nonlocal total, stores
        start, loaded = resident.pop(t)
        stored = dirty[t] and (not final or p.keep[t])
        residences.append(Residence(t, start, end, loaded, stored))
        stores += p.sizes[t] if stored else 0
        dirty[t] = dirty[t] and not stored
        total -= p.sizes[t]

    for k, v in enumerate(order):
        need = set(p.uses[v])
        for t in need:
            if t not in resident:
                made = k in writers[t] and not p.initial[t] and nxt[t] == 0
                resident[t] = (k, not made)
                loads += 0 if made else p.sizes[t]
                total += p.sizes[t]
        held: list[tuple[int, int]] = []
        while total > capacity:
            if not heap:
                raise InternalError("belady: nothing left to evict under a feasible capacity")
            key, t = heapq.heappop(heap)
            if t not in resident or -key != steps[t][nxt[t]]:
                continue
            if t in need:
                held.append((key, t))
                continue
            leave(t, k, False)
        for item in held:
            heapq.heappush(heap, item)
        for t in need:
            if k in writers[t]:
                dirty[t] = True
            nxt[t] += 1
            if nxt[t] == len(steps[t]):
                leave(t, k + 1, True)
            else:
                heapq.heappush(heap, (-steps[t][nxt[t]], t))
    return _finish(p, order, residences, loads, stores)


def check_replacement(
    p: ScheduleProblem, order: list[int] | tuple[int, ...], capacity: int, rep: Replacement
) -> None:
    """Raise `InternalError` unless every use finds its tensor resident, residences of one tensor do not
    overlap, a residence not loaded starts at a write, and no step holds more than `capacity`."""
    n = len(order)
    writers = _write_steps(p, order)
    on: dict[int, list[tuple[int, int]]] = {}
    for r in rep.residences:
        if not r.loaded and (r.start not in writers[r.tensor] or p.initial[r.tensor]):
            raise InternalError(f"schedule: tensor {r.tensor} appears at step {r.start} without a load")
        on.setdefault(r.tensor, []).append((r.start, r.end))
    for t, spans in on.items():
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
            raise InternalError(f"schedule: tensor {t} has overlapping residences")
    for k, v in enumerate(order):
        for t in p.uses[v]:
            if not any(s <= k < e for s, e in on.get(t, ())):
                raise InternalError(f"schedule: step {k} uses tensor {t}, which is not on the device")
    diff = [0] * (n + 1)
    for r in rep.residences:
        diff[r.start] += p.sizes[r.tensor]
        diff[r.end] -= p.sizes[r.tensor]
    cur = 0
    for k in range(n):
        cur += diff[k]
        if cur > capacity:
            raise InternalError(f"schedule: {cur} bytes on the device at step {k}, over {capacity}")
