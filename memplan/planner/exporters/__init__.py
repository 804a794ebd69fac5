"""Exporters: a plan written in formats other tools already read.

`EXPORTERS` is the one registry: format name -> function that returns the file's text. Whatever exports a
plan (the `memplan export` command, the API) looks the format up here and nowhere else; a new format is one
module in this package and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable

from memplan.planner.exporters.accelerate import accelerate_config
from memplan.planner.exporters.chrome_trace import chrome_trace
from memplan.planner.exporters.compressed_tensors import compressed_tensors_config
from memplan.planner.exporters.deepspeed import deepspeed_config
from memplan.planner.exporters.kv import kvpress_config, prefixkv_config
from memplan.planner.exporters.torch_sac import torch_sac
from memplan.planner.exporters.torchao import torchao_config
from memplan.plans.plan import Plan

Exporter = Callable[[Plan], str]

EXPORTERS: dict[str, Exporter] = {
    "accelerate": accelerate_config,
    "chrome-trace": chrome_trace,
    "compressed-tensors": compressed_tensors_config,
    "deepspeed": deepspeed_config,
    "kvpress": kvpress_config,
    "prefixkv": prefixkv_config,
    "torch-sac": torch_sac,
    "torchao": torchao_config,
}
"""Format name -> exporter. Write the text with `memplan.files.atomic_write_text`."""

__all__ = [
    "EXPORTERS",
    "Exporter",
    "accelerate_config",
    "chrome_trace",
    "compressed_tensors_config",
    "deepspeed_config",
    "kvpress_config",
    "prefixkv_config",
    "torch_sac",
    "torchao_config",
]
