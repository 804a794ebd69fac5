"""memplan: a compiler-style offline planner for memory placement and quantization, with a runtime."""

__version__ = "0.1.0"
