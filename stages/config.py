"""The optimization config: the one vocabulary of every speed-up switch, and every stage's declaration.

Each knob is declared once, here, as a field of `OptimizationConfig` with a `Knob` beside it. A
stage is declared once too: by its `Switch`, the knob that switches it on. The stage is named after
that field, is off at the field's default (stage 0), joins the cumulative preset `preset`, and acts
in the phases it lists; its other knobs (`Knob(stage=...)`) name the switch they belong to. The
stage's module (one per stage) implements the hooks of those phases and names its switch; the
registry (registry.py) orders the stages. Everything else is derived from these declarations: the
command-line flags (cli/options.py), the HTTP `optimizations` object and the legacy `use_*` flags
(service/schemas.py), the presets (`cumulative_config`), the variant key (the `variant` knobs) and
the per-request policy (`load` and `variant` knobs need a build). A knob the engine sets itself from
other request fields (`user_facing=False`: the LoRA mode and slots, set only for a request that
names adapters) is part of the variant key but has no flag and no HTTP field.

Importing this module is cheap (pydantic only), so the command line can build its --help from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

AttentionKernel = Literal["sdpa", "cudnn", "fa3", "fa3_fp8"]
QuantizationFormat = Literal["none", "auto", "fp8", "mxfp8", "mxfp4", "nvfp4"]
SchedulerName = Literal["euler", "dpmpp_2m_karras", "unipc"]
CacheBackend = Literal["auto", "para_attn", "diffusers"]
TransformerFp8 = Literal["off", "auto", "rowwise", "weight_only"]
TextEncoderPlacement = Literal["resident", "offloaded", "cpu"]
LoraMode = Literal["off", "slots", "merge"]
GraphInputs = Literal["copied", "static"]

# When a knob's value takes effect: on every request (cheap), when a variant is built (a new value
# builds and keeps another copy of the modules it changes), or once when the model is loaded.
Scope = Literal["request", "variant", "load"]


class Phase(enum.Enum):
    """When a stage acts; each phase has one hook (stages/base.py), named by the value."""

    LOAD = "apply_load"  # once, when the model loads: precision and placement of the base components
    WEIGHTS = "apply_weights"  # once per weight variant (fusion, quantization)
    VAE = "apply_vae"  # once per VAE variant
    EXECUTION = "apply_execution"  # once per execution variant (kernels, cache, compile, graphs)
    REQUEST = "apply_request"  # on every request (sampler, adapters, cache state)


@dataclass(frozen=True)
class LegacyFlag:
    """A flat boolean of the original API: true sets the knob to `on`, false to `off`."""

    name: str
    on: Any
    off: Any


@dataclass(frozen=True)
class Knob:
    """A setting of a stage: when its value takes effect, and the stage it belongs to (the field name
    of that stage's `Switch`; a Switch's own stage is itself)."""

    scope: Scope
    stage: str = ""
    preset: int | None = None  # the cumulative preset that sets it to `preset_value`
    preset_value: Any = True
    upgrade: tuple[int, Any] | None = None  # a later preset that moves it on again: (preset, value)
    legacy: tuple[LegacyFlag, ...] = ()
    user_facing: bool = True  # False: set by the engine, never by a flag or a request's `optimizations`

    def presets(self) -> tuple[tuple[int, Any], ...]:
        steps = ((self.preset, self.preset_value),) if self.preset is not None else ()
        return steps + ((self.upgrade,) if self.upgrade else ())


@dataclass(frozen=True)
class Switch(Knob):
    """The knob that switches a stage on: the stage's one declaration (name, switch, preset, phases)."""

    phases: tuple[Phase, ...] = ()


@dataclass(frozen=True)
class StageDeclaration:
    """What a stage's Switch declares, as the stage classes and the registry read it."""

    name: str  # the switch field: the stage's name in responses, /health, doctor and rules
    off: Any  # the switch's default: the value that means "stage 0"
    preset: int | None  # the cumulative preset that switches it on (None: an option)
    phases: frozenset[Phase]
    knobs: tuple[str, ...]  # the switch, then the stage's other knobs


