"""Build the memory IR from an ONNX model file, without loading its weights.

    graph = from_onnx("model.onnx", batch=8, seq=512)

Steps:

1. Load the protobuf with `load_external_data=False`: weights stored as external data stay on disk, and
   parameter sizes come from each initializer's dims and data type alone.
2. Bind symbolic dims ("batch", "sequence", "s0"...) of the graph inputs to numbers: `dim_values` first,
   then `batch` for dims named like a batch (`BATCH_DIM_NAMES`) and `seq` for dims named like a sequence
   (`SEQ_DIM_NAMES`). An input dim left symbolic is an `InvalidInput` that names it and the argument to pass.
3. Check and shape-infer a *shape view* of the model: the same nodes, with large or external initializers
   replaced by typed graph inputs, so the proto stays small (`onnx.checker`, then
   `onnx.shape_inference.infer_shapes(data_prop=True)`; `infer_shapes_path` when even the view is over
   protobuf's 2 GB limit). Dims that inference leaves symbolic are resolved through the bindings; exporters
   such as torch.onnx (dynamo) annotate values with expressions like "sequence + 1", which are evaluated.
4. One `Value` per tensor: initializers are PARAMETERs, graph inputs INPUTs, node outputs that are graph
   outputs OUTPUTs, every other node output an ACTIVATION. One `Op` per node, in file order (ONNX requires
   topological order), targeted at its op type ("MatMul", or "com.microsoft.Attention" outside the default
   domain). Costs come from `onnx_costs`. A value whose shape inference could not make concrete gets size 0
   and shape (), and `Graph.warnings` names it; so does every op without a cost formula.

Aliasing: the outputs of Reshape, Squeeze, Unsqueeze, Flatten and Identity alias their first input
(`alias_of`, 0 bytes of their own). ONNX itself has no views, but ONNX Runtime registers these kernels with
`Alias(0, 0)`, so the output shares the input's buffer, and the torch program the file came from had views
there; counting them as copies would overstate the peak.

Module paths: from the `pkg.torch.onnx.name_scopes` metadata that torch.onnx (dynamo) writes on each node
(its last module scope, e.g. "transformer.h.3.attn"), else from a "/"-separated node name as the legacy
exporter writes it ("/transformer/h.3/attn/MatMul" -> "transformer.h.3.attn"), else from the node's first
input, since optimiser-created nodes belong where their data comes from. Initializers take their own
dotted name minus the last part. The layer index is the number that follows the first layer container
(`h`, `layers`, `layer`, `blocks`, `block`, `stages`) in the path.
"""

from __future__ import annotations

import ast
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from memplan.errors import CaptureError, InvalidInput
from memplan.ir.frontends.onnx_costs import ALIAS_OPS, CostStatus, NodeInfo, Operand, node_cost
from memplan.ir.frontends.onnx_dims import DimBindings, bind_input_dims, eval_dim
from memplan.ir.graph import Graph, Op, Role, Value

_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|stages)\.(\d+)(?:\.|$)")
_PROTO_LIMIT = 2**31 - 1
"""Largest protobuf that in-memory shape inference and checking accept."""
_INLINE_ELEMENTS = 4096
"""Initializers up to this many elements stay in the shape view (data propagation may need their values)."""
_MAX_NAMED = 10

