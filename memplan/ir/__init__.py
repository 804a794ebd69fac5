"""The memory IR: `Graph`/`Op`/`Value`, the `Hardware` model, analyses, and frontends that build the IR."""

from memplan.ir.analysis import (
    Interval,
    Peak,
    device_intervals,
    lifetimes,
    peaks,
    timeline,
    working_set_bound,
)
from memplan.ir.graph import Graph, Op, Role, Value
from memplan.ir.hardware import Hardware, Tier, load_hardware

__all__ = [
    "Graph",
    "Hardware",
    "Interval",
    "Op",
    "Peak",
    "Role",
    "Tier",
    "Value",
    "device_intervals",
    "lifetimes",
    "load_hardware",
    "peaks",
    "timeline",
    "working_set_bound",
]
