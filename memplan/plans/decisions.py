"""One typed decision record per pass, the part of a plan a runtime follows beyond residency and events.

Every field is plain data with units in its name; schedule positions are *steps* (indices into the plan's
op order, see `memplan.plans.effective`), operators are named by *op id* and tensors by *value id*, so a
record stays valid whatever order a `schedule` pass chose. `Decisions` holds at most one record per pass;
a pass adds its own and never rewrites another's (`Decisions.with_`).

    pass         record               what it says
    schedule     OrderDecision        the op order: a permutation of op ids (step k runs op_ids[k])
    bitwidth     BitsDecision         per tensor: storage format, bits, group size, scale layout; the
                                      priced candidates it chose from
    kv_budget    KVDecision           per layer (and head): tokens kept and their bits
    remat_swap   RematDecision        per saved activation: keep / swap / recompute / split; blocks
    placement    PlacementDecision    per tensor (or slice): home tier, its device copies (prefetch, evict)
    allocate     AllocateDecision     per tier: the arena and how it was packed (offsets: Plan.offsets)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

RematKind = Literal["keep", "swap", "recompute", "split"]
QuantFormat = Literal["fp32", "fp16", "bf16", "int8", "int4", "int3", "int2"]
ScaleLayout = Literal["none", "per-tensor", "per-channel", "per-group"]

FORMAT_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
"""Bits per element of each storage format (the payload; scales and zero points come on top)."""
DTYPE_FORMAT: dict[str, QuantFormat] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
"""The storage format of each float dtype a tensor can be captured in (a tensor kept as it is)."""


@dataclass(frozen=True, slots=True)
class OrderDecision:
    """The schedule: step k runs the op whose id is `op_ids[k]`; a topological order of all the plan's ops."""

    op_ids: tuple[int, ...]


DEQUANT_BLOCK_BYTES = 1 << 20
"""The reference path dequantizes a 2-D integer weight a block of rows at a time, each block at most this
many fp32 bytes (`memplan.kernels.linear.reference_linear`), so its transient stays small."""
DEQUANT_BYTES_PER_ELEMENT = 15
"""Transient bytes per element of a block while it is dequantized (measured at 12.4-14.0 over the formats,
tests/kernels/test_linear.py checks the bound)."""


