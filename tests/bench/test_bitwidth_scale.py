"""bench/bitwidth_scale.py's 70B-shaped problem: its shape, its file form, and a two-layer slice solved."""

from __future__ import annotations

from bench import bitwidth_scale as bs
from memplan.planner.bits_file import problem_from_dict
from memplan.solvers.multiple_choice import ChoiceProblem, solve_multiple_choice, usage_of


def test_problem_is_llama2_70b_shaped() -> None:
    p = bs.problem()
    assert len(p.layers) == 80 * 7 + 1 and all(len(layer.choices) == 5 for layer in p.layers)
    assert len(p.ties) == 80 * 3  # q-k, q-v, gate-up per layer
    numel = sum(bs._numel(layer) for layer in p.layers)
    assert 68.5e9 < numel < 69e9  # Llama-2-70B's linear weights and head, without the embedding
    for layer in p.layers:
        sizes = [c.size for c in layer.choices]
        costs = [c.cost for c in layer.choices]
        assert sizes == sorted(sizes, reverse=True) and costs == sorted(costs)  # fewer bits: smaller, dearer


def test_slice_solves_within_limits_and_round_trips_the_file() -> None:
    names = [n for n in bs.shapes() if n[0].startswith(("model.layers.0.", "model.layers.1."))]
    base = bs.problem(weights=names)
    p = ChoiceProblem(base.layers, base.ties, bs.limits_at(base, 4.25, bs.LATENCY_SHARE))
    again = problem_from_dict(bs.to_document(p))
    assert again == p
    sol = solve_multiple_choice(p, 10.0)
    assert sol.status == "optimal" and sol.choice is not None and sol.formats is not None
    used = usage_of(p, sol.choice)
    assert p.limits.size is not None and p.limits.latency is not None
    assert used["size"] <= p.limits.size and used["latency"] <= p.limits.latency
    for i, j in p.ties:
        assert sol.formats[i] == sol.formats[j]
