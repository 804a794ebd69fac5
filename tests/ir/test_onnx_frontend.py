"""Tests for the ONNX frontend: a hand-built graph with exact costs, a tiny GPT-2 exported by torch.onnx
(dynamo) and cross-checked with onnxruntime, external data, and every error message."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh

from memplan.errors import CaptureError, InvalidInput
from memplan.ir import analysis
from memplan.ir.frontends import onnx_frontend
from memplan.ir.frontends.onnx_costs import CostStatus, NodeInfo, Operand, node_cost
from memplan.ir.frontends.onnx_dims import eval_dim
from memplan.ir.frontends.onnx_frontend import from_onnx, layer_of, node_module_path
from memplan.ir.graph import Graph, Role

# ---------------------------------------------------------------- hand-built graph


def _tiny_model(batch_dim: str | int = "batch") -> onnx.ModelProto:
    """X[batch, 8] @ W[8, 4] -> Relu -> Reshape to [-1] -> com.example.Mystery -> Z (shape unknown)."""
    nodes = [
        oh.make_node("MatMul", ["X", "W"], ["Y1"], name="/encoder/layers/1/fc/MatMul"),
        oh.make_node("Relu", ["Y1"], ["Y2"], name="relu"),
        oh.make_node("Reshape", ["Y2", "S"], ["Y3"], name="flat"),
        oh.make_node("Mystery", ["Y3"], ["Z"], name="mystery", domain="com.example"),
    ]
    inits = [
        oh.make_tensor("W", TensorProto.FLOAT, [8, 4], np.arange(32, dtype=np.float32).tolist()),
        oh.make_tensor("S", TensorProto.INT64, [1], [-1]),
    ]
    graph = oh.make_graph(
        nodes,
        "tiny",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, [batch_dim, 8])],
        [oh.make_tensor_value_info("Z", TensorProto.FLOAT, ["q"])],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20), oh.make_opsetid("com.example", 1)])


def _by_name(g: Graph, name: str) -> int:
    return next(v.id for v in g.values if v.name == name)


def test_hand_built_graph_values_aliases_and_exact_costs() -> None:
    g = from_onnx(_tiny_model(), batch=2)
    assert [op.target for op in g.ops] == ["MatMul", "Relu", "Reshape", "com.example.Mystery"]
    roles = {v.name: (v.role, v.size_bytes, v.shape) for v in g.values}
    assert roles["X"] == (Role.INPUT, 2 * 8 * 4, (2, 8))
    assert roles["W"] == (Role.PARAMETER, 8 * 4 * 4, (8, 4))
    assert roles["Y1"] == (Role.ACTIVATION, 2 * 4 * 4, (2, 4))
    assert roles["Y3"] == (Role.ACTIVATION, 0, (8,))
    assert g.value(_by_name(g, "Y3")).alias_of == _by_name(g, "Y2")
    assert g.outputs == (_by_name(g, "Z"),) and roles["Z"][0] is Role.OUTPUT
    matmul, relu, reshape, mystery = g.ops
    assert (matmul.flops, matmul.bytes_read, matmul.bytes_written) == (2 * 2 * 4 * 8, 64 + 128, 32)
    assert (relu.flops, relu.bytes_read, relu.bytes_written) == (8, 32, 32)
    assert (reshape.flops, reshape.bytes_read, reshape.bytes_written, reshape.cost_known) == (0, 0, 0, True)
    assert not mystery.cost_known and mystery.flops == 2 * (8 + 0)
    assert matmul.module_path == "encoder.layers.1.fc" and matmul.layer == 1
    assert relu.module_path == "encoder.layers.1.fc"  # inherited from its input's producer


def test_hand_built_graph_warnings_and_alias_lifetime() -> None:
    g = from_onnx(_tiny_model(), batch=2)
    assert "no cost formula for: com.example.Mystery (1)" in g.warnings
    assert "shape not inferred, counted as 0 bytes: Z" in g.warnings
    # Y2's storage lives until the last reader of its view Y3 (op 3), not just its direct reader (op 2).
    assert analysis.lifetimes(g)[_by_name(g, "Y2")] == (1, 4)


def test_batch_binding_scales_activations_and_static_models_need_no_flags() -> None:
    g2, g6 = from_onnx(_tiny_model(), batch=2), from_onnx(_tiny_model(), batch=6)
    assert g6.value(_by_name(g6, "Y1")).size_bytes == 3 * g2.value(_by_name(g2, "Y1")).size_bytes
    assert g6.value(_by_name(g6, "Y3")).shape == (24,)
    static = from_onnx(_tiny_model(batch_dim=5), batch=7)
    assert static.value(_by_name(static, "X")).shape == (5, 8)
    assert any("batch=7 ignored" in w for w in static.warnings)


def test_dim_values_bind_any_name_and_report_unused_entries() -> None:
    g = from_onnx(_tiny_model("n_rows"), dim_values={"n_rows": 3, "typo": 4})
    assert g.value(_by_name(g, "X")).shape == (3, 8)
    assert "dim_values['typo'] ignored: no input has that dim" in g.warnings


def test_subgraph_reads_of_outer_values_are_op_inputs() -> None:
    then_g = oh.make_graph(
        [oh.make_node("Identity", ["X"], ["t"])],
        "then",
        [],
        [oh.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
    )
    else_g = oh.make_graph(
        [oh.make_node("Neg", ["X"], ["e"])],
        "else",
        [],
        [oh.make_tensor_value_info("e", TensorProto.FLOAT, [4])],
    )
    graph = oh.make_graph(
        [oh.make_node("If", ["C"], ["Y"], then_branch=then_g, else_branch=else_g)],
        "if",
        [
            oh.make_tensor_value_info("C", TensorProto.BOOL, []),
            oh.make_tensor_value_info("X", TensorProto.FLOAT, [4]),
        ],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, [4])],
    )
    g = from_onnx(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)]))
    assert set(g.ops[0].inputs) == {_by_name(g, "C"), _by_name(g, "X")}
    assert "no cost formula for: If (1)" in g.warnings


# ---------------------------------------------------------------- cost formulas


def _op(shape: tuple[int, ...] | None, itemsize: int = 4) -> Operand:
    return Operand(shape, 0 if shape is None else int(np.prod(shape)) * itemsize)


def test_cost_formulas_for_gemm_conv_pool_and_attention() -> None:
    gemm = NodeInfo("Gemm", (_op((16, 8)), _op((16, 4)), _op((4,))), (_op((8, 4)),), {"transA": 1})
    assert node_cost(gemm).flops == 2 * 32 * 16 + 32
    conv = NodeInfo("Conv", (_op((1, 3, 8, 8)), _op((6, 3, 3, 3)), None), (_op((1, 6, 6, 6)),), {})
    assert node_cost(conv).flops == 2 * 216 * 27
    convt = NodeInfo("ConvTranspose", (_op((1, 4, 5, 5)), _op((4, 2, 3, 3))), (_op((1, 2, 7, 7)),), {})
    assert node_cost(convt).flops == 2 * 100 * 18
    pool = NodeInfo("MaxPool", (_op((1, 2, 4, 4)),), (_op((1, 2, 2, 2)),), {"kernel_shape": (2, 2)})
    assert node_cost(pool).flops == 8 * 4
    # opset-23 Attention, 4-D layout, 2 past + 3 new keys: Skv = 5 from present_key.
    q, kv = _op((1, 2, 3, 8)), _op((1, 2, 3, 8))
    attn = NodeInfo(
        "Attention",
        (q, kv, kv, None, _op((1, 2, 2, 8)), _op((1, 2, 2, 8))),
        (_op((1, 2, 3, 8)), _op((1, 2, 5, 8)), _op((1, 2, 5, 8))),
        {},
    )
    assert node_cost(attn).flops == 4 * 48 * 5
    fused = NodeInfo(
        "com.microsoft.Attention", (_op((2, 6, 16)), _op((16, 48)), _op((48,))), (_op((2, 6, 16)),), {}
    )
    assert node_cost(fused).flops == 2 * 192 * 48 + 4 * 192 * 6


def test_cost_status_when_shapes_or_formulas_are_missing() -> None:
    no_shape = node_cost(NodeInfo("MatMul", (_op(None), _op((8, 4))), (_op(None),), {}))
    assert no_shape.status is CostStatus.NO_SHAPE and not no_shape.known and no_shape.flops == 2 * 32
    unknown = node_cost(NodeInfo("NovelOp", (_op((10,)),), (_op((10,)),), {}))
    assert unknown.status is CostStatus.NO_FORMULA and unknown.flops == 2 * 20 and unknown.bytes_read == 40
    shape = node_cost(NodeInfo("Shape", (_op((10, 10)),), (_op((2,), 8),), {}))
    assert (shape.flops, shape.bytes_read, shape.bytes_written, shape.known) == (0, 0, 16, True)


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("sequence", 16),
        ("sequence + 1", 17),
        ("2*s0", 6),
        ("sequence*batch", 32),
        ("(sequence - 1)//2 + 1", 8),
        ("Max(1, s0 - 5)", 1),
        ("sequence/4", 4),
        ("sequence/5", None),
        ("s0 // 0", None),
        ("unk__0", None),
        ("import os", None),
        ("__import__('os')", None),
    ],
)
def test_eval_dim(expr: str, value: int | None) -> None:
    assert eval_dim(expr, {"sequence": 16, "batch": 2, "s0": 3}) == value


def test_layer_and_module_path_helpers() -> None:
    assert [
        layer_of(p) for p in ("transformer.h.3.attn", "model.layers.12", "blocks.0", "lm_head", "h3")
    ] == [3, 12, 0, None, None]
    legacy = oh.make_node("MatMul", ["a", "b"], ["c"], name="/transformer/h.3/attn/MatMul")
    assert node_module_path(legacy) == "transformer.h.3.attn"
    dynamo = oh.make_node("MatMul", ["a", "b"], ["c"], name="node_matmul")
    onnx.helper.set_metadata_props(
        dynamo, {"pkg.torch.onnx.name_scopes": "['', 'model', 'model.layers.2', 'mm']"}
    )
    assert node_module_path(dynamo) == "model.layers.2"


# ---------------------------------------------------------------- external data and big models


def _save_with_external_weight(tmp_path: Path) -> Path:
    w = np.ones((256, 1024), dtype=np.float16)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["X", "W"], ["Y"])],
        "ext",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT16, ["batch", 256])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT16, ["batch", 1024])],
        [onnx.numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "ext.onnx"
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    return path


def test_external_data_sizes_come_from_dims_without_reading_the_data(tmp_path: Path) -> None:
    path = _save_with_external_weight(tmp_path)
    (tmp_path / "ext.bin").unlink()  # reading the weights now would fail
    g = from_onnx(path, batch=4)
    w = g.value(_by_name(g, "W"))
    assert (w.role, w.size_bytes, w.dtype, w.shape) == (
        Role.PARAMETER,
        256 * 1024 * 2,
        "float16",
        (256, 1024),
    )
    assert g.ops[0].flops == 2 * 4 * 1024 * 256 and g.name == "ext"


def test_path_based_inference_for_models_over_the_protobuf_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_memory = from_onnx(_tiny_model(), batch=2)
    monkeypatch.setattr(onnx_frontend, "_PROTO_LIMIT", 0)
    assert from_onnx(_tiny_model(), batch=2) == in_memory
    path = _save_with_external_weight(tmp_path)
    assert from_onnx(path, batch=2).value(1).size_bytes == 256 * 1024 * 2


# ---------------------------------------------------------------- errors


def test_missing_and_non_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="ONNX file not found"):
        from_onnx(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello, this is not a model\n")
    with pytest.raises(InvalidInput, match="is not an ONNX model.*torch.onnx.export"):
        from_onnx(junk)


def test_model_rejected_by_the_checker() -> None:
    model = _tiny_model()
    model.graph.node[1].input[0] = "undefined_tensor"
    with pytest.raises(InvalidInput, match="ONNX model is not valid.*undefined_tensor"):
        from_onnx(model, batch=2)


def test_unbound_and_unnamed_dims_and_bad_values() -> None:
    with pytest.raises(InvalidInput, match=r"input 'X' has symbolic dim 'batch' \(axis 0\).*pass batch=N"):
        from_onnx(_tiny_model())
    with pytest.raises(InvalidInput, match=r"symbolic dim 'rows'.*pass dim_values=\{'rows': N\}"):
        from_onnx(_tiny_model("rows"), batch=2)
    unnamed = _tiny_model()
    unnamed.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    with pytest.raises(InvalidInput, match="unnamed dynamic dim at axis 0"):
        from_onnx(unnamed, batch=2)
    with pytest.raises(InvalidInput, match="batch must be a positive int, got 0"):
        from_onnx(_tiny_model(), batch=0)


def test_shape_inference_failure_is_a_capture_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] boom")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    with pytest.raises(CaptureError, match="ONNX shape inference failed: .*boom"):
        from_onnx(_tiny_model(), batch=2)


# ---------------------------------------------------------------- tiny GPT-2 exported by torch.onnx


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=256,
        n_positions=128,
        attn_implementation="eager",
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # distinct values, so the exporter's optimiser neither merges nor drops weights
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.onnx"
    dim = torch.export.Dim
    torch.onnx.export(
        model,
        (torch.randint(0, 256, (2, 16)),),
        str(path),
        dynamo=True,
        input_names=["input_ids"],
        dynamic_shapes={"input_ids": {0: dim("batch"), 1: dim("sequence")}},
    )
    return model, path


def test_gpt2_parameters_match_torch(gpt2: tuple[Any, Path]) -> None:
    model, path = gpt2
    g = from_onnx(path, batch=2, seq=16)
    torch_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    torch_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = [v for v in g.values if v.role is Role.PARAMETER]
    assert sum(v.size_bytes for v in params if v.name in torch_names) == torch_bytes
    # The other initializers are the exporter's small constants (shape vectors, scalars).
    assert all(int(np.prod(v.shape)) <= 8 for v in params if v.name not in torch_names)
    assert analysis.persistent_bytes(g) == sum(v.size_bytes for v in params)


def test_gpt2_ops_values_layers_and_analysis(gpt2: tuple[Any, Path]) -> None:
    _, path = gpt2
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    g = from_onnx(path, batch=2, seq=16)
    assert [op.target for op in g.ops] == [n.op_type for n in nodes]
    for i, op in enumerate(g.ops):
        for vid in op.inputs:
            prod = g.producer(vid)
            assert (prod is not None and prod < i) or g.value(vid).role in (Role.INPUT, Role.PARAMETER)
    assert g.warnings == ()
    assert all(op.cost_known for op in g.ops)
    compute = ("Gemm", "MatMul", "Softmax", "LayerNormalization")
    for k in (0, 1):  # each block: 4 projections, QK^T and PV, one softmax, two layer norms
        in_layer = Counter(op.target for op in g.ops if op.layer == k and op.target in compute)
        assert in_layer == {"Gemm": 4, "MatMul": 2, "Softmax": 1, "LayerNormalization": 2}
        assert all(op.module_path.startswith(f"transformer.h.{k}") for op in g.ops if op.layer == k)
    (out,) = g.outputs
    assert (g.value(out).role, g.value(out).shape, g.value(out).size_bytes) == (
        Role.OUTPUT,
        (2, 16, 256),
        32768,
    )
    peak2 = analysis.peaks(analysis.device_intervals(g), len(g.ops))["device"]
    g8 = from_onnx(path, batch=8, seq=64)
    peak8 = analysis.peaks(analysis.device_intervals(g8), len(g8.ops))["device"]
    assert analysis.persistent_bytes(g) < peak2.bytes < peak8.bytes
    flops = sum(op.flops for op in g.ops if op.target in ("Gemm", "MatMul"))
    tokens, d = 32, 64  # per layer and token: 12*d^2 MACs and 9*d bias adds; QK^T and PV; the LM head
    layers = 2 * tokens * (12 * d * d) + tokens * 9 * d + 2 * (2 * 2 * 16 * 16 * d)
    assert flops == 2 * layers + 2 * tokens * 256 * d


def test_gpt2_onnxruntime_matches_torch_and_ir_shapes(gpt2: tuple[Any, Path]) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    model, path = gpt2
    ids = np.random.default_rng(0).integers(0, 256, size=(3, 11), dtype=np.int64)
    g = from_onnx(path, batch=3, seq=11)
    onnx_model = onnx.load(str(path))
    declared = {o.name for o in onnx_model.graph.output}
    onnx_model.graph.output.extend(
        onnx.ValueInfoProto(name=v.name)
        for v in g.values
        if v.role is Role.ACTIVATION and v.name not in declared
    )
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    results = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": ids}), strict=True))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(results[g.value(g.outputs[0]).name], logits, atol=1e-4, rtol=0)
    checked = [v for v in g.values if v.name in results]
    assert len(checked) > 100
    for v in checked:
        assert v.shape == results[v.name].shape, v.name
        if v.alias_of is None:
            assert v.size_bytes == results[v.name].nbytes, v.name
