"""Run graphs compiled for Inductor's CUDA graph trees without their CUDA graphs, on one thread, for a while.

Written for torch 2.11 and 2.13. A block compiled with `triton.cudagraphs` records a CUDA graph per
input shape at its second call on a thread, and the step that records costs far more than a step
that replays: on an H100 (2026-12-06, benchmarks/results/nvidia-h100-80gb-hbm3-2026-12-06-session4)
the first request at a shape not yet warm had one step at 3.0-5.5x the median, 0.35 s more for
every shape (the capture of 57 blocks, each behind a device synchronize). Torch has no switch for
one thread or one call: `triton.force_cudagraphs_warmup` is read process-wide, so setting it would
also stop the recording of a warm-up on the serving thread while a variant builds on another.

Inside `without_cuda_graphs()`, every compiled graph called on this thread runs the function
Inductor compiled, as it runs outside CUDA graph trees: the same kernels, launched one by one, their
outputs in the ordinary caching allocator. The tree manager is not touched: nothing is warmed up,
recorded or replayed, and a later call outside the context records the shape as if it had never run
(the warm-up step, then the recording). This is the path torch itself takes for a graph that mutates
an input it does not manage (`CUDAGraphTreeManager._run`: `self.ids_to_funcs[function_id].model`).

`install()` wraps `CUDAGraphTreeManager._run` once; on a torch it was not written for it raises
PatchVersionError. The engine uses it for `defer_graph_recording` (engine/engine.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading

from . import installed_version, require_known_torch

KNOWN_TORCH = ("2.11.0", "2.13.0")
_bypassing: contextvars.ContextVar[bool] = contextvars.ContextVar("kontext_without_cuda_graphs", default=False)
_installed = False
_lock = threading.Lock()


def installed() -> bool:
    return _installed


def install() -> str:
    """Wrap the tree manager's dispatch once; returns what was done, for a log line."""
    global _installed
    base = require_known_torch(installed_version("torch"), KNOWN_TORCH, __name__)
    with _lock:
        if _installed:
            return "already installed"
        from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

        dispatch = CUDAGraphTreeManager._run

        @functools.wraps(dispatch)
        def run_or_bypass(self, new_inputs, function_id):
            if _bypassing.get():
                return self.ids_to_funcs[function_id].model(new_inputs)
            return dispatch(self, new_inputs, function_id)

        CUDAGraphTreeManager._run = run_or_bypass
        _installed = True
    return f"compiled graphs can run without their CUDA graphs on one thread (torch {base})"


@contextlib.contextmanager
def without_cuda_graphs():
    """Compiled graphs called on this thread inside the block run without CUDA graphs."""
    if not _installed:
        raise RuntimeError(f"{__name__}.install() must run before without_cuda_graphs() is used")
    token = _bypassing.set(True)
    try:
        yield
    finally:
        _bypassing.reset(token)
