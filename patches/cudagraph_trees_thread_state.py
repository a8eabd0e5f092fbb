"""Inductor's CUDA graph trees on a thread that did not import them.

Written for torch 2.11. Inductor keeps its CUDA graph tree managers per thread, in a threading.local
that `torch._inductor.cudagraph_trees` fills when it is imported, and copies into the threads that
autograd starts. Any other thread that runs a graph compiled with `triton.cudagraphs` fails with a
bare AssertionError in `cudagraph_trees.get_obj` (torch 2.11). The service's build thread does
(service/builds.py: a variant is compiled by a warm-up edit beside the serving thread): on an H100
(2026-12-06) every such build failed that way, and the request then built in turn, as if there were
no build thread. torch 2.13 initializes a new thread's trees itself (`_initialize_tls`); this gives
a thread the same state on 2.11: trees of its own, as 2.13 gives it.

`prepare_thread()` is called by a thread before it runs compiled code. On a torch that initializes
threads itself it does nothing; on an unknown torch without that it raises PatchVersionError.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from . import installed_version, require_known_torch

KNOWN_TORCH = ("2.11.0",)


def _torch_base_version() -> str | None:
    version = installed_version("torch")
    return version.split("+")[0] if version else None


def prepare_thread() -> str:
    """Give the calling thread its own CUDA graph tree state; returns what was done, for a log line."""
    from torch._inductor import cudagraph_trees

    if hasattr(cudagraph_trees, "_initialize_tls"):  # torch >= 2.13: get_obj initializes a new thread itself
        return "nothing to do: this torch initializes each thread's CUDA graph trees itself"
    base = require_known_torch(_torch_base_version(), KNOWN_TORCH, __name__)
    import torch

    local = cudagraph_trees.local
    if not hasattr(local, "tree_manager_containers"):
        # what torch 2.13's _initialize_tls does for a new thread
        local.tree_manager_containers = {}
        local.tree_manager_locks = defaultdict(threading.Lock)
        torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
        torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)
    return f"CUDA graph trees of its own for thread {threading.current_thread().name} (torch {base})"
