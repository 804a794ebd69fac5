import pytest

from memplan.errors import InternalError
from memplan.ir.graph import Graph, Op, Role, Value
from tests.graphs import chain


def test_indexes_built_once():
    g = chain([16, 32, 64], param_bytes=8)
    assert g.producer(0) is None and g.producer(2) == 0
    assert g.consumers(0) == (0,)
    assert g.consumers(1) == (0, 1)  # the parameter is read by both ops
    assert g.storage_of(3) == 3


def test_alias_chain_resolves_to_root():
    vals = (
        Value(0, "x", 64, "float32", (16,), Role.INPUT),
        Value(1, "y", 0, "float32", (4, 4), Role.ACTIVATION, alias_of=0),
        Value(2, "z", 0, "float32", (16,), Role.ACTIVATION, alias_of=1),
    )
    ops = (Op(0, "view", "aten.view", (0,), (1,)), Op(1, "view2", "aten.view", (1,), (2,)))
    g = Graph("g", vals, ops, (2,))
    assert g.storage_of(2) == 0
    assert [v.id for v in g.storages()] == [0]


@pytest.mark.parametrize(
    "values, ops, message",
    [
        (
            (Value(0, "a", 1, "f", (), Role.INPUT), Value(0, "b", 1, "f", (), Role.INPUT)),
            (),
            "duplicate value ids",
        ),
        ((Value(0, "a", 1, "f", (), Role.INPUT),), (Op(0, "o", "t", (5,), ()),), "reads unknown value id 5"),
        ((Value(0, "a", 1, "f", (), Role.INPUT),), (Op(0, "o", "t", (), (7,)),), "writes unknown value id 7"),
        (
            (
                Value(0, "a", 0, "f", (), Role.INPUT, alias_of=1),
                Value(1, "b", 0, "f", (), Role.INPUT, alias_of=0),
            ),
            (),
            "alias cycle",
        ),
        ((Value(0, "a", 0, "f", (), Role.INPUT, alias_of=9),), (), "aliases unknown value 9"),
    ],
)
def test_malformed_graphs_are_internal_errors(values, ops, message):
    with pytest.raises(InternalError, match=message):
        Graph("bad", values, ops)


def test_printer_reads_like_code():
    text = str(chain([16, 32], param_bytes=8))
    assert "graph chain (1 ops, 3 values):" in text
    assert "[0] %2: float32[8] activation 32B = aten.relu.default(%0, %1)" in text
    assert text.rstrip().endswith("return (%2)")
