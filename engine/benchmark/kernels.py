"""One transformer step under the profiler: where its time goes, by kernel class (GPU only).

The transformer's inputs are captured from a real edit of the benchmark's request, then the
variant's transformer is called on exactly those inputs under torch.profiler; kernel time is summed
per class and divided by the number of calls. "gaps" is the step's wall time (CUDA events, the same
calls) minus the kernel time: launch overhead and idle GPU.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from stages.config import OptimizationConfig

from ..engine import KontextEngine
from ..requests import EditRequest

# Order matters: Inductor names fused kernels after the ops they contain, so Triton kernels are
# classified first; those computing a row amax are FP8 activation quantizations (fused with whatever
# norm, modulation or GELU precedes them).
KERNEL_CLASSES = (
    ("quantization (fused, triton)", ("amax",)),
    ("other elementwise (fused, triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "xmma", "cutlass", "sm90_", "cublas", "nvjet", "scaled_mm", "matmul")),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((label for label, marks in KERNEL_CLASSES if any(mark in lowered for mark in marks)), "other elementwise (eager)")


def capture_transformer_inputs(engine: KontextEngine, request: EditRequest) -> dict:
    """The keyword arguments of the first transformer call of a one-step baseline edit."""
    captured: dict = {}

    def grab(module, args, kwargs):
        if not captured:
            captured.update(kwargs)

    handle = engine.loaded.pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        engine.edit(dataclasses.replace(request, steps=1), OptimizationConfig())
    finally:
        handle.remove()
    return captured


def step_breakdown(engine: KontextEngine, inputs: dict, config: OptimizationConfig, calls: int = 3) -> dict[str, float]:
    """Milliseconds per transformer call by kernel class, plus "gaps" (wall time minus kernel time)."""
    from torch.profiler import ProfilerActivity, profile

    pipe, _, _ = engine.variants.pipeline_for(engine.resolve(config).effective)
    transformer = pipe.transformer
    mark_step = config.cuda_graphs  # cudagraph trees need a step boundary between calls
    with torch.no_grad():
        for _ in range(2):  # compiled and captured outside the profile
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            transformer(**inputs)
        torch.cuda.synchronize()
        wall = []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                if mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                transformer(**inputs)
                end.record()
                end.synchronize()
                wall.append(start.elapsed_time(end))
    by_class: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or 0
        if device_us <= 0 or event.key.startswith("ProfilerStep"):
            continue
        label = kernel_class(event.key)
        by_class[label] = by_class.get(label, 0.0) + device_us / calls / 1000
    by_class["gaps"] = max(0.0, statistics.median(wall) - sum(by_class.values()))
    return {label: round(ms, 2) for label, ms in by_class.items()}
