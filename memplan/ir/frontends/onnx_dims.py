"""Binding the symbolic dims of an ONNX model's inputs to numbers, and evaluating dim expressions.

Exporters name dynamic dims ("batch", "sequence", or torch's "s0", "s1") and annotate inner values with
expressions over them ("sequence + 1", "2*s0", "Max(1, s1)"). `bind_input_dims` gives every symbolic input
dim a value: `dim_values[name]` first, then `batch` for dims named like a batch (`BATCH_DIM_NAMES`) and
`seq` for dims named like a sequence (`SEQ_DIM_NAMES`); a dim nothing binds raises `InvalidInput` naming it
and the argument to pass. `eval_dim` evaluates an expression with a small whitelist over Python's `ast`
(integers, bound names, + - * // % and exact /, Max/Min), never `eval`.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import onnx

from memplan.errors import InvalidInput

#: Input dim names that `batch` binds, and those that `seq` binds (compared in lower case).
BATCH_DIM_NAMES = frozenset({"batch", "batch_size", "batchsize", "bs", "b", "n"})
SEQ_DIM_NAMES = frozenset({"seq", "sequence", "seq_len", "seqlen", "seq_length", "sequence_length", "tokens"})

_BINOPS: Mapping[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CALLS: Mapping[str, Callable[[list[int]], int]] = {"max": max, "Max": max, "min": min, "Min": min}


@dataclass(frozen=True)
class DimBindings:
    """Symbolic dim name -> value, and notes for the graph's warnings (flags that bound nothing)."""

    values: Mapping[str, int]
    notes: tuple[str, ...]

    def apply(self, vi: onnx.ValueInfoProto) -> None:
        """Replace the bound symbolic dims of `vi` by their values, in place."""
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in self.values:
                d.dim_value = self.values[d.dim_param]


def eval_dim(expr: str, values: Mapping[str, int]) -> int | None:
    """Value of a symbolic dim: a bound name or an integer expression over bound names ("sequence + 1",
    "2*s0", "Max(1, s1)"); None when it names an unbound dim or is not such an expression."""
    if expr in values:
        return values[expr]
    try:
        tree = ast.parse(expr[:200], mode="eval")
    except SyntaxError:
        return None
    value = _eval(tree.body, values)
    return value if value is not None and value >= 0 else None


def _eval(node: ast.expr, values: Mapping[str, int]) -> int | None:
    if isinstance(node, ast.Constant):
        return node.value if type(node.value) is int else None
    if isinstance(node, ast.Name):
        return values.get(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        x = _eval(node.operand, values)
        return None if x is None else -x
    if isinstance(node, ast.BinOp):
        return _eval_binop(node, values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        args = [_eval(a, values) for a in node.args]
        ints = [a for a in args if a is not None]
        return _CALLS[node.func.id](ints) if ints and len(ints) == len(args) else None
    return None


def _eval_binop(node: ast.BinOp, values: Mapping[str, int]) -> int | None:
    left, right = _eval(node.left, values), _eval(node.right, values)
    if left is None or right is None:
        return None
    if isinstance(node.op, ast.Div):  # sympy writes exact divisions with "/"
        return left // right if right and left % right == 0 else None
    if right == 0 and isinstance(node.op, (ast.FloorDiv, ast.Mod)):
        return None
    fn = _BINOPS.get(type(node.op))
    return fn(left, right) if fn is not None else None


def _flag_for(dim: str) -> str:
    if dim.lower() in BATCH_DIM_NAMES:
        return "batch=N"
    if dim.lower() in SEQ_DIM_NAMES:
        return "seq=N"
    return f"dim_values={{{dim!r}: N}}"


def bind_input_dims(
    graph: onnx.GraphProto, *, batch: int | None, seq: int | None, dim_values: Mapping[str, int]
) -> DimBindings:
    """Bind every symbolic dim of the graph's inputs (initializers excluded) or raise `InvalidInput`."""
    for key, v in (
        ("batch", batch),
        ("seq", seq),
        *((f"dim_values[{k!r}]", v) for k, v in dim_values.items()),
    ):
        if v is not None and (type(v) is not int or v < 1):
            raise InvalidInput(f"{key} must be a positive int, got {v!r}")
    weights = {t.name for t in graph.initializer}
    values: dict[str, int] = {}
    for vi in graph.input:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim if vi.name not in weights else ()):
            if d.HasField("dim_value"):
                continue
            if not d.dim_param:
                raise InvalidInput(
                    f"input {vi.name!r} has an unnamed dynamic dim at axis {axis}; re-export "
                    "the model with named dynamic dims (e.g. dynamic_shapes with Dim('batch'))"
                )
            bound = dim_values.get(d.dim_param)
            if bound is None:
                lower = d.dim_param.lower()
                bound = batch if lower in BATCH_DIM_NAMES else seq if lower in SEQ_DIM_NAMES else None
            if bound is None:
                raise InvalidInput(
                    f"input {vi.name!r} has symbolic dim {d.dim_param!r} (axis {axis}) that "
                    f"nothing binds; pass {_flag_for(d.dim_param)}"
                )
            values[d.dim_param] = bound
    return DimBindings(values, _binding_notes(values, batch, seq, dim_values))


def _binding_notes(
    values: Mapping[str, int], batch: int | None, seq: int | None, dim_values: Mapping[str, int]
) -> tuple[str, ...]:
    notes = [f"dim_values[{k!r}] ignored: no input has that dim" for k in dim_values if k not in values]
    for flag, v, names in (("batch", batch, BATCH_DIM_NAMES), ("seq", seq, SEQ_DIM_NAMES)):
        if v is not None and not any(k.lower() in names and k not in dim_values for k in values):
            notes.append(f"{flag}={v} ignored: no input dim it binds ({', '.join(sorted(names))})")
    return tuple(notes)
