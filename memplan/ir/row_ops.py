"""Which ATen ops work row by row: row i of the output reads only row i of its row-carrying inputs.

A row is all but the last dim (row-major: the tokens of a [batch, seq, hidden] activation). The `remat_swap`
pass splits a tensor by rows only when its whole recompute closure is made of these ops, and the runtime
re-runs them on a block of rows.
"""

from __future__ import annotations

ROW_POINTWISE = frozenset(
    f"aten.{n}"
    for n in (
        "add.Tensor",
        "sub.Tensor",
        "mul.Tensor",
        "div.Tensor",
        "add.Scalar",
        "mul.Scalar",
        "pow.Tensor_Scalar",
        "gelu.default",
        "relu.default",
        "silu.default",
        "tanh.default",
        "sigmoid.default",
        "rsqrt.default",
        "neg.default",
        "erf.default",
        "exp.default",
        "_to_copy.default",
        "clone.default",
    )
)
"""Elementwise ops: row i of the output reads row i of the inputs (and parameters broadcast over rows)."""
ROW_VIEWS = frozenset(
    [
        "aten.view.default",
        "aten._unsafe_view.default",
        "aten.reshape.default",
        "aten.alias.default",
        "aten.detach.default",
    ]
)
"""Views that keep the last dim: the same rows in the same order (identity on a [rows, last] block)."""
ROW_OPS = (
    ROW_POINTWISE
    | ROW_VIEWS
    | frozenset(["aten.mm.default", "aten.addmm.default", "aten.native_layer_norm.default", "aten.mean.dim"])
)
"""Ops a split's closure may run on a block of rows; `mm`/`addmm` with the rows as the left operand,
`native_layer_norm` and `mean.dim` over the last dim only."""
ROW_OPERAND = {"aten.mm.default": 0, "aten.addmm.default": 1}
"""The one input of a matmul that carries rows; its other inputs are parameters."""
