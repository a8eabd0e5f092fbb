"""Two pieces of process-wide state that make a thread compiling beside the serving thread break it.

Written for torch 2.11 and 2.13. The service builds a variant on a thread of its own while the
serving thread runs compiled code (service/builds.py). On an H100 (2026-12-06, torch 2.11) that
failed in two ways, both from state torch keeps for the whole process:

1. FX tracing. AOTAutograd traces with `torch.fx.Tracer.trace`, which sets the module-wide flag
   `torch.fx._symbolic_trace._is_fx_tracing_flag` while it runs. Every function that torch.compile
   wrapped checks that flag on entry, on every thread, and raises "Detected that you are using FX to
   symbolically trace a dynamo-optimized function". So a request or warm-up on the serving thread
   failed whenever the build thread was tracing (the warm-up of 720x1456 did). Here the flag counts
   only on the thread that set it: `Tracer.trace` also counts its depth per thread, and the check
   that compiled functions bind (`is_fx_symbolic_tracing`) asks for both.
2. CUDA graph step marks. `torch.compiler.cudagraph_mark_step_begin()` lowers one process-wide
   counter (`cudagraph_trees.MarkStepBox.mark_step_counter`), while each thread keeps its own CUDA
   graph trees. The serving thread's marks ended the build thread's generation in the middle of its
   warm-up, whose outputs were then freed under it: "accessing tensor output of CUDAGraphs that has
   been overwritten by a subsequent run". Here a thread that marks steps has its own counter, and a
   thread that never marked (autograd's, in training) reads the last mark of any thread, as before.

One thread alone behaves exactly as without the patch. `install()` must run before torch.compile
wraps the functions (compiled functions bind the check when they are wrapped): service/startup.py
calls it before the model is built. On a torch it was not written for it raises PatchVersionError.
"""

from __future__ import annotations

import functools
import threading

from . import installed_version, require_known_torch

KNOWN_TORCH = ("2.11.0", "2.13.0")
_installed = False
_lock = threading.Lock()


class _PerThreadMarkStepBox:
    """Stands in for cudagraph_trees.MarkStepBox: `mark_step_counter` per thread that marks steps."""

    def __init__(self, start: int):
        self._local = threading.local()
        self._last = start  # the last value any thread set: what a thread that never marked reads

    @property
    def mark_step_counter(self) -> int:
        return getattr(self._local, "counter", self._last)

    @mark_step_counter.setter
    def mark_step_counter(self, value: int) -> None:
        self._local.counter = value
        self._last = value


def installed() -> bool:
    return _installed


def install() -> str:
    """Apply both fixes once; returns what was done, for a log line."""
    global _installed
    base = require_known_torch(installed_version("torch"), KNOWN_TORCH, __name__)
    with _lock:
        if _installed:
            return "already installed"
        from torch._inductor import cudagraph_trees
        from torch.fx import _symbolic_trace

        tracing = threading.local()
        trace = _symbolic_trace.Tracer.trace
        symbolic_tracing = _symbolic_trace.is_fx_symbolic_tracing

        @functools.wraps(trace)
        def trace_counted(self, *args, **kwargs):
            tracing.depth = getattr(tracing, "depth", 0) + 1
            try:
                return trace(self, *args, **kwargs)
            finally:
                tracing.depth -= 1

        def is_fx_symbolic_tracing_on_this_thread() -> bool:
            return getattr(tracing, "depth", 0) > 0 and symbolic_tracing()

        _symbolic_trace.Tracer.trace = trace_counted
        _symbolic_trace.is_fx_symbolic_tracing = is_fx_symbolic_tracing_on_this_thread
        cudagraph_trees.MarkStepBox = _PerThreadMarkStepBox(cudagraph_trees.MarkStepBox.mark_step_counter)
        _installed = True
    return f"FX tracing and CUDA graph step marks per thread (torch {base})"
