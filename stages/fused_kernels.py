"""Stage 3: fused Triton kernels for the elementwise work between the FP8 GEMMs and the attention.

With the GEMMs and FA3 at their ceilings, what remained of a step was the glue between them:
LayerNorm + AdaLN modulation, the gated residuals, q/k RMSNorm + RoPE, GELU and the single blocks'
concatenation, each followed by the row-wise FP8 quantization of the next GEMM's input, which
Inductor can only fuse as a reduction pass and a cast pass. This stage gives every double and
single block a forward (stages/fused_blocks.py) whose glue runs in one-pass kernels
(stages/kernels/) that write the FP8 activations and their row scales, which the FP8 GEMMs take
directly. The function is the block's own (tests/test_fused_blocks.py); the rounding differs only
in that intermediates stay in fp32 instead of being rounded to bf16.

It needs the FP8 row-wise weights of stage 3 (or FP8 weights from load) and an attention kernel the
fused inputs feed (FA3 FP8, FA3, SDPA); the rules in stages/rules.py switch it off otherwise, with
the reason. It runs with or without compile: the kernels are torch custom ops, so Inductor,
regional compile and CUDA graphs see ordinary ops.
"""

from __future__ import annotations

from patches import installed_version

from .base import Availability, Requirements, Stage

KNOWN_DIFFUSERS = ("0.42.1",)  # the block forwards restate this version's FluxTransformerBlock/FluxSingleTransformerBlock


class FusedKernels(Stage):
    switch = "fused_kernels"
    title = "fused Triton kernels (norm, modulation, RoPE, GELU, FP8 activations in one pass)"
    summary = "Fused Triton kernels for the glue between the FP8 GEMMs and attention, writing FP8 activations in one pass."
    requirements = Requirements(cuda=True, min_compute_capability=(8, 9), packages=("triton",))

    def availability(self, env):
        unmet = self.requirements.unmet(env)
        if unmet:
            return Availability(False, unmet)
        version = installed_version("diffusers")
        if version not in KNOWN_DIFFUSERS:
            return Availability(False, f"the fused blocks restate diffusers {', '.join(KNOWN_DIFFUSERS)}'s blocks; {version} is installed")
        return Availability(True, detail="Triton kernels as torch custom ops; FP8 GEMMs on their e4m3 output")

    def active_detail(self, config, env):
        inputs = "FP8 e4m3" if config.attention == "fa3_fp8" else "bf16"
        return f"LayerNorm + modulation, residuals, GELU -> FP8 rows; q/k RMSNorm + RoPE -> {inputs} attention inputs"

    def apply_execution(self, transformer, config, build):
        from .fused_blocks import install_fused_forward, unfusable_reason

        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        left = {}  # a block whose Linears torchao left in bf16 (sizes it cannot quantize) keeps diffusers' forward
        for index, block in enumerate(blocks):
            reason = unfusable_reason(block)
            if reason:
                left[index] = reason
            else:
                install_fused_forward(block, config.attention)
        fused = len(blocks) - len(left)
        build.note(f"fused kernels: {fused} of {len(blocks)} blocks run their glue in fused Triton kernels ({config.attention} attention)")
        if left:
            build.note(f"fused kernels: blocks {sorted(left)} keep diffusers' forward: {next(iter(left.values()))}")
