"""The optimization config: one object that says which speed-ups an edit should use.

It is shared by the CLI (global defaults), the HTTP API (per-request overrides) and the benchmark
(cumulative presets). Fields that change how the model is built (fusion, quantization, compile,
attention kernel, CUDA graphs, the cache wrapper) form the variant key; the rest (scheduler, steps,
cache threshold) are cheap per-request settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AttentionBackend = Literal["sdpa", "cudnn", "fa3", "fa3_fp8"]
QuantizationFormat = Literal["none", "auto", "fp8", "mxfp8", "mxfp4", "nvfp4"]
SchedulerName = Literal["euler", "dpmpp_2m_karras", "unipc"]
CacheBackend = Literal["auto", "para_attn", "diffusers"]

# The fields whose value changes the built modules. Everything else is applied per request.
BUILD_FIELDS = (
    "fuse_qkv",
    "quantization",
    "channels_last",
    "fast_gelu",
    "attention",
    "first_block_cache",
    "cache_backend",
    "compile",
    "cuda_graphs",
)


class OptimizationConfig(BaseModel):
    """Every stage's switch. The defaults are stage 0: plain bf16 diffusers with FlowMatch Euler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compile: bool = Field(False, description="Inductor compile of the transformer blocks and the VAE (stage 1).")
    fuse_qkv: bool = Field(False, description="Fuse Q/K/V projections in the transformer and VAE (stage 1).")
    channels_last: bool = Field(False, description="channels_last memory format for the VAE (stage 1).")
    fast_gelu: bool = Field(False, description="tanh GELU computed as x*sigmoid(2z), the same function in cheaper compiled kernels (stage 1; needs compile).")
    first_block_cache: bool = Field(False, description="Skip the remaining blocks when the first block barely changed (stage 1).")
    cache_threshold: float = Field(0.12, ge=0.0, le=10.0, description="First-block cache: relative change under which a step is skipped.")
    cache_backend: CacheBackend = Field("auto", description="First-block cache implementation.")
    attention: AttentionBackend = Field("sdpa", description="Attention kernel: sdpa (torch default), cudnn, fa3, fa3_fp8 (stage 2).")
    quantization: QuantizationFormat = Field("none", description="Low-precision GEMMs; auto = best native format of this GPU (stage 3).")
    scheduler: SchedulerName = Field("euler", description="Sampler: euler (FlowMatch Euler), dpmpp_2m_karras (stage 4), unipc.")
    steps: int | None = Field(None, ge=1, le=200, description="Denoising steps; None = the scheduler's default (28 Euler, 14 DPM-Solver++).")
    cuda_graphs: bool = Field(False, description="CUDA graph capture of the denoising step (stage 5).")

    def build_key(self) -> tuple:
        return tuple((name, getattr(self, name)) for name in BUILD_FIELDS)

    def with_changes(self, **changes) -> "OptimizationConfig":
        return self.model_copy(update=changes)

    def describe(self) -> str:
        on = [name for name in ("compile", "fuse_qkv", "channels_last", "fast_gelu", "first_block_cache", "cuda_graphs") if getattr(self, name)]
        return ", ".join(on + [f"attention={self.attention}", f"quantization={self.quantization}", f"scheduler={self.scheduler}"])
