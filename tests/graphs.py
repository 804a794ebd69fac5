"""Graph builders shared by the tests: tiny hand-made graphs and a hypothesis strategy for random ones."""

from __future__ import annotations

from hypothesis import strategies as st

from memplan.ir.graph import Graph, Op, Role, Value


def chain(sizes: list[int], param_bytes: int = 0) -> Graph:
    """x -> op0 -> v1 -> op1 -> v2 ...: each op reads the previous value (and the parameter, if any)."""
    values = [Value(0, "x", sizes[0], "float32", (sizes[0] // 4,), Role.INPUT)]
    if param_bytes:
        values.append(Value(1, "w", param_bytes, "float32", (param_bytes // 4,), Role.PARAMETER))
    ops = []
    prev = 0
    for i, size in enumerate(sizes[1:]):
        vid = len(values)
        values.append(Value(vid, f"v{i + 1}", size, "float32", (size // 4,), Role.ACTIVATION))
        ins = (prev, 1) if param_bytes else (prev,)
        ops.append(Op(i, f"op{i}", "aten.relu.default", ins, (vid,), flops=float(size)))
        prev = vid
    return Graph("chain", tuple(values), tuple(ops), (prev,))


@st.composite
def random_graphs(draw: st.DrawFn, max_ops: int = 25) -> Graph:
    """A random DAG in schedule order: each op reads 0-3 earlier values; some outputs are views."""
    n_inputs = draw(st.integers(1, 3))
    values = [
        Value(
            i,
            f"in{i}",
            draw(st.integers(1, 4096)),
            "float32",
            (1,),
            draw(st.sampled_from([Role.INPUT, Role.PARAMETER])),
        )
        for i in range(n_inputs)
    ]
    ops = []
    for k in range(draw(st.integers(1, max_ops))):
        ins = tuple(sorted(set(draw(st.lists(st.integers(0, len(values) - 1), min_size=0, max_size=3)))))
        vid = len(values)
        view_of = draw(st.sampled_from([None, *ins])) if ins and draw(st.booleans()) else None
        size = 0 if view_of is not None else draw(st.integers(0, 4096))
        values.append(Value(vid, f"v{vid}", size, "float32", (1,), Role.ACTIVATION, view_of))
        ops.append(Op(k, f"op{k}", "aten.add.Tensor", ins, (vid,), flops=float(size)))
    outs = tuple(draw(st.lists(st.integers(n_inputs, len(values) - 1), max_size=2, unique=True)))
    return Graph("random", tuple(values), tuple(ops), outs)
