"""Kernels specialised from a plan's bits record (`memplan.plans.decisions.TensorBits`), each with a torch
reference that defines its semantics. Importing this package imports neither torch nor triton; only the
modules that define Triton kernels import triton (through `triton_env`).

    module          what                                                                   triton
    scheme          a TensorBits resolved for a shape: bits, group, zero point; UnsupportedBits   no
    packing         bit-packed layouts of int8/int4/int3/int2 codes, row by row (reference)       no
    quantize        quantize / dequantize (the reference) and the per-element error bound         no
    specialise      a TensorBits to the dequantize-matmul kernel's constexprs and blocks          no
    cpu_native      PyTorch's CPU int8 / int4 matmul kernels fed from a QuantizedWeight           no
    linear          the quantized linear: reference, native or triton, the fastest per machine    on GPU
    triton_env      triton set up for this machine (TRITON_INTERPRET=1 without a GPU)            yes
    pack_triton     Triton pack / unpack kernels                                                  yes
    dequant_matmul  Triton `x @ dequantize(W).T` kernel                                           yes
    kv_quant        KV token vectors at 8/4/2 bits (KVBudget.bits): reference, error bound        no
    kv_quant_triton Triton quantize+pack and unpack+dequantize of KV token vectors                yes
"""
