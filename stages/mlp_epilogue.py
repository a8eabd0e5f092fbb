"""An option on top of stage 3: the MLP's GELU -> FP8 in the FP8 GEMM's epilogue (stages/kernels/gemm_epilogue.py).

With the fused kernels, each large MLP of a step still wrote its fc1 output in bf16 and read it back
to apply GELU and quantize it row-wise (gelu_fp8; in the single blocks concat_gelu_fp8, 5.6 ms of
an H200's step). Here fc1 is a persistent Triton FP8 GEMM that applies bias and GELU and writes e4m3
with one scale per row per 128 columns in its epilogue, and fc2 (the single blocks' proj_out) is the
same kernel taking those block scales in its K loop and writing the block's new residual stream
(x + gate * output, which Inductor's add kernel computed from a bf16 output) in its epilogue.
Measured on an H200 (benchmarks/epilogue_lab.py, 2026-12-06): the Triton GEMM at 98.9-99.6% of
cuBLAS at fc1's shape, 97.3-98.6% with the GELU epilogue.

It runs inside the fused block forwards (stages/fused_blocks.py `install_mlp_epilogue`), so it needs
the fused kernels (a rule), and TMA, so a Hopper GPU or newer. The weights stay torchao's row-wise
FP8 (their scales are constant along K), so LoRA merge and FP8 weights from load work unchanged.

Not in any preset. Its first GPU run (H100, 2026-12-07: benchmarks/results/nvidia-h100-80gb-hbm3-2026-12-07)
failed to compile: its TMA descriptors were made on the host inside a custom op, which Inductor's
tracing does not capture. The kernel now makes them on the device, from a scratch allocator set on
the thread that runs the step (the pre-hook below). That has run only in Triton's CPU interpreter
(tests/test_gemm_epilogue_kernels.py, tests/test_fused_blocks.py).
`benchmarks/gpu_session.sh epilogue-gpu-tests stages` (option row "with mlp_epilogue") is what
decides whether preset 3 takes it.
"""

from __future__ import annotations

from .base import Requirements, Stage


class MlpEpilogue(Stage):
    switch = "mlp_epilogue"
    title = "MLP GELU -> FP8 in the GEMM epilogue"
    summary = (
        "The MLP's first FP8 GEMM applies GELU and writes 1x128 block-scaled FP8 in its epilogue; "
        "the second takes those scales and writes the gated residual."
    )
    requirements = Requirements(cuda=True, min_compute_capability=(9, 0), packages=("triton",))

    def describe_available(self, env):
        return "persistent Triton FP8 GEMMs with TMA loads"

    def apply_execution(self, transformer, config, build):
        from .fused_blocks import install_mlp_epilogue, mlp_epilogue_unfit_reason
        from .kernels.gemm_epilogue import use_torch_allocator

        blocks = (*transformer.transformer_blocks, *transformer.single_transformer_blocks)
        fused = [block for block in blocks if hasattr(block, "fused_gemms")]
        installed, unfit = 0, {}
        for block in fused:
            reason = mlp_epilogue_unfit_reason(block)
            if reason:
                unfit.setdefault(type(block).__name__, reason)
            else:
                install_mlp_epilogue(block)
                installed += 1
        if installed and not getattr(transformer, "_kontext_tma_scratch_hook", False):
            # compiled blocks launch the GEMM without its launcher, which sets Triton's allocator;
            # the transformer's forward is eager (regional compile), so set it there for this thread
            transformer.register_forward_pre_hook(lambda module, args: use_torch_allocator())
            transformer._kontext_tma_scratch_hook = True
        build.note(f"MLP epilogue: {installed} of {len(fused)} fused blocks run their MLP on the epilogue GEMMs")
        for kind, reason in unfit.items():
            build.note(f"MLP epilogue: {kind} keeps the row kernels: {reason}")
