"""Stage 3: low-precision GEMMs (FP8 on Hopper/Ada; MX formats where the GPU has them)."""

from __future__ import annotations

from .base import Requirements, Stage


class LowPrecision(Stage):
    name = "quantization"
    benchmark_stage = 3
    summary = "Low-precision GEMMs through torchao: FP8 row-wise on Hopper/Ada, MXFP8/MXFP4/NVFP4 on Blackwell."
    requirements = Requirements(cuda=True, min_compute_capability=(8, 9), packages=("torchao",))
    not_implemented = "issue: the GPU stack"

    def is_requested(self, config):
        return config.quantization != "none"

    def switched_off(self, config):
        return config.with_changes(quantization="none")
