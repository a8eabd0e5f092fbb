"""The optimization config: the one vocabulary of every speed-up switch.

Each knob is declared once, here, as a field of `OptimizationConfig` with a `Knob` beside it that
says which stage owns it, when its value takes effect, which cumulative preset switches it on, and
which flat flag of the original HTTP API maps onto it. Everything else is derived from these
declarations: the command-line flags (cli/options.py), the HTTP `optimizations` object and the
legacy `use_*` flags (service/schemas.py), the presets (`cumulative_config`), the variant key (the
`variant` knobs) and the per-request policy (`load` and `variant` knobs need a build). A knob the
engine sets itself from other request fields (`user_facing=False`: the LoRA slots, set only for a
request that names adapters) is part of the variant key but has no flag and no HTTP field.

Importing this module is cheap (pydantic only), so the command line can build its --help from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

AttentionKernel = Literal["sdpa", "cudnn", "fa3", "fa3_fp8"]
QuantizationFormat = Literal["none", "auto", "fp8", "mxfp8", "mxfp4", "nvfp4"]
SchedulerName = Literal["euler", "dpmpp_2m_karras", "unipc"]
CacheBackend = Literal["auto", "para_attn", "diffusers"]
TransformerFp8 = Literal["off", "auto", "rowwise", "weight_only"]
TextEncoderPlacement = Literal["resident", "offloaded", "cpu"]

# When a knob's value takes effect: on every request (cheap), when a variant is built (a new value
# builds and keeps another copy of the modules it changes), or once when the model is loaded.
Scope = Literal["request", "variant", "load"]


@dataclass(frozen=True)
class LegacyFlag:
    """A flat boolean of the original API: true sets the knob to `on`, false to `off`."""

    name: str
    on: Any
    off: Any


@dataclass(frozen=True)
class Knob:
    stage: str  # the stage that owns the field (as named in responses, /health and doctor)
    scope: Scope
    preset: int | None = None  # the cumulative benchmark stage that switches it on
    preset_value: Any = True
    upgrade: tuple[int, Any] | None = None  # a later preset that moves it on again: (preset, value)

    def presets(self) -> tuple[tuple[int, Any], ...]:
        steps = ((self.preset, self.preset_value),) if self.preset is not None else ()
        return steps + ((self.upgrade,) if self.upgrade else ())

    legacy: tuple[LegacyFlag, ...] = ()
    user_facing: bool = True  # False: set by the engine, never by a flag or a request's `optimizations`


class OptimizationConfig(BaseModel):
    """Every stage's switch. The defaults are stage 0: plain diffusers with FlowMatch Euler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compile: Annotated[bool, Knob("compile", "variant", preset=1, legacy=(LegacyFlag("use_compile", True, False),))] = Field(
        False, description="Inductor compile of the transformer blocks (regional) and the VAE."
    )
    compile_tuning: Annotated[Literal["tuned", "fast"], Knob("compile", "variant")] = Field(
        "fast",
        description="tuned: coordinate-descent tuning of the compiled kernels (a longer first compile, faster steps); "
        "fast: Inductor's defaults.",
    )
    fuse_qkv: Annotated[bool, Knob("fuse_qkv", "variant", preset=1, legacy=(LegacyFlag("use_qkv_fusion", True, False),))] = Field(
        False, description="Fused Q/K/V projections (one GEMM instead of three) in the transformer and the VAE."
    )
    channels_last: Annotated[bool, Knob("channels_last", "variant", preset=1, legacy=(LegacyFlag("use_channels_last", True, False),))] = (
        Field(False, description="channels_last (NHWC) VAE decoder, where it measured faster (compiled, on a GPU).")
    )
    fast_gelu: Annotated[bool, Knob("fast_gelu", "variant", preset=1)] = Field(
        False, description="tanh GELU computed as x*sigmoid(2z): the same function in cheaper compiled kernels (needs compile)."
    )
    trim_reference_tokens: Annotated[bool, Knob("trim_reference_tokens", "variant", preset=1)] = Field(
        False, description="Drop the input image's tokens before the final norm and projection (exact: their output is discarded)."
    )
    first_block_cache: Annotated[
        bool, Knob("first_block_cache", "variant", preset=1, legacy=(LegacyFlag("use_first_block_cache", True, False),))
    ] = Field(False, description="Skip the other transformer blocks when the first block's residual barely changed.")
    cache_threshold: Annotated[float, Knob("first_block_cache", "request", preset=1, preset_value=0.12)] = Field(
        0.12, ge=0.0, le=10.0, allow_inf_nan=False, description="First-block cache: relative residual change under which a step is skipped."
    )
    cache_backend: Annotated[CacheBackend, Knob("first_block_cache", "variant")] = Field(
        "auto", description="First-block cache implementation (auto: para_attn when installed)."
    )
    split_proj_out: Annotated[bool, Knob("split_proj_out", "variant")] = Field(
        False, description="The single blocks' output GEMM split into attention and MLP halves: no concatenation, narrower FP8 rows."
    )
    attention: Annotated[
        AttentionKernel,
        # FP8 attention joins the low-precision preset: on an H100 it moved the picture no more than the
        # FP8 GEMMs do (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-23/fp8_fidelity.md)
        Knob(
            "attention",
            "variant",
            preset=2,
            preset_value="fa3",
            upgrade=(3, "fa3_fp8"),
            legacy=(LegacyFlag("use_flash_attention", "fa3", "sdpa"),),
        ),
    ] = Field("sdpa", description="Attention kernel: sdpa (torch's default), cudnn, fa3 (FlashAttention 3), fa3_fp8 (FA3 with FP8 Q/K/V).")
    quantization: Annotated[
        QuantizationFormat,
        Knob(
            "quantization",
            "variant",
            preset=3,
            preset_value="auto",
            # use_mxfp4 is the original API's name for "the low-precision GEMMs": the best native
            # format of this GPU (the response's `quantization` says which ran).
            legacy=(LegacyFlag("use_mxfp4", "auto", "none"), LegacyFlag("use_fp8", "fp8", "none")),
        ),
    ] = Field("none", description="Low-precision GEMMs: auto = the best native format of this GPU (FP8 on Ada/Hopper, MXFP8 on Blackwell).")
    # On with the FP8 GEMMs (preset 3): the fused kernels exist to feed them e4m3 activations.
    fused_kernels: Annotated[bool, Knob("fused_kernels", "variant", preset=3)] = Field(
        False,
        description="Fused Triton kernels between the FP8 GEMMs and attention (LayerNorm + modulation, residuals, q/k RMSNorm + "
        "RoPE, GELU), each writing its FP8 activations in one pass.",
    )
    # use_dpm_solver selects the sampler with the smallest error at 14 steps in
    # benchmarks/solver_fidelity.py (results in benchmarks/results/solver-fidelity/).
    scheduler: Annotated[
        SchedulerName,
        Knob(
            "scheduler",
            "request",
            preset=4,
            preset_value="dpmpp_2m_karras",
            legacy=(LegacyFlag("use_dpm_solver", "dpmpp_2m_karras", "euler"),),
        ),
    ] = Field("euler", description="Sampler: euler (FlowMatch Euler, 28 steps), dpmpp_2m_karras (DPM-Solver++ 2M Karras, 14), unipc (20).")
    cuda_graphs: Annotated[bool, Knob("cuda_graphs", "variant", preset=5, legacy=(LegacyFlag("use_cuda_graphs", True, False),))] = Field(
        False, description="CUDA graph capture of the transformer blocks (through compile)."
    )
    context_parallel: Annotated[int, Knob("context_parallel", "variant")] = Field(
        1,
        ge=1,
        le=8,
        description="Ulysses context parallelism: one edit split over this many GPUs (a torchrun launch of as many ranks, one per GPU).",
    )
    t5_fp8: Annotated[bool, Knob("text_encoder_fp8", "load")] = Field(
        False, description="FP8 weight-only T5 text encoder (about half its memory); chosen when the model loads."
    )
    # Set by the engine (engine/loras.py) for a request that names adapters, from the server's LoRA
    # settings; requests without adapters keep 0 and run the variant without LoRA layers.
    lora_slots: Annotated[int, Knob("lora", "variant", user_facing=False)] = Field(
        0, ge=0, le=16, description="LoRA slots in the transformer's Linears (0: no LoRA layers)."
    )
    lora_rank: Annotated[int, Knob("lora", "variant", user_facing=False)] = Field(
        0, ge=0, le=1024, description="Rank of each LoRA slot: the largest adapter rank the slots hold."
    )
    # Memory: chosen when the model loads, normally by the memory plan (engine/memory_plan.py) from the
    # GPU's free memory or --memory-budget; a flag given explicitly overrides the plan.
    transformer_fp8: Annotated[TransformerFp8, Knob("transformer_fp8", "load")] = Field(
        "off",
        description="FP8 transformer weights from the moment the model loads (quantized Linear by Linear while loading, or read from "
        "a prequantized checkpoint): the bf16 weights never reach the GPU. auto = rowwise (FP8 GEMMs) on Ada/Hopper, "
        "weight_only (FP8 storage, bf16 GEMMs) elsewhere.",
    )
    transformer_offload: Annotated[bool, Knob("transformer_offload", "load")] = Field(
        False, description="diffusers group offload: transformer blocks live in host memory and stream to the GPU one at a time."
    )
    text_encoders: Annotated[TextEncoderPlacement, Knob("text_encoder_offload", "load")] = Field(
        "resident",
        description="T5 and CLIP: resident on the GPU, offloaded (host memory, streamed to the GPU block by block to encode), "
        "or cpu (they encode on the CPU).",
    )
    vae_tiling: Annotated[bool, Knob("vae_tiling", "load")] = Field(
        False, description="The VAE encodes and decodes images larger than its tile (1024 px for FLUX) tile by tile: a lower peak."
    )

    def with_changes(self, **changes) -> "OptimizationConfig":
        """A copy with `changes` applied, validated like a new config (unknown names and bad values raise)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def describe(self) -> str:
        """The knobs that differ from stage 0, e.g. 'compile, fuse_qkv, attention=fa3'."""
        parts = []
        for name, value in self.model_dump().items():
            default = type(self).model_fields[name].default
            if value != default:
                parts.append(name if value is True else f"{name}={value}")
        return ", ".join(parts) or "stage 0 (nothing on)"


def _knob_of(name: str) -> Knob:
    return next(item for item in OptimizationConfig.model_fields[name].metadata if isinstance(item, Knob))


KNOBS: dict[str, Knob] = {name: _knob_of(name) for name in OptimizationConfig.model_fields}
USER_FIELDS: tuple[str, ...] = tuple(name for name, knob in KNOBS.items() if knob.user_facing)  # flags and HTTP fields
VARIANT_FIELDS: tuple[str, ...] = tuple(name for name, knob in KNOBS.items() if knob.scope == "variant")
LOAD_FIELDS: tuple[str, ...] = tuple(name for name, knob in KNOBS.items() if knob.scope == "load")
LEGACY_FLAGS: dict[str, tuple[str, LegacyFlag]] = {flag.name: (name, flag) for name, knob in KNOBS.items() for flag in knob.legacy}
MAX_PRESET = max(level for knob in KNOBS.values() for level, _ in knob.presets())


def choices(name: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed knob."""
    return get_args(OptimizationConfig.model_fields[name].annotation)


