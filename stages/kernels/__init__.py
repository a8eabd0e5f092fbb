"""Fused Triton kernels for the elementwise work between the transformer's GEMMs and its attention.

One file per family, each with its kernels, their launchers and their registration as torch custom
ops (`torch.library.triton_op`), so that Inductor, regional compile and CUDA graphs treat them as
ordinary ops:

    rows_fp8.py   one program per token row: LayerNorm + AdaLN modulation, gated residual, GELU or
                  the single blocks' concatenation, ending in row-wise e4m3 and the row's scale
    heads.py      per-head RMSNorm of Q and K + RoPE (+ e4m3 for FP8 attention), V gathered (and
                  scaled per head), written in the (batch, tokens, heads, head_dim) layout FA3 takes
    fp8_gemm.py   the FP8 GEMM that takes those activations and scales (torch._scaled_mm, row-wise)

Nothing here imports triton at module level except the kernel files themselves, which only the
fused_kernels stage (on a GPU) and the tests import. The eager references live in the tests.
"""
