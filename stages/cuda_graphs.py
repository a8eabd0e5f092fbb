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

Every block takes the step's time embedding and RoPE tables (cos, sin), which the transformer
computes eagerly before the blocks. A graph copies each input it does not know to be static into
its own buffer before each replay: 3 copies per block, 171 per step (0.63 ms of an H100 step, 173
"Memcpy DtoD" in the profile of benchmarks/results/nvidia-h100-80gb-hbm3-2026-12-06-session3).
With `graph_inputs="static"` the embeddings are written once per step into buffers marked as static
addresses (`torch._dynamo.mark_static_address`, unguarded), which every block's graph reads in
place. One buffer per thread and shape: graphs are recorded per thread and per shape, and a static
input whose address changed would be recorded again.

The text encoders' graphs belong to the engine (engine/text_encoder_graphs.py): every variant shares
the encoders, so they are recorded once per loaded model, by the first edit that records the blocks.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

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


class StaticInputs:
    """Buffers at fixed addresses for tensors computed outside the graphs: one per thread, name and
    shape, each written in place (stream-ordered, so a later write waits for the graphs that read the
    last one)."""

    def __init__(self):
        self._local = threading.local()

    def hold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (name, tuple(tensor.shape), tensor.dtype, tensor.device)
        buffer = buffers.get(key)
        if buffer is None:
            buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            torch._dynamo.mark_static_address(buffer, guard=False)  # unguarded: no recompile per buffer
            buffers[key] = buffer
        return buffer.copy_(tensor)


_STATIC_INPUTS = StaticInputs()


def _hold_embeddings(name: str):
    def hook(module, args, output):
        if isinstance(output, tuple):  # the RoPE tables (cos, sin)
            return tuple(_STATIC_INPUTS.hold(f"{name}[{index}]", part) for index, part in enumerate(output))
        return _STATIC_INPUTS.hold(name, output)

    return hook


def hold_block_inputs_static(transformer) -> int:
    """The transformer's per-step embeddings (time and RoPE) come out in static buffers; returns how
    many modules it hooked (once per module, whichever variants share it)."""
    hooked = 0
    for name in ("time_text_embed", "pos_embed"):
        module = getattr(transformer, name, None)
        if module is not None and not getattr(module, "_kontext_static_output", False):
            module.register_forward_hook(_hold_embeddings(name))
            module._kontext_static_output = True
            hooked += 1
    return hooked


class CudaGraphs(Stage):
    switch = "cuda_graphs"
    title = "CUDA graph capture"
    summary = (
        "CUDA graph capture of the transformer blocks (Inductor cudagraph trees, static buffers per shape) "
        "and of the text encoders where they stay on the GPU (engine/text_encoder_graphs.py)."
    )
    requirements = Requirements(cuda=True)

    def describe_available(self, env):
        return "via Inductor cudagraph trees (needs compile on)"

    def active_detail(self, config, env):
        return "Inductor cudagraph trees per block and shape"

    def apply_execution(self, transformer, config, build):
        transformer.register_forward_pre_hook(_mark_step_begin)
        build.note("cuda graphs: blocks captured on first call per shape")
        if config.graph_inputs == "static":
            hold_block_inputs_static(transformer)
            build.note("cuda graphs: time embedding and RoPE tables in static buffers (read in place by every block's graph)")

    def apply_request(self, run, config):
        from patches.compile_beside_serving import installed

        if run.background and not installed():
            run.contexts.append(_unmarked())
