"""diffusers' context parallelism on a CPU-only torch (the gloo test of tests/test_context_parallel.py).

Written for diffusers 0.42.1. `ModelMixin._resolve_parallel_config` picks the rank's device as
`rank % torch.accelerator.device_count()`, which is 0 on a CPU-only torch: ZeroDivisionError before
anything is set up. The device it computes is not used for CPU tensors, so while
`enable_parallelism` runs on a machine without accelerators, the count reads 1. On a GPU machine
nothing is touched; on an unknown diffusers version it raises PatchVersionError instead.
"""

from __future__ import annotations

import contextlib

import torch

from . import require_known_version

KNOWN_DIFFUSERS = ("0.42.1",)


@contextlib.contextmanager
def cpu_device_count():
    if torch.accelerator.device_count() > 0:
        yield
        return
    require_known_version("diffusers", KNOWN_DIFFUSERS, "patches/diffusers_context_parallel_cpu.py")
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
