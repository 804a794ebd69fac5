"""The roofline cost model: how long an op takes on the hardware's compute device.

An op takes the slower of its arithmetic (`flops / hw.flops`) and its memory traffic (`bytes / hw.mem_bw`);
every pass and prediction prices compute with it.
"""

from __future__ import annotations

from memplan.ir.graph import Op
from memplan.ir.hardware import Hardware


def op_time_s(op: Op, hw: Hardware) -> float:
    """Roofline time of one op on the device: the slower of its arithmetic and its memory traffic."""
    return max(op.flops / hw.flops, (op.bytes_read + op.bytes_written) / hw.mem_bw)