def preset_changes(preset: int) -> dict[str, Any]:
    """What cumulative preset `preset` adds on top of the one before it."""
    return {name: value for name, knob in KNOBS.items() for level, value in knob.presets() if level == preset}


def cumulative_config(preset: int) -> OptimizationConfig:
    """Cumulative benchmark stage `preset`: 0 = plain diffusers ... MAX_PRESET = everything."""
    if not 0 <= preset <= MAX_PRESET:
        raise ValueError(f"presets run from 0 to {MAX_PRESET}, not {preset}")
    changes: dict[str, Any] = {}
    for level in range(preset + 1):
        changes.update(preset_changes(level))
    return OptimizationConfig(**changes)


class ConflictingFlags(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def parse_presets(text: str) -> list[int]:
    """'0-5' or '0,1,4' -> sorted presets; ValueError on anything else."""
    stages: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                stages.extend(range(low, high + 1))
            elif part:
                stages.append(int(part))
        except ValueError:
            raise ValueError(f"stages {text!r}: write e.g. 0-{MAX_PRESET} or 0,4") from None
    if not stages or any(not 0 <= s <= MAX_PRESET for s in stages):
        raise ValueError(f"stages must lie in 0-{MAX_PRESET}, got {text!r}")
    return sorted(set(stages))


def legacy_changes(flags: dict[str, bool | None]) -> dict[str, Any]:
    """Config changes from the original API's flat flags that were given (None = not given).

    Raises ConflictingFlags when two true flags pick different values of one knob."""
    changes: dict[str, Any] = {}
    chosen_by: dict[str, str] = {}
    for flag_name, value in flags.items():
        if value is None:
            continue
        field, flag = LEGACY_FLAGS[flag_name]
        if value:
            if field in chosen_by and changes[field] != flag.on:
                raise ConflictingFlags(flag_name, f"{chosen_by[field]} and {flag_name} both pick {field}; set only one")
            changes[field], chosen_by[field] = flag.on, flag_name
        else:
            changes.setdefault(field, flag.off)  # a true flag for the same knob wins over a false one
    return changes
