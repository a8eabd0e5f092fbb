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

# Order matters. The fused_kernels stage's kernels (stages/kernels/) come first, by their names; then
# Inductor's, named after the ops they contain: those computing a row amax are FP8 activation
# quantizations (fused with whatever norm, modulation or GELU precedes them).
FUSED_NORM = "fused: norm + modulation (+ residual) -> FP8"
FUSED_HEADS = "fused: q/k norm + RoPE (+ FP8)"
FUSED_GELU = "fused: GELU (+ concat) -> FP8"
FUSED_ATTENTION_OUT = "fused: attention output -> FP8"
INDUCTOR_OTHER = "other elementwise (fused, triton)"
KERNEL_CLASSES = (
    (FUSED_NORM, ("modulated_norm",)),
    (FUSED_HEADS, ("qk_norm_rope", "_v_fp8")),
    (FUSED_GELU, ("gelu_fp8",)),
    (FUSED_ATTENTION_OUT, ("rowwise_fp8", "_blocks_fp8")),
    ("quantization (fused, triton)", ("amax",)),
    (INDUCTOR_OTHER, ("triton",)),
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "xmma", "cutlass", "sm90_", "cublas", "nvjet", "scaled_mm", "matmul")),
)


# Kernel classes that are neither GEMM nor attention: the glue between them.
NOT_GLUE = ("gemm", "attention", "gaps")


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


@dataclasses.dataclass
class StepProfile:
    by_class: dict[str, float]  # ms per transformer call by kernel class, plus "gaps" (wall time minus kernel time)
    # the largest glue kernels (neither GEMM nor attention) by name: what the classes' totals are made of
    glue_kernels: list[dict]


def step_breakdown(engine: KontextEngine, inputs: dict, config: OptimizationConfig, calls: int = 3, top: int = 15) -> StepProfile:
    """Milliseconds per transformer call by kernel class, and the `top` largest glue kernels."""
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
    glue: list[dict] = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or 0
        if device_us <= 0 or event.key.startswith("ProfilerStep"):
            continue
        label = kernel_class(event.key)
        by_class[label] = by_class.get(label, 0.0) + device_us / calls / 1000
        if label not in NOT_GLUE:
            ms = round(device_us / calls / 1000, 3)
            glue.append({"kernel": event.key[:120], "class": label, "ms": ms, "calls": event.count // calls})
    by_class["gaps"] = max(0.0, statistics.median(wall) - sum(by_class.values()))
    glue.sort(key=lambda kernel: -kernel["ms"])
    return StepProfile({label: round(ms, 2) for label, ms in by_class.items()}, glue[:top])


def glue_bytes(
    transformer_config, batch: int, text_tokens: int, image_tokens: int, fp8_attention: bool, mlp_epilogue: bool = False
) -> dict[str, float]:
    """Bytes per transformer call that the fused kernels move, by kernel class (each input read once,
    each output written once; bf16 2 bytes, e4m3 1 byte; row scales left out), and what Inductor's
    remaining kernels move (the gated residual adds that end each block). stages/kernels/ states
    each kernel's bytes per row; this sums them over FLUX's blocks. With the MLP epilogue, GELU and
    the gated residual are part of the GEMMs (their bytes are not glue): what is left of them is the
    double blocks' text stream, and the single blocks' attention output is quantized on its own (3C)."""
    width = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    mlp = 4 * width  # FLUX's mlp_ratio
    tokens = batch * (text_tokens + image_tokens)  # token rows through every block (text + image)
    double, single = transformer_config.num_layers, transformer_config.num_single_layers
    blocks = double + single
    # h + gate * ff in double blocks, [text; image] + gate * proj in single ones: read 2 x 2C, write 2C
    residual_adds = tokens * blocks * 6 * width
    if mlp_epilogue:
        gelu = batch * text_tokens * double * 3 * mlp
        attention_out = tokens * (double + single) * 3 * width
        residual_adds = batch * text_tokens * double * 6 * width
    else:
        # GELU of the double blocks' MLP (3M) and the single blocks' [attention, GELU(mlp)] row (3(C + M))
        gelu = tokens * (double * 3 * mlp + single * 3 * (width + mlp))
        attention_out = tokens * double * 3 * width
    return {
        # norm1 of both streams (3C) and the residual + norm2 (7C) in double blocks; the norm in single blocks (3C)
        FUSED_NORM: tokens * (double * (3 + 7) + single * 3) * width,
        # q, k, v read (6C), q, k written; FP8: written as e4m3 (2C) and V read again and written (3C); bf16: q, k, v written (6C)
        FUSED_HEADS: tokens * blocks * (11 if fp8_attention else 12) * width,
        FUSED_GELU: gelu,
        FUSED_ATTENTION_OUT: attention_out,
        INDUCTOR_OTHER: residual_adds,
    }


def glue_bandwidth(kernel_ms: dict[str, float], bytes_by_class: dict[str, float], fused: bool) -> dict[str, float]:
    """GB/s by kernel class where its bytes are known (the fused kernels' classes), and for the glue as a
    whole: all of its bytes over all non-GEMM, non-attention kernel time. Without the fused kernels
    the same bytes are the work's minimum, so the whole-glue figure compares configurations."""
    rates = {}
    if fused:
        for label, moved in bytes_by_class.items():
            if kernel_ms.get(label):
                rates[label] = round(moved / (kernel_ms[label] * 1e-3) / 1e9, 1)
    glue_ms = sum(ms for label, ms in kernel_ms.items() if label not in NOT_GLUE)
    if glue_ms:
        rates["all glue"] = round(sum(bytes_by_class.values()) / (glue_ms * 1e-3) / 1e9, 1)
    return rates
