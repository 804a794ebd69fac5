"""Per-block recomputation as one more `remat_swap` decision: re-run the whole forward of a repeated layer
once, at the start of its backward, and rebuild every activation it saved (what `torch.utils.checkpoint`
does per block), instead of rebuilding tensors one closure at a time.

A block is layer L's forward ops (in schedule order). Its *members* are the saved activations produced by
those ops and read in the forward only by them (the layer's output, read by the next layer, is not a
member: it stays under its own decision, as checkpointing saves a block's input). Checkpointing block L:

    member c   device [p, f+1) + device [B, l+1)        B: the first backward use of any member
    re-run     every forward op of L, once, just before step B (the block's forward time)
    transients the storages the re-run makes that are not members, each dropped after its last read in
               the re-run; the plan counts, at [B, B+1), those live together at the re-run's worst moment

The re-run reads the block's *frontier*: saved activations the block makes but does not rebuild (read by
the next layer too), which must be on the device at B, and values made outside the block: saved
activations (which must be on the device at B), values still live then, and values that died earlier (an
attention mask made once for all layers): those are *held* on the device until B, as checkpointing holds a
block's inputs. A block whose forward writes in place has no such option.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from memplan.ir.analysis import lifetimes
from memplan.ir.cost import op_time_s
from memplan.ir.graph import PERSISTENT_ROLES, Graph
from memplan.ir.hardware import Hardware
from memplan.ir.phases import Phases, last_reads, uses_by_root, written_in_place
from memplan.passes.remat_candidates import Candidate


@dataclass(frozen=True)
class Block:
    """One layer whose forward can be re-run at the start of its backward (see module docstring)."""

    layer: int
    ops: tuple[int, ...]
    members: tuple[int, ...]
    """Candidate storages rebuilt by the re-run (dropped after their last forward use until then)."""
    frontier: tuple[int, ...]
    """Candidate storages from outside the block that the re-run reads: on the device at `rebuild_step`."""
    transient: tuple[int, ...]
    """Other storages the re-run makes, dropped during it (`rerun_drops`)."""
    peak_transient: tuple[int, ...]
    """The transients live together at the re-run's worst moment: what the plan counts at `rebuild_step`."""
    transient_bytes: int
    held: tuple[tuple[int, int, int], ...]
    """(storage, step its life ends, bytes) of the values made outside and dead before `rebuild_step`: held
    on the device until then."""
    rebuild_step: int
    recompute_s: float
    signature: tuple[str, ...]
    """The ops' targets: blocks with the same signature share a decision in the per-layer formulation."""


def find_blocks(graph: Graph, hw: Hardware, cands: list[Candidate], ph: Phases) -> list[Block]:
    """Every repeated layer whose forward can be checkpointed, with its members and costs."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, op in enumerate(graph.ops[: ph.fwd_end]):
        if op.layer is not None:
            by_layer[op.layer].append(i)
    cand_by_id = {c.value_id: c for c in cands}
    life = lifetimes(graph)
    inplace = written_in_place(graph)
    uses = uses_by_root(graph)
    blocks = []
    for layer, ops in sorted(by_layer.items()):
        block = _block(graph, hw, layer, tuple(ops), cand_by_id, life, inplace, uses, ph)
        if block is not None:
            blocks.append(block)
    return blocks


def _block(
    graph: Graph,
    hw: Hardware,
    layer: int,
    ops: tuple[int, ...],
    cands: dict[int, Candidate],
    life: dict[int, tuple[int, int]],
    inplace: set[int],
    uses: dict[int, list[int]],
    ph: Phases,
) -> Block | None:
    inside = set(ops)
    outs = {graph.storage_of(v) for i in ops for v in graph.ops[i].outputs}
    if outs & inplace:
        return None
    made = {r for r in outs if graph.producer(r) in inside}  # not the parameters its views alias
    members = sorted(r for r in made if r in cands and all(u in inside for u in uses[r] if u < ph.fwd_end))
    if not members:
        return None
    rebuild = min(cands[r].first_bwd_use for r in members)
    frontier: set[int] = set()
    held: set[tuple[int, int, int]] = set()
    for i in ops:
        for vid in graph.ops[i].inputs:
            root = graph.storage_of(vid)
            if root in made and root in cands and root not in members:
                frontier.add(root)  # made here, saved, read by the next layer too: not rebuilt, needed
                continue
            if root in made or graph.value(root).role in PERSISTENT_ROLES:
                continue
            if root in cands:
                frontier.add(root)
            elif life[root][1] <= rebuild:
                held.add((root, life[root][1], graph.value(root).size_bytes))
    transient = tuple(sorted(r for r in made if r not in cands and graph.value(r).size_bytes > 0))
    worst = _worst_moment(graph, ops, transient)
    return Block(
        layer,
        ops,
        tuple(members),
        tuple(sorted(frontier)),
        transient,
        worst,
        sum(graph.value(r).size_bytes for r in worst),
        tuple(sorted(held)),
        rebuild,
        float(sum(op_time_s(graph.ops[i], hw) for i in ops)),
        tuple(graph.ops[i].target for i in ops),
    )


def _worst_moment(graph: Graph, ops: tuple[int, ...], transient: tuple[int, ...]) -> tuple[int, ...]:
    """The transients live together (an op's outputs beside its inputs) when their bytes peak in the
    re-run."""
    wanted = set(transient)
    drops = last_reads(graph, ops, transient)
    live: set[int] = set()
    worst: tuple[int, ...] = ()
    worst_bytes = 0
    for i in ops:
        live |= {graph.storage_of(v) for v in graph.ops[i].outputs} & wanted
        now = sum(graph.value(r).size_bytes for r in live)
        if now > worst_bytes:
            worst, worst_bytes = tuple(sorted(live)), now
        live -= set(drops.get(i, ()))
    return worst
