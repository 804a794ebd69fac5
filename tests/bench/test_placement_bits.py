"""bench/placement_bits.py's helpers on gpt2-tiny (random init): one sensitivity table priced for both
configurations, the joint and sequential plans at one budget, and the run that measures them."""

import math

import torch

from bench.placement_bits import (
    SOLVER_TOLERANCE,
    bits_only_sensitivity,
    generate_under,
    joint_candidates,
    log_probs,
    plan_float,
    plan_joint,
    plan_sequential,
    priced,
    quality,
    rests,
    sensitivity_table,
    size_for_sensitivity,
    streamed_bytes,
    total_sensitivity,
    weight_bytes,
)
from memplan.ir.hardware import load_hardware
from memplan.zoo import catalog

GEN = 4


def test_helpers_on_gpt2_tiny():
    torch.manual_seed(0)
    model = catalog.get("gpt2-tiny").build(device="cpu").eval()
    hw = load_hardware("cpu")
    calib = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    table = sensitivity_table(model, calib, probes=1)
    bits = priced(model, ids, hw, GEN, table)
    cands = joint_candidates(bits)
    assert set(cands) == {t.value_id for t in bits.candidates}
    for t in bits.candidates:
        own, *rest = cands[t.value_id]
        assert own.bits is None and own.cost == 0.0 and own.stored_bytes == t.candidates[0].stored_bytes
        assert [(c.bits, c.cost, c.stored_bytes) for c in rest] == [
            (c.bits, c.cost, c.stored_bytes) for c in t.candidates[1:]
        ]
    rest_float, rest_q = rests(model, ids, hw, GEN, table, bits)
    assert 0 < rest_float < rest_q
    budget = rest_q + int(0.5 * weight_bytes(model))
    fit = plan_sequential(model, ids, hw, GEN, budget, table, budget - rest_q)
    s_fit = total_sensitivity(fit, cands)
    assert fit.decisions.bits is not None and s_fit > 0
    joint = plan_joint(model, ids, hw, GEN, budget, cands, s_fit)
    slack = SOLVER_TOLERANCE * max(c.cost for cs in cands.values() for c in cs)  # HiGHS's, costs scaled
    assert total_sensitivity(joint, cands) <= s_fit + slack
    # the sequential plan is one the joint formulation may choose: never predicted slower
    assert joint.predictions.peak_bytes["device"] <= budget
    assert _decode_s(joint) <= _decode_s(fit) * (1 + 1e-6)
    # equal sensitivity by bisection: the size limit found reaches it
    limit = 0.5 * s_fit
    size = size_for_sensitivity(bits, limit)
    assert bits_only_sensitivity(bits, size) <= limit + slack
    assert math.isinf(bits_only_sensitivity(bits, 1)) or bits_only_sensitivity(bits, 1) > limit
    flt = plan_float(model, ids, hw, GEN, 1 << 40)
    assert total_sensitivity(flt, cands) == 0.0 and streamed_bytes(flt) == 0
    g = generate_under(joint, model, ids, GEN)
    assert g["within_budget"] and g["meas_tok/s"] > 0 and len(g["tokens"]) == GEN
    evals = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))]
    ref = log_probs(model, evals)
    assert quality(flt, model, evals, ref)["agree"] == 1.0
    q = quality(joint, model, evals, ref)
    assert q["ppl"] > 0 and 0 <= q["agree"] <= 1
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D", "the float model is untouched"


def _decode_s(plan):
    from memplan.plans.effective import generation_times

    return generation_times(plan.graph(), plan.events)[1]
