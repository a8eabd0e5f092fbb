"""Stage 2: FlashAttention 3 for the transformer's joint attention.

`fa3` runs the FA3 bf16 kernel (preset 2); `fa3_fp8` feeds it e4m3 Q/K/V (preset 3, with the FP8
GEMMs: on an H100 it saved 9-11 ms per step and moved the picture no more than the FP8 GEMMs do;
benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-23/README.md). Where FA3
cannot run (no Hopper GPU, or the fa3-fwd package is missing) the stage falls back to cuDNN SDPA
through diffusers' own `_native_cudnn` backend and says so; `cudnn` asks for that backend directly.
"""

from __future__ import annotations

from .attention_kernels import FA3_MODULE, KERNELS
from .base import Availability, Requirements, Stage, StageReport

HOPPER = (9, 0)


def _fa3_unavailable_reason(env) -> str | None:
    if not env.has_cuda:
        return "needs a CUDA GPU; this machine has none"
    if env.compute_capability < HOPPER:
        cc = ".".join(map(str, env.compute_capability))
        return f"FA3 needs a Hopper GPU (compute capability 9.0); {env.gpu.name} is {cc}"
    if not env.has_package(FA3_MODULE):
        return "FA3 needs the fa3-fwd package (run setup_flux_optimized.sh on the GPU machine)"
    return None


class FlashAttention(Stage):
    switch = "attention"
    title = "FlashAttention 3"
    summary = "FlashAttention 3 (bf16, or FP8 with per-head scales) for the joint attention; cuDNN SDPA fallback."
    requirements = Requirements(cuda=True)

    def availability(self, env):
        reason = _fa3_unavailable_reason(env)
        if reason is None:
            return Availability(True, detail="FA3 (fa3-fwd); fa3_fp8 with per-head descales; cudnn")
        if env.has_cuda:
            return Availability(True, detail=f"cuDNN SDPA only ({reason})")
        return Availability(False, reason)

    def resolve(self, config, env):
        settled = self.unrequested_or_unmet(config, env)
        if settled is not None:
            return settled
        if config.attention in ("fa3", "fa3_fp8"):
            reason = _fa3_unavailable_reason(env)
            if reason:
                return config.with_changes(attention="cudnn"), StageReport(
                    self.name, True, True, detail="cuDNN SDPA (fallback)", reason=reason
                )
            precision = "FP8 e4m3 Q/K/V: Q and K scaled by their norm bound, V per head" if config.attention == "fa3_fp8" else "bf16"
            return config, StageReport(self.name, True, True, detail=f"FlashAttention 3 ({precision})")
        return config, StageReport(self.name, True, True, detail="cuDNN SDPA")

    def apply_execution(self, transformer, config, build):
        # imported here: it imports diffusers' models, which the registry's importers (the HTTP side) do not need
        from .flux_attention_processor import flux_attention_modules, set_attention_kernel

        if config.attention == "cudnn":
            for module in flux_attention_modules(transformer):
                module.set_attention_backend("_native_cudnn")  # per module: no global backend switch
            build.note("attention: cuDNN SDPA")
            return
        count = set_attention_kernel(transformer, KERNELS[config.attention])
        build.note(f"attention: {config.attention} in {count} joint-attention modules")
