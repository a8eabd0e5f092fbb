"""The ordered stage registry; `resolve`, what a requested config will run on this machine; and
`apply`, the one loop that runs the stages' hooks.

A stage is one module, one declaration (its Switch in config.py) and one line below. Order matters:
it is the order in which stages are applied when the model loads or a variant is built (weights are
made FP8 before they are moved to host memory; QKV fusion before quantization, because it
concatenates only plain and row-scaled FP8 weights, not stage 3's other formats; group offload
before the cache wrapper, which hides the blocks from it, and before compilation, which cannot
wrap diffusers' hooks the other way round; the LoRA slots before the attention kernel, the cache
and compile, so that they see the slot layers; the fused block forwards after the attention kernel
they feed and before the cache's hooks, which wrap the blocks' forwards; the attention kernel and
the cache wrapper before compilation; compilation before CUDA graph capture).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .base import Availability, BuildContext, Phase, RequestContext, Stage, StageReport
from .channels_last import ChannelsLast
from .compile import Compile
from .config import DECLARATIONS, KNOBS, OptimizationConfig
from .context_parallel import ContextParallel
from .cuda_graphs import CudaGraphs
from .environment import Environment
from .fast_gelu import FastGelu
from .first_block_cache import FirstBlockCache
from .flash_attention import FlashAttention
from .fused_kernels import FusedKernels
from .lora import Lora
from .low_precision import LowPrecision
from .mlp_epilogue import MlpEpilogue
from .qkv_fusion import QkvFusion
from .rules import RULES
from .scheduler import Scheduler
from .split_projection import SplitProjection
from .text_encoder_fp8 import TextEncoderFp8
from .text_encoder_offload import TextEncoderOffload
from .transformer_fp8 import TransformerFp8
from .transformer_offload import TransformerOffload
from .trim_reference_tokens import TrimReferenceTokens
from .vae_tiling import VaeTiling

STAGES: tuple[Stage, ...] = (
    TextEncoderFp8(),
    TextEncoderOffload(),
    TransformerFp8(),
    VaeTiling(),
    QkvFusion(),
    SplitProjection(),  # before quantization: each half gets its own FP8 weights and row scales
    ChannelsLast(),
    LowPrecision(),
    Lora(),
    TransformerOffload(),
    FlashAttention(),
    FusedKernels(),  # after the attention kernel (it feeds it); before the cache's hooks and compile wrap the blocks
    MlpEpilogue(),  # after the fused block forwards, which it changes
    FirstBlockCache(),
    TrimReferenceTokens(),
    ContextParallel(),  # after the attention kernel is chosen (it wraps it), before compile traces it
    FastGelu(),
    Compile(),
    CudaGraphs(),
    Scheduler(),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
if set(STAGE_NAMES) != set(DECLARATIONS) or len(STAGE_NAMES) != len(STAGES):
    raise TypeError(f"every declared stage needs one registry line: declared {sorted(DECLARATIONS)}, registered {sorted(STAGE_NAMES)}")
if {rule.stage for rule in RULES} - set(STAGE_NAMES):
    raise TypeError(f"rules name unknown stages: {sorted({rule.stage for rule in RULES} - set(STAGE_NAMES))}")
BASELINE_TITLE = "eager diffusers (bf16 on a GPU), FlowMatch Euler, 28 steps"


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGE_NAMES)}")


def stages_in(phase: Phase) -> tuple[Stage, ...]:
    return tuple(stage for stage in STAGES if phase in stage.phases)


def apply(phase: Phase, target, config: OptimizationConfig, context: BuildContext | None = None) -> None:
    """Every requested stage's hook for `phase`, in registry order, on `target`: the pipeline (LOAD),
    the transformer (WEIGHTS, EXECUTION), the VAE (VAE), or the request's RequestContext (REQUEST,
    whose hooks take no build context). The one place that runs stage hooks: the engine calls it
    once at load, the variant cache once per phase of each variant it builds, the edit once per request."""
    for stage in stages_in(phase):
        if stage.is_requested(config):
            hook = getattr(stage, phase.value)
            hook(target, config) if isinstance(target, RequestContext) else hook(target, config, context)


def preset_title(preset: int) -> str:
    """What cumulative preset `preset` adds, in words."""
    if preset == 0:
        return BASELINE_TITLE
    titles = [stage.title for stage in STAGES if stage.preset == preset]
    titles += [
        f"{name} {value}" for name, knob in KNOBS.items() if knob.upgrade and knob.upgrade[0] == preset for value in knob.upgrade[1:]
    ]
    return ", ".join(titles)


@dataclass(frozen=True)
class ResolvedConfig:
    requested: OptimizationConfig
    effective: OptimizationConfig  # what will actually run on this machine
    reports: tuple[StageReport, ...]
    notes: tuple[str, ...] = ()  # how stages that run differ from what was asked (e.g. a load-scope knob held as loaded)

    @property
    def active_stages(self) -> list[str]:
        return [report.name for report in self.reports if report.active]

    @property
    def skipped(self) -> dict[str, str]:
        """Requested stages that will not run, with the reason."""
        return {report.name: report.reason for report in self.reports if report.requested and not report.active}

    def report(self, name: str) -> StageReport:
        return next(report for report in self.reports if report.name == name)


def resolve(config: OptimizationConfig, env: Environment) -> ResolvedConfig:
    """Each stage on its own against the machine, then the rules between stages (stages/rules.py)."""
    effective = config
    reports: dict[str, StageReport] = {}
    for stage in STAGES:  # a stage's own resolve reads only its own fields, so the order is free here
        effective, reports[stage.name] = stage.resolve(effective, env)
    for rule in RULES:
        if not rule.applies(effective, env):
            continue
        if rule.switches_off:
            effective = get_stage(rule.stage).switched_off(effective)
            reports[rule.stage] = reports[rule.stage].switched_off(rule.reason)
        else:
            reports[rule.stage] = dataclasses.replace(reports[rule.stage], reason=rule.reason)
    return ResolvedConfig(config, effective, tuple(reports[stage.name] for stage in STAGES))


def stage_status(env: Environment) -> list[dict]:
    """Every stage's availability on this machine, for doctor and /health."""
    rows = []
    for stage in STAGES:
        availability: Availability = stage.availability(env)
        rows.append(
            {
                "name": stage.name,
                "preset": stage.preset,
                "summary": stage.summary,
                "available": availability.available,
                "reason": availability.reason,
                "detail": availability.detail,
            }
        )
    return rows
