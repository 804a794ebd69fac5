"""Per-node cost estimates for ONNX operators, from the operand shapes that shape inference gives.

FLOPs count a multiply-add as two. The formulas:

- MatMul-like (MatMul, MatMulInteger, FusedMatMul, MatMulNBits): `2 * numel(Y) * K`, K the contracted dim.
- Gemm: `2 * numel(Y) * K`, plus `numel(Y)` when the bias C is given.
- Conv: `2 * numel(Y) * prod(W.shape[1:])` (C_in/group * kernel), plus `numel(Y)` for a bias.
- ConvTranspose: `2 * numel(X) * prod(W.shape[1:])` (each input element scatters to C_out/group * kernel).
- Attention-like (Attention; com.microsoft Attention, MultiHeadAttention, GroupQueryAttention): QK^T and
  PV each cost `2 * Sq * Skv * D` per head, i.e. `4 * Skv * numel(Y)` when Q and V share the head dim;
  Skv is read from the present-key output when there is one (it includes the past), else from K.
  com.microsoft.Attention also projects QKV: `2 * numel(X) * W.shape[1]`.
- Pointwise ops: one FLOP per output element. Reductions: one per input element. Normalisations and
  softmax: a few per input element (`PER_ELEMENT`). Pools: `numel(Y) * prod(kernel_shape)`.
- Data movement (Transpose, Concat, Gather, Slice...): zero FLOPs; views (`ALIAS_OPS`) cost nothing at all,
  since runtimes execute them in place (see the frontend's docstring).

`bytes_read`/`bytes_written` are the logical bytes of the operands (numel * element size), whatever storage
they live in. An op with no formula, or whose formula needs a shape that inference could not give, gets a
conservative `2 * (input elements + output elements)` FLOPs and `known=False`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

#: Ops whose output is a view of their first input (same storage in ONNX Runtime and in torch).
ALIAS_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})

POINTWISE = frozenset(
    """
    Add Sub Mul Div Pow Sqrt Exp Log Tanh Sigmoid Relu LeakyRelu Elu Selu Celu Gelu Erf Neg Abs Reciprocal
    Where Equal Less Greater LessOrEqual GreaterOrEqual And Or Not Xor Max Min Sum Mean Mod Cast CastLike Clip
    Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Floor Ceil Round Sign HardSigmoid HardSwish
    Softplus Softsign Mish Swish IsNaN IsInf PRelu ThresholdedRelu BitShift BitwiseAnd BitwiseOr BitwiseXor
    BitwiseNot Dropout QuantizeLinear DequantizeLinear DynamicQuantizeLinear Trilu Resize Upsample
    com.microsoft.Gelu com.microsoft.FastGelu com.microsoft.BiasGelu com.microsoft.QuickGelu
    com.microsoft.BiasAdd com.microsoft.BiasSplitGelu
    """.split()
)

REDUCTIONS = frozenset(
    """
    ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceSumSquare ArgMax ArgMin CumSum TopK GlobalAveragePool GlobalMaxPool GlobalLpPool
    """.split()
)

#: FLOPs per input element for normalisations and softmax (max, subtract, exp, sum, divide...).
PER_ELEMENT: Mapping[str, int] = {
    "Softmax": 5,
    "LogSoftmax": 5,
    "Hardmax": 2,
    "LayerNormalization": 8,
    "RMSNormalization": 4,
    "SimplifiedLayerNormalization": 4,
    "BatchNormalization": 2,
    "InstanceNormalization": 8,
    "GroupNormalization": 8,
    "LpNormalization": 3,
    "MeanVarianceNormalization": 8,
    "com.microsoft.SkipLayerNormalization": 9,
    "com.microsoft.SkipSimplifiedLayerNormalization": 5,
    "com.microsoft.SimplifiedLayerNormalization": 4,
    "com.microsoft.RotaryEmbedding": 3,
}

DATA_MOVEMENT = frozenset(
    """
    Transpose Concat Split Slice Gather GatherElements GatherND ScatterND ScatterElements Scatter Expand Tile
    Pad Shape Size Constant ConstantOfShape Range EyeLike OneHot NonZero Compress DepthToSpace SpaceToDepth
    ReverseSequence SplitToSequence SequenceAt SequenceConstruct SequenceEmpty SequenceInsert
    ConcatFromSequence
    """.split()
)

#: Ops that read only their inputs' metadata, never the data.
METADATA_ONLY = frozenset({"Shape", "Size"})


class CostStatus(StrEnum):
    """How a cost was obtained."""

    FORMULA = "formula"
    NO_FORMULA = "no_formula"
    """The op type has no formula: conservative estimate."""
    NO_SHAPE = "no_shape"
    """A formula exists but an operand shape it needs is unknown: conservative estimate."""


@dataclass(frozen=True, slots=True)
class Operand:
    """One tensor operand as the cost model sees it: its shape (None when unknown) and logical bytes."""

    shape: tuple[int, ...] | None
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the cost model needs from one ONNX node. An omitted optional operand is None."""

    target: str
    """Op type, prefixed by its domain when not the default one ("com.microsoft.Attention")."""
    inputs: tuple[Operand | None, ...]
    outputs: tuple[Operand | None, ...]
    attrs: Mapping[str, int | tuple[int, ...]]
    """The node's INT and INTS attributes."""


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: float
    bytes_read: int
    bytes_written: int
    status: CostStatus

    @property
    def known(self) -> bool:
        return self.status is CostStatus.FORMULA


