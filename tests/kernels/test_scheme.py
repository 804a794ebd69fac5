"""Which TensorBits the kernels take, and the messages for those they do not."""

from __future__ import annotations

import pytest
import torch

from memplan.errors import InvalidInput
from memplan.kernels.scheme import QuantScheme, UnsupportedBits, scheme_of
from memplan.plans.decisions import TensorBits


def test_per_group_and_per_channel_resolve() -> None:
    s = scheme_of(TensorBits(3, "int4", 128, False, "per-group"), (64, 512))
    assert s == QuantScheme(4, 128, False, torch.float16, 64, 512)
    assert (s.code_max, s.half, s.groups) == (15, 8, 4)
    ch = scheme_of(TensorBits(3, "int8", None, True, "per-channel", "float32"), (2, 3, 10))
    assert (ch.bits, ch.group_size, ch.rows, ch.cols, ch.scale_dtype) == (8, 10, 6, 10, torch.float32)
    assert scheme_of(TensorBits(3, "int2", None, True, "per-group"), (4, 6)).group_size == 6
    assert scheme_of(TensorBits(3, "int3", 6, True, "per-channel"), (4, 6)).group_size == 6


@pytest.mark.parametrize(
    ("spec", "shape", "says"),
    [
        (TensorBits(1, "fp16"), (4, 4), "plain cast: use tensor.to(torch.float16)"),
        (TensorBits(1, "bf16", scale_layout="per-channel"), (4, 4), "torch.bfloat16"),
        (TensorBits(1, "int4", 2, True, "per-group", "bfloat16"), (4, 4), "float16, float32"),
        (TensorBits(1, "int8", scale_layout="per-tensor"), (4, 4), "'per-tensor' is not supported"),
        (TensorBits(1, "int8", scale_layout="none"), (4, 4), "use 'per-channel'"),
        (TensorBits(1, "int4", 128, scale_layout="per-group"), (4, 192), "divisors near it: [64, 96, 192]"),
        (TensorBits(1, "int4", 0, scale_layout="per-group"), (4, 8), "must be >= 1"),
        (TensorBits(1, "int4", 4, scale_layout="per-channel"), (4, 8), "contradicts per-channel"),
        (TensorBits(1, "int4", 4, scale_layout="per-group"), (4, 0), "shape (4, 0)"),
        (TensorBits(1, "int4", 4, scale_layout="per-group"), (), "shape ()"),
    ],
)
def test_unsupported_specs_say_what_to_do(spec: TensorBits, shape: tuple[int, ...], says: str) -> None:
    with pytest.raises(UnsupportedBits) as err:
        scheme_of(spec, shape)
    assert says in str(err.value) and "tensor 1" in str(err.value)
    assert isinstance(err.value, InvalidInput)
