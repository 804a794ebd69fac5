"""Per-op cost estimates for ATen ops: FLOPs from PyTorch's own flop formulas where they exist
(`torch.utils.flop_counter`: mm, addmm, bmm, convolution, attention), a per-element count for pointwise
and reduction ops, zero FLOPs for views and data movement, and a conservative estimate, flagged as
unknown, for everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

#: ATen op names (packet names) that move or create data without arithmetic.
DATA_MOVEMENT = frozenset(
    """
    clone copy copy_ _to_copy cat stack index index_select gather scatter scatter_add index_put index_put_
    embedding embedding_dense_backward slice_scatter select_scatter narrow constant_pad_nd empty empty_like
    empty_strided zeros zeros_like ones ones_like full full_like new_zeros new_empty new_ones scalar_tensor
    arange where masked_fill fill fill_ zero_ lift_fresh_copy _unsafe_view repeat tril triu split_with_sizes
    flip roll slice_backward select_backward _assert_tensor_metadata detach masked_fill_ expand_copy
    permute_copy view_copy alias_copy
    nll_loss_forward nll_loss_backward max_pool2d_with_indices max_pool2d_with_indices_backward
    """.split()
)

#: Ops costed at a few FLOPs per element (normalisations, softmax and their backward).
PER_ELEMENT_5 = frozenset(
    """
    _softmax _log_softmax _softmax_backward_data _log_softmax_backward_data native_layer_norm
    native_layer_norm_backward native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
    native_batch_norm_backward _fused_rms_norm _fused_rms_norm_backward var_mean
    """.split()
)


@dataclass(frozen=True, slots=True)
class OpCost:
    flops: float
    bytes_read: int
    bytes_written: int
    known: bool


def _tensors(xs: Any) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(xs) if isinstance(x, torch.Tensor)]


def _nbytes(ts: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def op_cost(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, aliasing: bool) -> OpCost:
    """Cost of one call of `target` on fake/real tensors `args`/`kwargs` producing `out`."""
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    read, written = _nbytes(ins), 0 if aliasing else _nbytes(outs)
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in flop_registry:
        try:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
            return OpCost(flops, read, written, True)
        except Exception:  # a formula that does not accept these arguments: fall through to estimates
            pass
    name = getattr(packet, "__name__", str(target)).split(".")[-1]
    out_elems = sum(t.numel() for t in outs)
    in_elems = sum(t.numel() for t in ins)
    tags = getattr(target, "tags", ())
    if aliasing or name in DATA_MOVEMENT:
        return OpCost(0.0, read, written, True)
    if torch.Tag.pointwise in tags:
        return OpCost(float(out_elems), read, written, True)
    if torch.Tag.reduction in tags or name in ("cumsum", "cumprod", "sort", "topk", "argmax", "argmin"):
        return OpCost(float(in_elems), read, written, True)
    if name in PER_ELEMENT_5:
        return OpCost(5.0 * max(in_elems, out_elems), read, written, True)
    # Unknown op: assume it touches every operand element a few times.
    return OpCost(4.0 * (in_elems + out_elems), read, written, False)