def _shape(node: NodeInfo, i: int, *, output: bool = False) -> tuple[int, ...] | None:
    ops = node.outputs if output else node.inputs
    operand = ops[i] if i < len(ops) else None
    return operand.shape if operand is not None else None


def _numel(node: NodeInfo, i: int, *, output: bool = False) -> int | None:
    shape = _shape(node, i, output=output)
    return math.prod(shape) if shape is not None else None


def _has_input(node: NodeInfo, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] is not None


def _matmul(node: NodeInfo) -> float | None:
    a, y = _shape(node, 0), _numel(node, 0, output=True)
    k = node.attrs.get("K") if node.target == "com.microsoft.MatMulNBits" else (a[-1] if a else None)
    if not isinstance(k, int) or y is None:
        return None
    return 2.0 * y * k


def _gemm(node: NodeInfo) -> float | None:
    a, y = _shape(node, 0), _numel(node, 0, output=True)
    if a is None or len(a) != 2 or y is None:
        return None
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return 2.0 * y * k + (y if _has_input(node, 2) else 0)


def _conv(node: NodeInfo) -> float | None:
    w, y = _shape(node, 1), _numel(node, 0, output=True)
    if w is None or y is None:
        return None
    return 2.0 * y * math.prod(w[1:]) + (y if _has_input(node, 2) else 0)


def _conv_transpose(node: NodeInfo) -> float | None:
    x, w, y = _numel(node, 0), _shape(node, 1), _numel(node, 0, output=True)
    if x is None or w is None or y is None:
        return None
    return 2.0 * x * math.prod(w[1:]) + (y if _has_input(node, 2) else 0)


def _kv_length(node: NodeInfo, key_index: int) -> int | None:
    """Keys attended to: from the present-key output (past included) if any, else from the key input."""
    present = _shape(node, 1, output=True)
    if present is not None and len(present) >= 2:
        return present[-2]
    key = _shape(node, key_index)
    if key is None:
        return None
    return key[-2] if len(key) == 4 else key[1] if len(key) == 3 else None


def _attention(node: NodeInfo) -> float | None:
    y = _numel(node, 0, output=True)
    if node.target == "com.microsoft.Attention":
        x, w = _shape(node, 0), _shape(node, 1)
        if x is None or w is None or y is None or len(x) != 3:
            return None
        skv = _kv_length(node, key_index=0)  # no key input: keys are the tokens of X (plus the past)
        return 2.0 * math.prod(x) * w[1] + 4.0 * y * (skv or x[1])
    skv = _kv_length(node, key_index=1)
    if y is None or skv is None:
        return None
    return 4.0 * y * skv


def _pool(node: NodeInfo) -> float | None:
    kernel, y = node.attrs.get("kernel_shape"), _numel(node, 0, output=True)
    if not isinstance(kernel, tuple) or y is None:
        return None
    return float(y * math.prod(kernel))


_FORMULAS: Mapping[str, Callable[[NodeInfo], float | None]] = {
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "com.microsoft.FusedMatMul": _matmul,
    "com.microsoft.MatMulNBits": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvInteger": _conv,
    "ConvTranspose": _conv_transpose,
    "Attention": _attention,
    "com.microsoft.Attention": _attention,
    "com.microsoft.MultiHeadAttention": _attention,
    "com.microsoft.GroupQueryAttention": _attention,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "LpPool": _pool,
}


def _pointwise(node: NodeInfo) -> float | None:
    y = _numel(node, 0, output=True)
    return float(y) if y is not None else None


def _reduction(node: NodeInfo) -> float | None:
    x = _numel(node, 0)
    return float(x) if x is not None else None


def _per_element(node: NodeInfo) -> float | None:
    x = _numel(node, 0)
    return float(PER_ELEMENT[node.target] * x) if x is not None else None


def _data_movement(node: NodeInfo) -> float | None:
    return 0.0


def formula_for(target: str) -> Callable[[NodeInfo], float | None] | None:
    """The FLOP formula for an op type (returning None when a shape it needs is unknown), if there is one."""
    if target in _FORMULAS:
        return _FORMULAS[target]
    if target in POINTWISE:
        return _pointwise
    if target in REDUCTIONS:
        return _reduction
    if target in PER_ELEMENT:
        return _per_element
    if target in DATA_MOVEMENT or target in ALIAS_OPS:
        return _data_movement
    return None


def node_cost(node: NodeInfo) -> NodeCost:
    """FLOPs and bytes moved by one node (see the module docstring for the formulas)."""
    if node.target in ALIAS_OPS:
        return NodeCost(0.0, 0, 0, CostStatus.FORMULA)
    ins = [o for o in node.inputs if o is not None]
    outs = [o for o in node.outputs if o is not None]
    read = 0 if node.target in METADATA_ONLY else sum(o.nbytes for o in ins)
    written = sum(o.nbytes for o in outs)
    formula = formula_for(node.target)
    flops = formula(node) if formula is not None else None
    if flops is not None:
        return NodeCost(flops, read, written, CostStatus.FORMULA)
    status = CostStatus.NO_SHAPE if formula is not None else CostStatus.NO_FORMULA
    conservative = 2.0 * (sum(o.numel for o in ins) + sum(o.numel for o in outs))
    return NodeCost(conservative, read, written, status)