class OptimizationConfig(BaseModel):
    """Every stage's switch. The defaults are stage 0: plain diffusers with FlowMatch Euler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- phases in the order they run: LOAD once, then WEIGHTS, EXECUTION and VAE per variant, REQUEST per edit
    compile: Annotated[
        bool,
        Switch("variant", preset=1, phases=(Phase.EXECUTION, Phase.VAE), legacy=(LegacyFlag("use_compile", True, False),)),
    ] = Field(False, description="Inductor compile of the transformer blocks (regional) and the VAE.")
    compile_tuning: Annotated[Literal["tuned", "fast"], Knob("variant", stage="compile")] = Field(
        "fast",
        description="tuned: coordinate-descent tuning of the compiled kernels (a longer first compile, faster steps); "
        "fast: Inductor's defaults.",
    )
    fuse_qkv: Annotated[
        bool, Switch("variant", preset=1, phases=(Phase.WEIGHTS, Phase.VAE), legacy=(LegacyFlag("use_qkv_fusion", True, False),))
    ] = Field(False, description="Fused Q/K/V projections (one GEMM instead of three) in the transformer and the VAE.")
    channels_last: Annotated[
        bool, Switch("variant", preset=1, phases=(Phase.VAE,), legacy=(LegacyFlag("use_channels_last", True, False),))
    ] = Field(False, description="channels_last (NHWC) VAE decoder, where it measured faster (compiled, on a GPU).")
    fast_gelu: Annotated[bool, Switch("variant", preset=1, phases=(Phase.EXECUTION,))] = Field(
        False, description="tanh GELU computed as x*sigmoid(2z): the same function in cheaper compiled kernels (needs compile)."
    )
    trim_reference_tokens: Annotated[bool, Switch("variant", preset=1, phases=(Phase.EXECUTION, Phase.REQUEST))] = Field(
        False, description="Drop the input image's tokens before the final norm and projection (exact: their output is discarded)."
    )
    first_block_cache: Annotated[
        bool,
        Switch("variant", preset=1, phases=(Phase.EXECUTION, Phase.REQUEST), legacy=(LegacyFlag("use_first_block_cache", True, False),)),
    ] = Field(False, description="Skip the other transformer blocks when the first block's residual barely changed.")
    cache_threshold: Annotated[float, Knob("request", stage="first_block_cache")] = Field(
        0.12, ge=0.0, le=10.0, allow_inf_nan=False, description="First-block cache: relative residual change under which a step is skipped."
    )
    cache_backend: Annotated[CacheBackend, Knob("variant", stage="first_block_cache")] = Field(
        "auto", description="First-block cache implementation (auto: para_attn when installed)."
    )
    split_proj_out: Annotated[bool, Switch("variant", phases=(Phase.WEIGHTS,))] = Field(
        False, description="The single blocks' output GEMM split into attention and MLP halves: no concatenation, narrower FP8 rows."
    )
    attention: Annotated[
        AttentionKernel,
        # FP8 attention joins the low-precision preset: on an H100 it moved the picture no more than the
        # FP8 GEMMs do (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-23/fp8_fidelity.md)
        Switch(
            "variant",
            preset=2,
            preset_value="fa3",
            upgrade=(3, "fa3_fp8"),
            phases=(Phase.EXECUTION,),
            legacy=(LegacyFlag("use_flash_attention", "fa3", "sdpa"),),
        ),
    ] = Field("sdpa", description="Attention kernel: sdpa (torch's default), cudnn, fa3 (FlashAttention 3), fa3_fp8 (FA3 with FP8 Q/K/V).")
    quantization: Annotated[
        QuantizationFormat,
        Switch(
            "variant",
            preset=3,
            preset_value="auto",
            phases=(Phase.WEIGHTS,),
            # use_mxfp4 is the original API's name for "the low-precision GEMMs": the best native
            # format of this GPU (the response's `quantization` says which ran).
            legacy=(LegacyFlag("use_mxfp4", "auto", "none"), LegacyFlag("use_fp8", "fp8", "none")),
        ),
    ] = Field("none", description="Low-precision GEMMs: auto = the best native format of this GPU (FP8 on Ada/Hopper, MXFP8 on Blackwell).")
    # On with the FP8 GEMMs (preset 3): the fused kernels exist to feed them e4m3 activations.
    fused_kernels: Annotated[bool, Switch("variant", preset=3, phases=(Phase.EXECUTION,))] = Field(
        False,
        description="Fused Triton kernels between the FP8 GEMMs and attention (LayerNorm + modulation, residuals, q/k RMSNorm + "
        "RoPE, GELU), each writing its FP8 activations in one pass.",
    )
    # Runs inside the fused kernels' block forwards; Hopper or newer (TMA). An option, in no preset,
    # until it has run on a GPU: no machine could be started in the session that wrote it (2026-12-07).
    mlp_epilogue: Annotated[bool, Switch("variant", phases=(Phase.EXECUTION,))] = Field(
        False,
        description="The MLP's GELU -> FP8 in the first FP8 GEMM's epilogue (1x128 block scales, taken by the second GEMM, "
        "whose epilogue adds the gated residual): no bf16 activation or output is written. Runs inside the fused kernels' "
        "blocks; not yet measured on a GPU.",
    )
    # use_dpm_solver selects the sampler with the smallest error at 14 steps in
    # benchmarks/solver_fidelity.py (results in benchmarks/results/solver-fidelity/).
    scheduler: Annotated[
        SchedulerName,
        Switch(
            "request",
            preset=4,
            preset_value="dpmpp_2m_karras",
            phases=(Phase.REQUEST,),
            legacy=(LegacyFlag("use_dpm_solver", "dpmpp_2m_karras", "euler"),),
        ),
    ] = Field("euler", description="Sampler: euler (FlowMatch Euler, 28 steps), dpmpp_2m_karras (DPM-Solver++ 2M Karras, 14), unipc (20).")
    cuda_graphs: Annotated[
        bool, Switch("variant", preset=5, phases=(Phase.EXECUTION, Phase.REQUEST), legacy=(LegacyFlag("use_cuda_graphs", True, False),))
    ] = Field(False, description="CUDA graph capture of the transformer blocks (through compile).")
    graph_inputs: Annotated[GraphInputs, Knob("variant", stage="cuda_graphs", preset=5, preset_value="static")] = Field(
        "copied",
        description="How the captured blocks take the step's time embedding and RoPE tables: copied (into each block's graph, "
        "3 copies per block per step) or static (written once per step into buffers every block's graph reads in place).",
    )
    context_parallel: Annotated[int, Switch("variant", phases=(Phase.EXECUTION,))] = Field(
        1,
        ge=1,
        le=8,
        description="Ulysses context parallelism: one edit split over this many GPUs (a torchrun launch of as many ranks, one per GPU).",
    )
    # Set by the engine (engine/loras.py) for a request that names adapters, from the server's LoRA
    # settings; requests without adapters keep "off" and run the variant without LoRA layers.
    lora: Annotated[LoraMode, Switch("variant", phases=(Phase.EXECUTION, Phase.REQUEST), user_facing=False)] = Field(
        "off", description="LoRA adapters: in slots beside the weights (a variant of its own), or merged into the weights."
    )
    lora_slots: Annotated[int, Knob("variant", stage="lora", user_facing=False)] = Field(
        0, ge=0, le=16, description="LoRA slots in the transformer's Linears (slots mode)."
    )
    lora_rank: Annotated[int, Knob("variant", stage="lora", user_facing=False)] = Field(
        0, ge=0, le=1024, description="Rank of each LoRA slot: the largest adapter rank the slots hold."
    )
    # Memory: chosen when the model loads, normally by the memory plan (engine/memory_plan.py) from the
    # GPU's free memory or --memory-budget; a flag given explicitly overrides the plan.
    t5_fp8: Annotated[bool, Switch("load", phases=(Phase.LOAD,))] = Field(
        False, description="FP8 weight-only T5 text encoder (about half its memory); chosen when the model loads."
    )
    transformer_fp8: Annotated[TransformerFp8, Switch("load", phases=(Phase.LOAD,))] = Field(
        "off",
        description="FP8 transformer weights from the moment the model loads (quantized Linear by Linear while loading, or read from "
        "a prequantized checkpoint): the bf16 weights never reach the GPU. auto = rowwise (FP8 GEMMs) on Ada/Hopper, "
        "weight_only (FP8 storage, bf16 GEMMs) elsewhere.",
    )
    transformer_offload: Annotated[bool, Switch("load", phases=(Phase.LOAD, Phase.EXECUTION))] = Field(
        False, description="diffusers group offload: transformer blocks live in host memory and stream to the GPU one at a time."
    )
    text_encoders: Annotated[TextEncoderPlacement, Switch("load", phases=(Phase.LOAD,))] = Field(
        "resident",
        description="T5 and CLIP: resident on the GPU, offloaded (host memory, streamed to the GPU block by block to encode), "
        "or cpu (they encode on the CPU).",
    )
    vae_tiling: Annotated[bool, Switch("load", phases=(Phase.LOAD,))] = Field(
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
    """The field's Knob, with its stage filled in: a Switch belongs to the stage it declares."""
    knob = next(item for item in OptimizationConfig.model_fields[name].metadata if isinstance(item, Knob))
    if isinstance(knob, Switch):
        if knob.stage:
            raise TypeError(f"{name}: a Switch declares the stage named after its field; it takes no stage=")
        return replace(knob, stage=name)
    return knob


