"""Platform kernels: C++ code for CPU registered with XLA's FFI.

`build` compiles and registers a source on first use; `cpu_attention` is the
fused attention core (model.attention_backend='cpu_fused'); `cpu_adamw` is the
fused AdamW update (optimizer.backend='cpu_fused'). Accelerators use XLA's own
kernels (cuDNN, Pallas splash), selected in modeling/attention.py.
"""
