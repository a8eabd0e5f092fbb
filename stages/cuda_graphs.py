"""Stage 5: CUDA graph capture of the denoising step."""

from __future__ import annotations

from .base import FlagStage, Requirements


class CudaGraphs(FlagStage):
    name = "cuda_graphs"
    flag = "cuda_graphs"
    benchmark_stage = 5
    summary = "CUDA graph capture of the denoising step (static buffers per shape)."
    requirements = Requirements(cuda=True)
    not_implemented = "issue: the GPU stack"
