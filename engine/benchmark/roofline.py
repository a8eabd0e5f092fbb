"""The floor under a denoising step: FLOPs counted on the model, ceilings measured on this GPU.

FLOPs are counted with hooks during one real transformer call (every Linear: 2*M*K*N; every joint
attention: 4*S^2*H*D for QK^T and PV), so they follow the actual token counts of the request.
Ceilings are measured in the same process as the benchmark on random data: a large bf16 GEMM, a
large FP8 row-wise `_scaled_mm`, and each attention kernel at the model's own attention shape. The
floor of a configuration is the sum of its GEMM and attention FLOPs over the ceilings of the kernels
it uses; memory-bound work (norms, activations, quantization) is not in it, which is what the gap
between measured time and floor shows.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import asdict, dataclass

import torch

from stages import attention_kernels
from stages.config import OptimizationConfig
from stages.low_precision import is_quantized_linear

from ..engine import KontextEngine
from ..requests import EditRequest


@dataclass
class StepFlops:
    linear_quantizable: float  # Linears the low-precision stage converts
    linear_other: float  # embedders, modulation, final projection (stay bf16)
    attention: float
    attention_shape: tuple[int, int, int, int]  # (batch, tokens, heads, head_dim)

    @property
    def total(self) -> float:
        return self.linear_quantizable + self.linear_other + self.attention

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def count_step_flops(engine: KontextEngine, request: EditRequest) -> StepFlops:
    """FLOPs of one transformer call for `request`'s shapes (runs a one-step baseline edit)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    transformer = engine.loaded.pipe.transformer  # the baseline variant runs the base module itself
    counts = {"quantizable": 0.0, "other": 0.0, "attention": 0.0}
    shape: list = [None]
    handles = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = "quantizable" if is_quantized_linear(module, name) else "other"

            def count_linear(mod, args, output, key=key):
                rows = args[0].numel() // args[0].shape[-1]
                counts[key] += 2.0 * rows * mod.in_features * mod.out_features

            handles.append(module.register_forward_hook(count_linear))
        elif isinstance(module, FluxAttention):

            def count_attention(mod, args, kwargs, output):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                encoder = kwargs.get("encoder_hidden_states")
                tokens = hidden.shape[1] + (encoder.shape[1] if encoder is not None else 0)
                counts["attention"] += 4.0 * hidden.shape[0] * tokens**2 * mod.heads * mod.head_dim
                shape[0] = (hidden.shape[0], tokens, mod.heads, mod.head_dim)

            handles.append(module.register_forward_hook(count_attention, with_kwargs=True))
    try:
        engine.edit(dataclasses.replace(request, steps=1), OptimizationConfig())
    finally:
        for handle in handles:
            handle.remove()
    return StepFlops(counts["quantizable"], counts["other"], counts["attention"], shape[0])


def median_cuda_ms(fn, warmup: int = 3, repeats: int = 15) -> float:
    """Median milliseconds of `fn` on the GPU (CUDA events), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(attention_shape: tuple[int, int, int, int], gemm_size: int = 8192) -> dict[str, float]:
    """TFLOP/s of the kernels the stages use, measured here and now on random data."""
    ceilings: dict[str, float] = {}
    n = gemm_size
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm_flops = 2.0 * n**3
    ceilings["gemm_bf16"] = gemm_flops / median_cuda_ms(lambda: a @ b) / 1e9
    if torch.cuda.get_device_capability() >= (8, 9):
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        scale_a = torch.ones(n, 1, device="cuda", dtype=torch.float32)
        scale_b = torch.ones(1, n, device="cuda", dtype=torch.float32)
        fp8 = lambda: torch._scaled_mm(a8, b8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16, use_fast_accum=True)  # noqa: E731
        ceilings["gemm_fp8_rowwise"] = gemm_flops / median_cuda_ms(fp8) / 1e9

    batch, tokens, heads, head_dim = attention_shape
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attention_flops = 4.0 * batch * tokens**2 * heads * head_dim
    ceilings["attention_sdpa"] = attention_flops / median_cuda_ms(lambda: attention_kernels.sdpa(q, k, v)) / 1e9
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return attention_kernels.sdpa(q, k, v)

    try:
        ceilings["attention_cudnn"] = attention_flops / median_cuda_ms(cudnn) / 1e9
    except RuntimeError:
        pass
    try:
        ceilings["attention_fa3"] = attention_flops / median_cuda_ms(lambda: attention_kernels.fa3_bf16(q, k, v)) / 1e9
        # The kernel alone, on Q/K/V quantized beforehand: in the compiled model the quantization is
        # fused into the kernels before attention (the profile counts it as quantization). Timing it
        # here, eager and unfused, put this ceiling at 471 TFLOP/s, below bf16 FA3's 679 (H100).
        quantized = attention_kernels.quantize_qkv_fp8(q, k, v, q.abs().amax(), k.abs().amax())
        ceilings["attention_fa3_fp8"] = attention_flops / median_cuda_ms(lambda: attention_kernels.fa3_on_fp8(*quantized)) / 1e9
    except (ImportError, RuntimeError):
        pass
    return {name: round(value, 1) for name, value in ceilings.items()}


def measure_copy_bandwidth(gib: float = 2.0) -> float:
    """GB/s of a large device-to-device copy (bytes read plus bytes written): the memory ceiling that
    the elementwise kernels are held against."""
    src = torch.randn(int(gib * 2**30) // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_cuda_ms(lambda: dst.copy_(src))
    return round(2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9, 1)


def floor_ms(flops: StepFlops, ceilings: dict[str, float], config: OptimizationConfig) -> float | None:
    """The fastest a step of `config` (as it ran) could be on these ceilings, in milliseconds. FP8
    GEMMs count where the block Linears are FP8 row-wise: stage 3's quantization, or FP8 weights from
    load (before 2026-12-04 the latter was counted as bf16, which put such a floor above the step)."""
    gemm_bf16 = ceilings.get("gemm_bf16")
    fp8_gemms = config.quantization == "fp8" or config.transformer_fp8 == "rowwise"
    gemm_quantized = ceilings.get("gemm_fp8_rowwise") if fp8_gemms else gemm_bf16
    attention = ceilings.get(
        {"sdpa": "attention_sdpa", "cudnn": "attention_cudnn", "fa3": "attention_fa3", "fa3_fp8": "attention_fa3_fp8"}[config.attention]
    )
    if not (gemm_bf16 and gemm_quantized and attention):
        return None
    seconds = (
        flops.linear_quantizable / (gemm_quantized * 1e12) + flops.linear_other / (gemm_bf16 * 1e12) + flops.attention / (attention * 1e12)
    )
    return seconds * 1e3