KNOBS: dict[str, Knob] = {name: _knob_of(name) for name in OptimizationConfig.model_fields}
DECLARATIONS: dict[str, StageDeclaration] = {
    name: StageDeclaration(
        name=name,
        off=OptimizationConfig.model_fields[name].default,
        preset=knob.preset,
        phases=frozenset(knob.phases),
        knobs=(name, *(other for other, setting in KNOBS.items() if setting.stage == name and other != name)),
    )
    for name, knob in KNOBS.items()
    if isinstance(knob, Switch)
}
_orphans = {name: knob.stage for name, knob in KNOBS.items() if knob.stage not in DECLARATIONS}
if _orphans:  # a typo in stage=... fails at import, not at the first request
    raise TypeError(f"knobs naming no Switch: {_orphans}")
USER_FIELDS: tuple[str, ...] = tuple(name for name, knob in KNOBS.items() if knob.user_facing)  # flags and HTTP fields
VARIANT_FIELDS: tuple[str, ...] = tuple(name for name, knob in KNOBS.items() if knob.scope == "variant")
LOAD_FIELDS: tuple[str, ...] = tuple(name for name, knob in KNOBS.items() if knob.scope == "load")
LEGACY_FLAGS: dict[str, tuple[str, LegacyFlag]] = {flag.name: (name, flag) for name, knob in KNOBS.items() for flag in knob.legacy}
MAX_PRESET = max(level for knob in KNOBS.values() for level, _ in knob.presets())
PRESETS: tuple[int, ...] = tuple(range(MAX_PRESET + 1))


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
