"""Stage 5: CUDA graph capture of the denoising step.

The compile stage builds the blocks with `mode="reduce-overhead"`, so Inductor's cudagraph trees
record each block call once per input shape (static buffers per shape) and replay it afterwards:
one launch per block instead of dozens of kernels. Everything between blocks, including the
first-block cache's skip decision, stays eager, outside the captured regions, so the decision is
still made every step. Each transformer call starts a new cudagraph-tree step, which tells Inductor
that the previous step's outputs may be overwritten.
"""

from __future__ import annotations

import torch

from .base import FlagStage, Requirements, StageReport


# Measured on the H200 (benchmarks/results/nvidia-h200-2026-11-22): every edit failed with "accessing
# tensor output of CUDAGraphs that has been overwritten by a subsequent run". (The registry resolves
# the cache stage first, so `auto` has already become a concrete backend here.)
DIFFUSERS_CACHE_REASON = (
    "not applied: diffusers' first-block cache subtracts block outputs across blocks, and under cudagraph "
    "trees those outputs are overwritten by the next replay; use cache_backend=para_attn to keep CUDA graphs"
)


def _mark_step_begin(module, args):
    torch.compiler.cudagraph_mark_step_begin()


class CudaGraphs(FlagStage):
    name = "cuda_graphs"
    flag = "cuda_graphs"
    benchmark_stage = 5
    summary = "CUDA graph capture of the transformer blocks (Inductor cudagraph trees, static buffers per shape)."
    requirements = Requirements(cuda=True)
    needs_compile = "CUDA graphs are captured through torch.compile here: turn on compile"

    def describe_available(self, env):
        return "via torch.compile mode=reduce-overhead (needs compile on)"

    def resolve(self, config, env):
        config, report = super().resolve(config, env)
        if report.active and config.first_block_cache and config.cache_backend == "diffusers":
            return self.switched_off(config), StageReport(self.name, True, False, reason=DIFFUSERS_CACHE_REASON)
        if report.active:
            report = StageReport(self.name, True, True, detail="Inductor cudagraph trees per block and shape")
        return config, report

    def apply_execution(self, transformer, config, build):
        transformer.register_forward_pre_hook(_mark_step_begin)
        build.note("cuda graphs: blocks captured on first call per shape")