#: Bits per element of each ONNX data type, with the dtype name memplan uses (torch's where it has one).
_DTYPES: Mapping[int, tuple[str, int]] = {
    onnx.TensorProto.FLOAT: ("float32", 32),
    onnx.TensorProto.UINT8: ("uint8", 8),
    onnx.TensorProto.INT8: ("int8", 8),
    onnx.TensorProto.UINT16: ("uint16", 16),
    onnx.TensorProto.INT16: ("int16", 16),
    onnx.TensorProto.INT32: ("int32", 32),
    onnx.TensorProto.INT64: ("int64", 64),
    onnx.TensorProto.BOOL: ("bool", 8),
    onnx.TensorProto.FLOAT16: ("float16", 16),
    onnx.TensorProto.DOUBLE: ("float64", 64),
    onnx.TensorProto.UINT32: ("uint32", 32),
    onnx.TensorProto.UINT64: ("uint64", 64),
    onnx.TensorProto.COMPLEX64: ("complex64", 64),
    onnx.TensorProto.COMPLEX128: ("complex128", 128),
    onnx.TensorProto.BFLOAT16: ("bfloat16", 16),
    onnx.TensorProto.FLOAT8E4M3FN: ("float8_e4m3fn", 8),
    onnx.TensorProto.FLOAT8E4M3FNUZ: ("float8_e4m3fnuz", 8),
    onnx.TensorProto.FLOAT8E5M2: ("float8_e5m2", 8),
    onnx.TensorProto.FLOAT8E5M2FNUZ: ("float8_e5m2fnuz", 8),
    onnx.TensorProto.UINT4: ("uint4", 4),
    onnx.TensorProto.INT4: ("int4", 4),
    onnx.TensorProto.FLOAT4E2M1: ("float4_e2m1fn", 4),
}


@dataclass(frozen=True, slots=True)
class _TensorType:
    """A tensor's dtype and concrete shape (None when unknown); `nbytes` is 0 when either is unknown."""

    dtype: str
    shape: tuple[int, ...] | None
    bits: int
    stored_bytes: int | None = None
    """Bytes actually stored when they differ from the dense size (sparse initializers)."""

    @property
    def nbytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        return 0 if self.shape is None else (math.prod(self.shape) * self.bits + 7) // 8


def from_onnx(
    path_or_model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    batch: int | None = None,
    seq: int | None = None,
    dim_values: dict[str, int] | None = None,
) -> Graph:
    """The memory IR of an ONNX model (a file path or a loaded `ModelProto`) for the given dim values.

    Raises `InvalidInput` for a missing or non-ONNX file, a model `onnx.checker` rejects, or an input dim
    left symbolic; `CaptureError` when shape inference fails on a valid model.
    """
    model, name = _load(path_or_model)
    bindings = bind_input_dims(model.graph, batch=batch, seq=seq, dim_values=dim_values or {})
    inferred = _infer_shapes(_shape_view(model, bindings))
    types = _type_table(model.graph, inferred.graph, bindings)
    return _build_graph(model.graph, name or model.graph.name, types, bindings.notes)


