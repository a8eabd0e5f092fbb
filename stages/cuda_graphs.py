"""Stage 5: CUDA graph capture of the denoising step.

The compile stage builds the blocks with Inductor's cudagraph trees (`triton.cudagraphs`), so each
block call is recorded once per input shape (static buffers per shape) and replayed afterwards:
one launch per block instead of dozens of kernels. Everything between blocks, including the
first-block cache's skip decision, stays eager, outside the captured regions, so the decision is
still made every step. Each transformer call starts a new cudagraph-tree step, which tells Inductor
that the previous step's outputs may be overwritten. Rules with compile and the cache backend:
stages/rules.py.
"""

from __future__ import annotations

import torch

from .base import Requirements, Stage


def _mark_step_begin(module, args):
    torch.compiler.cudagraph_mark_step_begin()


class CudaGraphs(Stage):
    switch = "cuda_graphs"
    title = "CUDA graph capture"
    summary = "CUDA graph capture of the transformer blocks (Inductor cudagraph trees, static buffers per shape)."
    requirements = Requirements(cuda=True)

    def describe_available(self, env):
        return "via Inductor cudagraph trees (needs compile on)"

    def active_detail(self, config, env):
        return "Inductor cudagraph trees per block and shape"

    def apply_execution(self, transformer, config, build):
        transformer.register_forward_pre_hook(_mark_step_begin)
        build.note("cuda graphs: blocks captured on first call per shape")
