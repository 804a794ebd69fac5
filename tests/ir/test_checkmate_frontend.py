"""The Checkmate frontend: node-link JSON in (attribute aliases, topological order, every user error), and a
memplan IR graph out (views contracted, one node per storage-creating op, a sink for the outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx
import pytest

from memplan.errors import InvalidInput
from memplan.ir.frontends.checkmate import SINK, from_node_link, graph_to_node_link, load_node_link
from memplan.ir.graph import Graph, Op, Role, Value


def doc(nodes: list[dict[str, Any]], links: list[tuple[Any, Any]], key: str = "links") -> dict[str, Any]:
    return {"directed": True, "nodes": nodes, key: [{"source": s, "target": t} for s, t in links]}


def test_networkx_round_trip_with_attribute_aliases(tmp_path: Path) -> None:
    g = nx.DiGraph()
    g.add_node("a", cpu=1.5, mem=10)
    g.add_node("b", runtime=2, ram=20.2)
    g.add_node("c", cost=3, size=30)
    g.add_edges_from([("a", "b"), ("a", "c"), ("b", "c")])
    path = tmp_path / "g.json"
    path.write_text(json.dumps(nx.node_link_data(g, edges="links")))
    d = load_node_link(path)
    assert d.names == ("a", "b", "c")
    assert d.cost == (1.5, 2.0, 3.0) and d.size == (10, 21, 30)
    assert d.preds == ((), (0,), (0, 1))


def test_order_is_made_topological_keeping_the_document_order() -> None:
    d = from_node_link(
        doc(
            [
                {"id": 2, "cost": 1, "size": 1},
                {"id": 1, "cost": 1, "size": 1},
                {"id": 0, "cost": 1, "size": 1},
            ],
            [(0, 2), (1, 2)],
            key="edges",
        )
    )
    assert d.names == ("1", "0", "2") and d.preds == ((), (), (0, 1))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], 'JSON object with a "nodes" list'),
        (doc([{"id": "a", "cost": 1}], []), "no output size"),
        (doc([{"id": "a", "size": 1}], []), "no compute cost"),
        (doc([{"id": "a", "cost": -1, "size": 1}], []), "must be a finite number >= 0"),
        (doc([{"id": "a", "cost": "x", "size": 1}], []), "must be a finite number >= 0"),
        (doc([{"id": "a", "cost": 1, "size": 1}], [("a", "z")]), 'not in "nodes"'),
        (
            doc(
                [{"id": "a", "cost": 1, "size": 1}, {"id": "b", "cost": 1, "size": 1}],
                [("a", "b"), ("b", "a")],
            ),
            "has a cycle",
        ),
    ],
)
def test_user_errors(data: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        from_node_link(data)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no graph file"):
        load_node_link(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nodes: ")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        load_node_link(bad)


def tiny_graph() -> Graph:
    """x (input) -> mm -> view -> relu -> sum (output); relu also reads mm's output through the view."""
    f32 = "float32"
    values = (
        Value(0, "x", 64, f32, (4, 4), Role.INPUT),
        Value(1, "mm", 64, f32, (4, 4), Role.ACTIVATION),
        Value(2, "v", 0, f32, (16,), Role.ACTIVATION, alias_of=1),
        Value(3, "relu", 64, f32, (16,), Role.ACTIVATION),
        Value(4, "sum", 4, f32, (), Role.OUTPUT),
    )
    ops = (
        Op(0, "mm", "aten.mm.default", (0, 0), (1,), flops=128.0),
        Op(1, "view", "aten.view.default", (1,), (2,)),
        Op(2, "relu", "aten.relu.default", (2,), (3,), flops=16.0),
        Op(3, "sum", "aten.sum.default", (3, 1), (4,), flops=16.0),
    )
    return Graph("tiny", values, ops, outputs=(4,))


def test_graph_to_node_link_contracts_views_and_adds_a_sink() -> None:
    data = graph_to_node_link(tiny_graph())
    assert [n["id"] for n in data["nodes"]] == ["mm", "relu", "sum", SINK]
    assert [(n["cost"], n["size"]) for n in data["nodes"]] == [(128.0, 64), (16.0, 64), (16.0, 4), (0.0, 0)]
    links = {(e["source"], e["target"]) for e in data["links"]}
    assert links == {("mm", "relu"), ("mm", "sum"), ("relu", "sum"), ("sum", SINK)}
    d = from_node_link(json.loads(json.dumps(data)))
    assert d.names == ("mm", "relu", "sum", SINK) and d.preds == ((), (0,), (0, 1), (2,))


def test_real_training_step_converts_to_a_dag() -> None:
    """gpt2-tiny's joint forward + backward: one node per storage-creating op, bytes conserved, links forward
    in schedule order, and the greedy schedule at 0.9x of the peak passes the checker."""
    from memplan.planner.models import capture, load_model
    from memplan.solvers.remat_dag import RematProblem, check, events, greedy_schedule, no_remat_peak

    graph, _ = capture(load_model("zoo:gpt2-tiny", "train", batch=1, seq=8), "train", "none")
    data = graph_to_node_link(graph)
    fresh = [v for v in graph.values if v.alias_of is None and graph.producer(v.id) is not None]
    assert sum(n["size"] for n in data["nodes"]) == sum(v.size_bytes for v in fresh)
    assert len(data["nodes"]) == len({graph.producer(v.id) for v in fresh}) + 1 < len(graph.ops)
    position = {n["id"]: i for i, n in enumerate(data["nodes"])}
    assert all(position[e["source"]] < position[e["target"]] for e in data["links"])
    d = from_node_link(data)
    problem = RematProblem(d.names, d.cost, d.size, d.preds)
    budget = int(0.9 * no_remat_peak(problem))
    schedule = greedy_schedule(problem, budget, "largest")
    assert schedule is not None and check(problem, events(problem, schedule), budget).ok
