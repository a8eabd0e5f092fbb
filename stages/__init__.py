"""The ordered stage registry and the cumulative presets used by the benchmark.

Order matters: it is the order in which stages are applied when a variant is built (QKV fusion
before quantization, because quantized weights cannot be concatenated; the attention kernel and the
cache wrapper before compilation; compilation before CUDA graph capture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Availability, Stage, StageReport
from .channels_last import ChannelsLast
from .compile import Compile
from .cuda_graphs import CudaGraphs
from .fast_gelu import FastGelu
from .first_block_cache import FirstBlockCache
from .flash_attention import FlashAttention
from .low_precision import LowPrecision
from .qkv_fusion import QkvFusion
from .scheduler import Scheduler

if TYPE_CHECKING:  # stages sit below the engine: import its config lazily, never at module level
    from engine.config import OptimizationConfig

STAGES: tuple[Stage, ...] = (
    QkvFusion(),
    ChannelsLast(),
    LowPrecision(),
    FlashAttention(),
    FirstBlockCache(),
    FastGelu(),
    Compile(),
    CudaGraphs(),
    Scheduler(),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)

# What each cumulative benchmark stage adds on top of the previous one.
BENCHMARK_STAGE_CHANGES: dict[int, tuple[str, dict]] = {
    0: ("naive bf16 diffusers, FlowMatch Euler, 28 steps", {}),
    1: (
        "Inductor compile, QKV fusion, channels_last VAE, sigmoid-form GELU, first-block cache 0.12",
        {"compile": True, "fuse_qkv": True, "channels_last": True, "fast_gelu": True, "first_block_cache": True, "cache_threshold": 0.12},
    ),
    2: ("FlashAttention 3", {"attention": "fa3"}),
    3: ("low-precision GEMMs (best native format)", {"quantization": "auto"}),
    4: ("DPM-Solver++ 2M Karras, 14 steps", {"scheduler": "dpmpp_2m_karras"}),
    5: ("CUDA graph capture", {"cuda_graphs": True}),
}
MAX_STAGE = max(BENCHMARK_STAGE_CHANGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGE_NAMES)}")


def cumulative_config(stage: int) -> "OptimizationConfig":
    """The config of cumulative benchmark stage `stage` (0 = baseline, 5 = everything)."""
    from engine.config import OptimizationConfig

    if not 0 <= stage <= MAX_STAGE:
        raise ValueError(f"benchmark stages run from 0 to {MAX_STAGE}, not {stage}")
    changes: dict = {}
    for index in range(stage + 1):
        changes.update(BENCHMARK_STAGE_CHANGES[index][1])
    return OptimizationConfig(**changes)


@dataclass(frozen=True)
class ResolvedConfig:
    requested: "OptimizationConfig"
    effective: "OptimizationConfig"  # what will actually run on this machine
    reports: tuple[StageReport, ...]

    @property
    def active_stages(self) -> list[str]:
        return [report.name for report in self.reports if report.active]

    @property
    def skipped(self) -> list[StageReport]:
        return [report for report in self.reports if report.requested and not report.active]


def resolve(config: "OptimizationConfig", env) -> ResolvedConfig:
    effective = config
    reports = []
    for stage in STAGES:
        effective, report = stage.resolve(effective, env)
        reports.append(report)
    return ResolvedConfig(config, effective, tuple(reports))


def stage_status(env) -> list[dict]:
    """Every stage's availability on this machine, for doctor and /health."""
    rows = []
    for stage in STAGES:
        availability: Availability = stage.availability(env)
        rows.append(
            {
                "name": stage.name,
                "benchmark_stage": stage.benchmark_stage,
                "summary": stage.summary,
                "available": availability.available,
                "reason": availability.reason,
                "detail": availability.detail,
            }
        )
    return rows