def _load(path_or_model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The model proto (external weights not loaded) and a name for the graph ("" for a proto)."""
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model, ""
    path = Path(path_or_model)
    if not path.is_file():
        raise InvalidInput(f"ONNX file not found: {str(path)!r}; pass the path of an existing .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidInput(
            f"{str(path)!r} is not an ONNX model ({e}); pass a .onnx file, e.g. one written by "
            "torch.onnx.export(model, args, path, dynamo=True)"
        ) from e
    return model, path.stem


def _shape_view(model: onnx.ModelProto, bindings: DimBindings) -> onnx.ModelProto:
    """A copy of `model` for checking and shape inference: input dims bound, big weights as typed inputs."""
    src = model.graph
    view = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(view, field, getattr(model, field))
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    graph = view.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    graph.sparse_initializer.extend(src.sparse_initializer)
    declared = {vi.name for vi in src.input}
    for t in src.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and math.prod(t.dims) <= _INLINE_ELEMENTS:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for vi in graph.input:
        bindings.apply(vi)
    return view


def _infer_shapes(view: onnx.ModelProto) -> onnx.ModelProto:
    """Check `view` and infer its shapes, in memory when it fits protobuf's limit, else through files
    (a temporary folder: the view references no external data of the original model)."""
    try:
        if view.ByteSize() <= _PROTO_LIMIT:
            onnx.checker.check_model(view)
            return onnx.shape_inference.infer_shapes(view, data_prop=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "view.onnx"), os.path.join(tmp, "inferred.onnx")
            onnx.save_model(
                view, src, save_as_external_data=True, location="view.data", convert_attribute=True
            )
            onnx.checker.check_model(src)
            onnx.shape_inference.infer_shapes_path(src, out, data_prop=True)
            return onnx.load(out, load_external_data=False)
    except onnx.checker.ValidationError as e:
        raise InvalidInput(
            f"the ONNX model is not valid: {e}. Fix or re-export it (onnx.checker.check_model reports it)"
        ) from e
    except (onnx.shape_inference.InferenceError, RuntimeError) as e:
        raise CaptureError(
            f"ONNX shape inference failed: {e}. Check the dim values passed (batch, seq, dim_values) "
            "against the model's inputs"
        ) from e


def _tensor_type(t: onnx.TypeProto, bindings: DimBindings) -> _TensorType:
    if not t.HasField("tensor_type"):
        return _TensorType(t.WhichOneof("value") or "unknown", None, 0)
    dtype, bits = _DTYPES.get(t.tensor_type.elem_type, ("unknown", 0))
    if not t.tensor_type.HasField("shape"):
        return _TensorType(dtype, None, bits)
    dims = []
    for d in t.tensor_type.shape.dim:
        value = d.dim_value if d.HasField("dim_value") else eval_dim(d.dim_param, bindings.values)
        if value is None:
            return _TensorType(dtype, None, bits)
        dims.append(value)
    return _TensorType(dtype, tuple(dims), bits)


def _init_type(t: onnx.TensorProto) -> _TensorType:
    dtype, bits = _DTYPES.get(t.data_type, ("unknown", 0))
    return _TensorType(dtype, tuple(t.dims), bits)


def _type_table(
    src: onnx.GraphProto, inferred: onnx.GraphProto, bindings: DimBindings
) -> dict[str, _TensorType]:
    """Name -> type of every tensor: from the inferred graph, then initializers' own dims (which win)."""
    types: dict[str, _TensorType] = {}
    for vi in (*inferred.value_info, *inferred.input, *inferred.output):
        types[vi.name] = _tensor_type(vi.type, bindings)
    for t in src.initializer:
        types[t.name] = _init_type(t)
    for s in src.sparse_initializer:  # stored as values plus indices; the dense shape is s.dims
        stored = _init_type(s.values).nbytes + _init_type(s.indices).nbytes
        types[s.values.name] = _TensorType(_init_type(s.values).dtype, tuple(s.dims), 0, stored)
    return types


def layer_of(module_path: str) -> int | None:
    """Index of the repeated block in a dotted module path ("transformer.h.3.attn" -> 3), if any."""
    m = _LAYER_RE.search(module_path)
    return int(m.group(1)) if m else None


def node_module_path(node: onnx.NodeProto) -> str:
    """The module a node came from, from torch.onnx's name scopes or a "/"-separated name ("" if neither)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            modules = [s for s in scopes[:-1] if isinstance(s, str) and s]
            return modules[-1] if modules else ""
    if node.name.startswith("/"):
        return ".".join(p for p in node.name.split("/")[:-1] if p)
    return ""


def _target(node: onnx.NodeProto) -> str:
    domain = node.domain if node.domain not in ("", "ai.onnx") else ""
    return f"{domain}.{node.op_type}" if domain else node.op_type


def _implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names read inside a node's subgraphs (If/Loop/Scan bodies), in first-use order."""
    seen: list[str] = []
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            local = {vi.name for vi in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                for name in (*inner.input, *_implicit_inputs(inner)):
                    if name and name not in local and name not in seen:
                        seen.append(name)
                local.update(inner.output)
    return seen


@dataclass
class _Builder:
    """Values (by name) and ops accumulated while walking the graph; `_build_graph` freezes them."""

    types: dict[str, _TensorType]
    values: dict[str, Value]
    ops: list[Op]

    def add(self, name: str, role: Role, module_path: str = "", alias_of: int | None = None) -> Value:
        t = self.types.get(name, _TensorType("unknown", None, 0))
        v = Value(
            id=len(self.values),
            name=name,
            size_bytes=0 if alias_of is not None else t.nbytes,
            dtype=t.dtype,
            shape=t.shape or (),
            role=role,
            alias_of=alias_of,
            module_path=module_path,
            layer=layer_of(module_path),
        )
        self.values[name] = v
        return v

    def operand(self, name: str) -> Operand | None:
        t = self.types.get(name)
        return None if not name else Operand(t.shape if t else None, t.nbytes if t else 0)


def _lower_node(b: _Builder, node: onnx.NodeProto, outputs: set[str]) -> tuple[Op, CostStatus]:
    """The node's `Op`, with its outputs added to `b`, and how its cost was obtained."""
    target = _target(node)
    reads = [n for n in (*node.input, *_implicit_inputs(node)) if n]
    missing = [n for n in reads if n not in b.values]
    if missing:
        raise CaptureError(f"node {node.name!r} reads {missing[0]!r}, which nothing defines before it")
    path = node_module_path(node) or next((b.values[n].module_path for n in reads), "")
    source = b.values[node.input[0]].id if target in ALIAS_OPS and node.input and node.input[0] else None
    made = [
        b.add(o, Role.OUTPUT if o in outputs else Role.ACTIVATION, path, source) for o in node.output if o
    ]
    attrs = {
        a.name: (a.i if a.type == onnx.AttributeProto.INT else tuple(a.ints))
        for a in node.attribute
        if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)
    }
    cost = node_cost(
        NodeInfo(
            target, tuple(b.operand(n) for n in node.input), tuple(b.operand(n) for n in node.output), attrs
        )
    )
    return Op(
        id=len(b.ops),
        name=node.name or f"{node.op_type}_{len(b.ops)}",
        target=target,
        inputs=tuple(dict.fromkeys(b.values[n].id for n in reads)),
        outputs=tuple(v.id for v in made),
        flops=cost.flops,
        bytes_read=cost.bytes_read,
        bytes_written=cost.bytes_written,
        module_path=path,
        layer=layer_of(path),
        cost_known=cost.known,
    ), cost.status


def _build_graph(
    src: onnx.GraphProto, name: str, types: dict[str, _TensorType], notes: Sequence[str]
) -> Graph:
    b = _Builder(types, {}, [])
    weights = [*(t.name for t in src.initializer), *(s.values.name for s in src.sparse_initializer)]
    weight_names = set(weights)
    for vi in src.input:
        if vi.name not in weight_names:
            b.add(vi.name, Role.INPUT)
    for w in weights:
        b.add(w, Role.PARAMETER, w.rpartition(".")[0])
    outputs = {vi.name for vi in src.output}
    statuses: dict[CostStatus, Counter[str]] = {s: Counter() for s in CostStatus}
    for node in src.node:
        op, status = _lower_node(b, node, outputs)
        b.ops.append(op)
        statuses[status][op.target] += 1
    return Graph(
        name=name,
        values=tuple(b.values.values()),
        ops=tuple(b.ops),
        outputs=tuple(b.values[vi.name].id for vi in src.output),
        warnings=(*notes, *_warnings(b, statuses)),
    )


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} ({n})" for k, n in sorted(c.items()))


def _warnings(b: _Builder, statuses: Mapping[CostStatus, Counter[str]]) -> list[str]:
    out = []
    unsized = [n for n, v in b.values.items() if v.alias_of is None and not _sized(b.types.get(n))]
    if unsized:
        more = f" (+{len(unsized) - _MAX_NAMED} more)" if len(unsized) > _MAX_NAMED else ""
        out.append(f"shape not inferred, counted as 0 bytes: {', '.join(unsized[:_MAX_NAMED])}{more}")
    if statuses[CostStatus.NO_FORMULA]:
        out.append(f"no cost formula for: {_counts(statuses[CostStatus.NO_FORMULA])}")
    if statuses[CostStatus.NO_SHAPE]:
        out.append(f"cost estimated without shapes for: {_counts(statuses[CostStatus.NO_SHAPE])}")
    return out


def _sized(t: _TensorType | None) -> bool:
    return t is not None and t.shape is not None and (t.bits > 0 or t.stored_bytes is not None)
