"""Triton kernels generated from a plan's specs, each with a torch reference that defines its semantics.

None exist yet: they arrive with the passes that need them (bitwidth: dequantize-matmul; kv_budget: KV
quantize/dequantize). Importing this package stays free of triton until then.
"""