@dataclass(frozen=True, slots=True)
class TensorBits:
    """How one tensor is stored: `format` with `group_size` elements per scale (None: one scale per
    `scale_layout` unit), symmetric (no zero point) or not, scales in `scale_dtype`. Rows are all dims but
    the last, unless `transposed`: then the last two dims are swapped first (GPT-2's `Conv1D` keeps its
    weight as [in, out]; it is quantized as the [out, in] matrix a linear layer multiplies by)."""

    value_id: int
    format: QuantFormat
    group_size: int | None = None
    symmetric: bool = True
    scale_layout: ScaleLayout = "none"
    scale_dtype: str = "float16"
    transposed: bool = False

    @property
    def bits(self) -> int:
        return FORMAT_BITS[self.format]

    def quantized_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape whose rows are quantized: `shape`, or its last two dims swapped when `transposed`."""
        if self.transposed and len(shape) >= 2:
            return (*shape[:-2], shape[-1], shape[-2])
        return tuple(shape)

    def dequant_workspace_bytes(self, shape: tuple[int, ...]) -> int:
        """The most transient bytes one multiply by the stored weight allocates on the reference path: an
        fp16/bf16 weight cast whole to fp32; an integer one dequantized by blocks of rows of at most
        `DEQUANT_BLOCK_BYTES` as fp32, `DEQUANT_BYTES_PER_ELEMENT` each (unpacked codes, int32 shifts,
        the fp32 block)."""
        numel = 1
        for d in shape:
            numel *= d
        if self.format in ("fp16", "bf16", "fp32"):
            return 4 * numel
        cols = shape[-1] if shape else 1
        rows_per_block = max(1, DEQUANT_BLOCK_BYTES // (4 * cols))
        return DEQUANT_BYTES_PER_ELEMENT * min(numel, rows_per_block * cols)

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the packed payload plus its scales (and zero points when asymmetric)."""
        shape = self.quantized_shape(shape)
        numel = 1
        for d in shape:
            numel *= d
        payload = (numel * self.bits + 7) // 8
        scale_bytes = 2 if self.scale_dtype in ("float16", "bfloat16") else 4
        per_scale = scale_bytes * (1 if self.symmetric else 2)
        if self.scale_layout == "none":
            return payload
        if self.scale_layout == "per-tensor":
            return payload + per_scale
        rows = numel // shape[-1] if shape and shape[-1] else 1
        if self.scale_layout == "per-channel":
            return payload + per_scale * rows
        group = self.group_size or (shape[-1] if shape else 1)
        return payload + per_scale * -(-numel // group)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A storage format the bitwidth pass may give a tensor, without the tensor. `group_size` is the group
    wanted; a tensor whose rows it does not divide gets the largest divisor below it (`for_tensor`).
    `label` names the format across tensors (ties match formats by label)."""

    format: QuantFormat
    symmetric: bool = True
    scale_layout: ScaleLayout = "none"
    group_size: int | None = None
    scale_dtype: str = "float16"

    @property
    def label(self) -> str:
        """`fp16`, `int8-ch-sym`, `int4-g128-asym`...: unique among a pass's candidates."""
        if self.scale_layout == "none":
            return self.format
        where = {"per-tensor": "t", "per-channel": "ch"}.get(self.scale_layout, f"g{self.group_size or ''}")
        return f"{self.format}-{where}-{'sym' if self.symmetric else 'asym'}"

    def for_tensor(self, value_id: int, shape: tuple[int, ...], transposed: bool = False) -> TensorBits:
        """This format for one tensor of (stored) `shape`, its group fitted to the quantized rows."""
        spec = TensorBits(value_id, self.format, None, self.symmetric, self.scale_layout, self.scale_dtype,
                          transposed)  # fmt: skip
        if self.scale_layout != "per-group":
            return spec
        cols = spec.quantized_shape(shape)[-1]
        return replace(spec, group_size=largest_divisor(cols, self.group_size or cols))


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (at least 1)."""
    return next(d for d in range(max(min(n, at_most), 1), 0, -1) if n % d == 0)


@dataclass(frozen=True, slots=True)
class CandidateCost:
    """One candidate format of one tensor, priced: its spec (`bits`), the loss increase it is predicted to
    cause (`cost`, in nats: the sensitivity, see `memplan.planner.sensitivity`) and its stored bytes."""

    label: str
    bits: TensorBits
    cost: float
    stored_bytes: int


@dataclass(frozen=True, slots=True)
class TensorCandidates:
    """The formats one quantizable tensor could take, each priced. `curvature` estimates the mean Hessian
    diagonal Tr(H)/n of the loss with respect to the tensor (`estimator`: `hutchinson`, or `fisher`, the
    mean squared gradient); a candidate's cost is `curvature / 2 * ||W - dequantize(quantize(W))||^2`."""

    value_id: int
    curvature: float
    estimator: str
    candidates: tuple[CandidateCost, ...]

    def candidate(self, label: str) -> CandidateCost | None:
        return next((c for c in self.candidates if c.label == label), None)


@dataclass(frozen=True, slots=True)
class BitsDecision:
    """The storage format of each tensor the bitwidth pass quantized (tensors not listed keep their dtype),
    and what it chose from: every quantizable tensor's priced candidates (its own dtype among them, at cost
    0), the groups of tensors that must share a format (`ties`, value ids), and how the sensitivity was
    measured (`sensitivity`, in words). A later pass that trades bits against placement reads
    `candidates`."""

    tensors: tuple[TensorBits, ...]
    candidates: tuple[TensorCandidates, ...] = ()
    ties: tuple[tuple[int, ...], ...] = ()
    sensitivity: str = ""

    def of(self, value_id: int) -> TensorBits | None:
        """The format chosen for `value_id` (None: it keeps its dtype)."""
        return next((b for b in self.tensors if b.value_id == value_id), None)


KV_BITS = (8, 4, 2)
"""The bit widths a KV budget may store tokens at (None: the cache's own dtype)."""

KV_SCALE_BYTES = 2
"""A quantized KV group's scale and its zero point are each one fp16."""


@dataclass(frozen=True, slots=True)
class KVBudget:
    """The KV cache of one layer (or of one key/value head of it, `head` not None): at most `tokens` tokens
    per sequence at every step of the generation (sinks and the recent window included), stored at `bits`
    (None: the cache's own dtype; 8, 4 or 2: asymmetric, per token in groups of `KVDecision.group_size`
    elements along the head dimension, an fp16 scale and zero point per group)."""

    layer: int
    tokens: int
    bits: int | None = None
    head: int | None = None
    size_bytes: int = 0
    """What the budget holds for the whole batch: tokens x `kv_token_bytes` x batch (x the layer's key/value
    heads when `head` is None)."""
    index_bytes: int = 0
    """Bookkeeping held beside it on the device: an fp32 score and an int64 position per kept token."""
    work_bytes: int = 0
    """The transient while its layer runs: twice its tokens at the cache dtype (the keys and values handed
    to attention, dequantized; the eviction's candidates)."""


@dataclass(frozen=True, slots=True)
class KVHeadStats:
    """What calibration saw in one key/value head (`head` None: a layer's heads together), averaged over the
    calibration sequences. `mass[i]`: the share of the observation window's attention that the top
    `ratios[i]` of the prompt's tokens (by that attention) receive, PrefixKV's cumulative priority curve;
    `entropy`: the window queries' mean attention entropy (nats); `sink_mass` / `recent_mass`: the share
    paid to the first sink / last recent tokens; `errors[i][j]`: the relative squared error of the attention
    output of the tokens after the prompt when the cache keeps `ratios[i]` of the prompt (by the runtime's
    rule) at `bits[j]`."""

    layer: int
    head: int | None
    mass: tuple[float, ...]
    entropy: float
    sink_mass: float
    recent_mass: float
    errors: tuple[tuple[float, ...], ...]


@dataclass(frozen=True, slots=True)
class KVCalibration:
    """Attention statistics of a model on calibration text (see `KVHeadStats`), with the model's cache
    geometry: `layers`, key/value heads per layer, head dim and the cache dtype's bytes."""

    ratios: tuple[float, ...]
    bits: tuple[int | None, ...]
    heads: tuple[KVHeadStats, ...]
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    prompt: int
    """Tokens of each calibration prompt; the errors are measured on the `follow` tokens after it."""
    follow: int
    samples: int

    def of(self, layer: int, head: int | None = None) -> KVHeadStats:
        """The statistics of `layer` (of its key/value `head`; None: the layer's heads together)."""
        return next(h for h in self.heads if h.layer == layer and h.head == head)


@dataclass(frozen=True, slots=True)
class KVDecision:
    """Per-layer (and per-head) KV budgets. The first `sink_tokens` and the last `recent_tokens` tokens are
    never evicted; the prefill scores every token by the attention the last `window` prompt tokens pay
    it (SnapKV's observation window). A layer without a budget keeps its whole cache. `method` says how the
    budgets were allocated; `context` is the tokens per sequence (prompt + generated) they were planned
    for and `budget_bytes` the KV byte budget asked (whole batch; 0: none); `calibration` what they were
    chosen from."""

    budgets: tuple[KVBudget, ...]
    sink_tokens: int = 0
    recent_tokens: int = 0
    window: int = 8
    group_size: int = 32
    method: str = ""
    context: int = 0
    budget_bytes: int = 0
    calibration: KVCalibration | None = None

    @property
    def planned_bytes(self) -> int:
        """The bytes the budgets hold (whole batch)."""
        return sum(b.size_bytes for b in self.budgets)

    def of(self, layer: int, head: int | None = None) -> KVBudget | None:
        """The budget of `layer` (of its `head` when budgets are per head)."""
        return next((b for b in self.budgets if b.layer == layer and b.head == head), None)


KV_INDEX_BYTES = 12
"""Per kept token and key/value head: its fp32 score and int64 position (`memplan.runtime.kv_cache`)."""


def kv_token_bytes(head_dim: int, bits: int | None, dtype_bytes: int, group_size: int) -> int:
    """Bytes one token's key and value take in one key/value head, stored at `bits` (see `KVBudget`)."""
    if bits is None:
        return 2 * head_dim * dtype_bytes
    if bits not in KV_BITS or head_dim * bits % 8 or head_dim % group_size:
        raise ValueError(f"kv: {bits} bits in groups of {group_size} does not pack a head of {head_dim}")
    return 2 * (head_dim * bits // 8 + head_dim // group_size * 2 * KV_SCALE_BYTES)


@dataclass(frozen=True, slots=True)
class TensorRemat:
    """What happens to one activation a training step saves for its backward. Steps are schedule steps:
    made at `produced`, last read by the forward at `last_fwd_use`, first and last read by the backward at
    `first_bwd_use` and `last_use`. A swap (or split) writes it out after `produced`, frees the device
    copy at `write_done_step`, reads it back from `prefetch_step`; a recompute re-runs `recompute_ops`
    (op ids, in order) before `first_bwd_use`, rebuilding `recompute_transient` on the way; a split swaps
    its first `swap_rows` of `rows` rows and recomputes the others (`rows` is 0 when the tensor cannot be
    split); `block` names the layer whose checkpointed block rebuilds it instead."""

    value_id: int
    name: str
    decision: RematKind
    size_bytes: int
    layer: int | None
    produced: int
    last_fwd_use: int
    first_bwd_use: int
    last_use: int
    write_done_step: int
    prefetch_step: int
    recompute_ops: tuple[int, ...] = ()
    recompute_transient: tuple[int, ...] = ()
    view_ops: tuple[int, ...] = ()
    """Ops (ids) that rebuild the views of a swapped value once it is back."""
    rows: int = 0
    swap_rows: int = 0
    block: int | None = None

    @property
    def swap_fraction(self) -> float:
        """Share of the tensor that goes to the tier: 1 for a swap, swap_rows / rows for a split, else 0."""
        if self.decision == "swap":
            return 1.0
        return self.swap_rows / self.rows if self.decision == "split" else 0.0


@dataclass(frozen=True, slots=True)
class BlockRemat:
    """A checkpointed layer: one re-run of its forward `ops` (ids) at `rebuild_step` rebuilds `members`
    (its saved activations); `transient` are the other values the re-run makes, `peak_transient` the ones
    live at its worst moment (the plan holds those through the rebuild step)."""

    layer: int
    rebuild_step: int
    ops: tuple[int, ...]
    members: tuple[int, ...]
    transient: tuple[int, ...] = ()
    peak_transient: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RematDecision:
    """The remat_swap pass's decisions: `tier` is where swaps go (None: no swap tier)."""

    tier: str | None
    tensors: tuple[TensorRemat, ...]
    blocks: tuple[BlockRemat, ...] = ()

    def moved(self) -> tuple[TensorRemat, ...]:
        """The tensors not simply kept."""
        return tuple(t for t in self.tensors if t.decision != "keep")

    @property
    def swaps(self) -> bool:
        """True when some tensor (or part of one) goes to the tier."""
        return any(t.decision in ("swap", "split") for t in self.tensors)


@dataclass(frozen=True, slots=True)
class DeviceCopy:
    """A copy of a placed storage on the device: read from its tier starting at step `prefetch_step`,
    dropped after step `evict_step` (the step of its last use in this visit)."""

    prefetch_step: int
    evict_step: int


@dataclass(frozen=True, slots=True)
class TensorPlacement:
    """Where one storage (or the byte slice `[start_byte, start_byte + length_bytes)` of it) lives: its home
    `tier`, and, when that is not the device, the device copies that bring it where it is used, in step
    order (none: never brought to the device). A weight streamed through every forward of a generation has
    one copy per use."""

    value_id: int
    tier: str
    start_byte: int = 0
    length_bytes: int | None = None
    """None: the whole storage."""
    copies: tuple[DeviceCopy, ...] = ()


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    """Home tiers of the tensors that do not live on the device (a tensor not listed lives there)."""

    tensors: tuple[TensorPlacement, ...]


@dataclass(frozen=True, slots=True)
class Arena:
    """One contiguous region of a tier that holds its planned storages at their offsets."""

    id: str
    tier: str
    size_bytes: int
    alignment_bytes: int


@dataclass(frozen=True, slots=True)
class TierPacking:
    """How one tier's arena was packed: its height against the max-load bound, by which solver."""

    tier: str
    arena_bytes: int
    lower_bound_bytes: int
    status: str
    solver: str
    buffers: int
    time_s: float


@dataclass(frozen=True, slots=True)
class AllocateDecision:
    """The allocate pass: the arenas (offsets of every storage are in `Plan.offsets`) and each packing."""

    arenas: tuple[Arena, ...]
    packings: tuple[TierPacking, ...]

    def packing(self, tier: str) -> TierPacking | None:
        return next((p for p in self.packings if p.tier == tier), None)


PASS_OF_FIELD: dict[str, str] = {
    "order": "schedule",
    "bits": "bitwidth",
    "kv": "kv_budget",
    "remat": "remat_swap",
    "placement": "placement",
    "allocate": "allocate",
}
"""Which pass writes each field of `Decisions`."""


@dataclass(frozen=True, slots=True)
class Decisions:
    """At most one record per pass; None where that pass has not run (or decided nothing)."""

    order: OrderDecision | None = None
    bits: BitsDecision | None = None
    kv: KVDecision | None = None
    remat: RematDecision | None = None
    placement: PlacementDecision | None = None
    allocate: AllocateDecision | None = None

    def made(self) -> frozenset[str]:
        """Names of the fields that hold a record."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def with_(self, **records: object) -> Decisions:
        """A copy with some records set (decisions are immutable)."""
        return replace(self, **records)
