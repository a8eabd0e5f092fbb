"""Stage 5: CUDA graph capture of the denoising step.

The compile stage builds the blocks with Inductor's cudagraph trees (`triton.cudagraphs`), so each
block call is recorded once per input shape (static buffers per shape) and replayed afterwards:
one launch per block instead of dozens of kernels. Everything between blocks, including the
first-block cache's skip decision, stays eager, outside the captured regions, so the decision is
still made every step. Each transformer call starts a new cudagraph-tree step, which tells Inductor
that the previous step's outputs may be overwritten. Rules with compile and the cache backend:
stages/rules.py.

Inductor counts those step marks in one process-wide counter, while each thread records and replays
its own graphs. A server that builds variants beside the serving thread makes the counter per
thread (patches/compile_beside_serving.py), and then the build thread marks its own steps. Without
that patch an edit beside the serving thread (`RequestContext.background`) marks no steps, since
its marks would end the serving thread's generation in the middle of a step; the serving thread's
marks still end the background edit's (the failure that patch exists for).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .base import Requirements, Stage

_marks_steps: contextvars.ContextVar[bool] = contextvars.ContextVar("kontext_cuda_graph_marks_steps", default=True)


def _mark_step_begin(module, args):
    if _marks_steps.get():
        torch.compiler.cudagraph_mark_step_begin()


@contextlib.contextmanager
def _unmarked():
    token = _marks_steps.set(False)
    try:
        yield
    finally:
        _marks_steps.reset(token)


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

    def apply_request(self, run, config):
        from patches.compile_beside_serving import installed

        if run.background and not installed():
            run.contexts.append(_unmarked())
