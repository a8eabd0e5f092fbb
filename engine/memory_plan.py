"""The memory plan: how the model sits in GPU memory, chosen from the GPU's free memory (or
`--memory-budget GB`) when the model loads. Tiers, largest first (thresholds in TIERS):

    tier    transformer                         T5 / CLIP                                  VAE
    large   as configured (bf16 base)           resident                                   as is
    medium  FP8 from load, resident             T5 FP8 weight-only, resident               as is
    small   FP8 from load, resident             T5 FP8; both in host memory, streamed to   tiled above its
                                                the GPU to encode (group offload)          tile size
    tiny    FP8, group offload (blocks stream   as small                                   as small
            from host memory one at a time)

A tier is a set of load-scope knobs (stages/config.py); flags given explicitly override it, and the
rules in stages/rules.py say what each mechanism switches off. Every mechanism is diffusers',
accelerate's or torchao's.

Why these thresholds: a tier's resident weights, what it streams, and the working memory of a
1024x1024 edit must fit (`Tier.estimated_peak_gib`; the tests recompute the component sizes from the
architecture and check every threshold against its tier's estimate). The thresholds are set from the
eager peak; compile and CUDA graphs add an allowance (`Tier.estimated_peak_with`, derived from the
activations below), which `doctor` shows per tier: the full stack's CUDA graph pool is what can
take a card at the bottom of its tier over. The large and medium
thresholds are the issue's. The small tier does not reach down to 16 GiB cards, as the issue
sketched: its resident FP8 transformer alone is about 14 GiB, so nothing else would fit beside it
there, and those cards get the tiny tier. A 24 GiB card (4090, L4) reports 22-23.5 GiB free: the
small tier. What each tier costs in step and end-to-end time against the large tier is measured by
benchmarks/memory_tiers.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing this module stays cheap (no torch): the command line builds its --help from TIERS
    from stages.environment import Environment

# FLUX.1-Kontext-dev component sizes in GiB (recomputed from the architecture by the tests).
TRANSFORMER_BF16_GIB = 22.2
TRANSFORMER_FP8_GIB = 14.2  # block Linears in FP8; modulation Linears, embedders and norms stay bf16
TRANSFORMER_BLOCK_FP8_GIB = 0.42  # the largest block (a double block) in FP8
TRANSFORMER_OUTSIDE_BLOCKS_GIB = 0.12  # embedders and final layers: resident under group offload
T5_BF16_GIB = 8.9
T5_FP8_GIB = 4.6
T5_EMBEDDING_GIB = 0.25  # the token embedding stays bf16 in the FP8 T5
T5_LINEAR_FP8_GIB = 0.04  # the largest T5 Linear in FP8: streaming holds one, with the next in flight
CLIP_GIB = 0.23
VAE_GIB = 0.16
# Activations of a 1024x1024 edit (8704 tokens through each block; the VAE at full resolution):
# an estimate, checked against the measured peaks by benchmarks/memory_tiers.py.
WORKING_GIB = 3.0
# What the full stack adds on top (estimates, derived from the activations above, not measured apart;
# benchmarks/memory_tiers.py reports the peaks to check them against):
# - CUDA graphs: cudagraph trees give the recorded block graphs a private memory pool that holds the
#   blocks' activations for the largest shape recorded, and nothing outside the graphs (the VAE
#   decode, the text encoders) can reuse it: the transformer's share of the working memory is held
#   twice. That share is taken as half of WORKING_GIB (the VAE at full resolution is the other half).
# - Inductor: its kernels allocate through the same caching allocator as eager ones and fuse away
#   intermediates, but its memory planning keeps some buffers alive across fused regions and GEMMs
#   may take workspaces; an allowance of a tenth of the working memory.
TRANSFORMER_WORKING_GIB = WORKING_GIB / 2
CUDA_GRAPH_POOL_GIB = TRANSFORMER_WORKING_GIB
COMPILE_WORKSPACE_GIB = WORKING_GIB / 10


def execution_allowance_gib(compile: bool, cuda_graphs: bool) -> float:
    """What compile and CUDA graphs add to a tier's peak (the estimates above)."""
    return (COMPILE_WORKSPACE_GIB if compile else 0.0) + (CUDA_GRAPH_POOL_GIB if cuda_graphs else 0.0)


@dataclass(frozen=True)
class Tier:
    name: str
    min_free_gib: float
    changes: dict  # load-scope knobs this tier sets
    resident_gib: float  # weights on the GPU through the denoising loop
    transient_gib: float  # weights on the GPU only for a moment (streamed blocks, the T5 while it encodes)
    summary: str
    cost: str  # against the large tier: step time and end-to-end time

    @property
    def estimated_peak_gib(self) -> float:
        """Eager: weights and activations; the thresholds are set from this figure."""
        return self.estimated_peak_with(compile=False, cuda_graphs=False)

    def estimated_peak_with(self, compile: bool, cuda_graphs: bool) -> float:
        """The peak with compile and CUDA graphs on or off (as the rules leave them for this tier)."""
        return round(self.resident_gib + self.transient_gib + WORKING_GIB + execution_allowance_gib(compile, cuda_graphs), 1)


_STREAMED_TEXT = T5_EMBEDDING_GIB + 2 * T5_LINEAR_FP8_GIB + CLIP_GIB  # CLIP counted whole: an upper bound
TIERS: tuple[Tier, ...] = (
    Tier(
        "large",
        40.0,
        {},
        TRANSFORMER_BF16_GIB + T5_BF16_GIB + CLIP_GIB + VAE_GIB,
        0.0,
        "everything resident, as configured (a quantized variant is built from the resident full-precision weights)",
        "the reference",
    ),
    Tier(
        "medium",
        24.0,
        {"transformer_fp8": "auto", "t5_fp8": True},
        TRANSFORMER_FP8_GIB + T5_FP8_GIB + CLIP_GIB + VAE_GIB,
        0.0,
        "FP8 transformer from load (the bf16 weights never reach the GPU), FP8 weight-only T5; nothing else changes",
        "step: the same FP8 GEMMs as a large-tier FP8 variant, QKV fusion included (FP8 rows and row scales concatenated); "
        "end to end: the T5 dequantizes its weights once per request",
    ),
    Tier(
        "small",
        19.0,
        {"transformer_fp8": "auto", "t5_fp8": True, "text_encoders": "offloaded", "vae_tiling": True},
        TRANSFORMER_FP8_GIB + VAE_GIB,
        _STREAMED_TEXT,
        "medium, with T5 and CLIP in host memory, streamed to the GPU to encode, and the VAE tiled above its tile size",
        "step: as medium; end to end: the FP8 T5 and CLIP cross PCIe once per request",
    ),
    Tier(
        "tiny",
        0.0,
        {"transformer_fp8": "auto", "t5_fp8": True, "text_encoders": "offloaded", "vae_tiling": True, "transformer_offload": True},
        TRANSFORMER_OUTSIDE_BLOCKS_GIB + VAE_GIB,
        TRANSFORMER_BLOCK_FP8_GIB * 2 + _STREAMED_TEXT,
        "small, with the transformer's blocks streamed from host memory one at a time (diffusers group offload, CUDA streams)",
        "step: every step moves the whole FP8 transformer over PCIe (bounded by the transfer time), eager: no compile "
        "(with FP8 weights) and no CUDA graphs; end to end: as small, plus those steps",
    ),
)


@dataclass(frozen=True)
class MemoryPlan:
    tier: Tier
    budget_gib: float | None  # the figure the tier was chosen from; None on a CPU without --memory-budget
    source: str  # where that figure came from
    notes: tuple[str, ...] = ()  # what this machine changes about the tier (FP8 format, attention kernel)

    @property
    def changes(self) -> dict:
        return dict(self.tier.changes)

    def describe(self) -> str:
        budget = "" if self.budget_gib is None else f" ({self.budget_gib:.1f} GiB, {self.source})"
        return f"memory tier {self.tier.name}{budget}: {self.tier.summary}"

    def as_dict(self) -> dict:
        return {
            "tier": self.tier.name,
            "budget_gib": None if self.budget_gib is None else round(self.budget_gib, 1),
            "source": self.source,
            "min_free_gib": self.tier.min_free_gib,
            "estimated_peak_gib_at_1024": self.tier.estimated_peak_gib,
            "estimated_peak_gib_at_1024_compiled_with_cuda_graphs": self.tier.estimated_peak_with(compile=True, cuda_graphs=True),
            "summary": self.tier.summary,
            "cost_vs_large": self.tier.cost,
            "knobs": self.changes,
            "notes": list(self.notes),
        }


def tier_for(budget_gib: float) -> Tier:
    return next(tier for tier in TIERS if budget_gib >= tier.min_free_gib)


def get_tier(name: str) -> Tier:
    for tier in TIERS:
        if tier.name == name:
            return tier
    raise ValueError(f"unknown memory tier {name!r}; tiers: {', '.join(t.name for t in TIERS)}")


def choose_memory_plan(env: Environment, budget_gib: float | None = None) -> MemoryPlan:
    """The tier for `budget_gib` (--memory-budget) or, without one, for the GPU's free memory."""
    if budget_gib is not None:
        if budget_gib <= 0:
            raise ValueError(f"--memory-budget must be a positive number of GiB, not {budget_gib}")
        source = "--memory-budget"
        if env.has_cuda and env.gpu.free_memory_bytes is not None and budget_gib > env.gpu.free_memory_bytes / 2**30:
            source += f" (more than the {env.gpu.free_memory_bytes / 2**30:.1f} GiB free on {env.gpu.name})"
        elif not env.has_cuda:
            source += " (on the CPU: the mechanisms run, nothing is saved)"
    elif env.has_cuda:
        free = env.gpu.free_memory_bytes if env.gpu.free_memory_bytes is not None else env.gpu.total_memory_bytes
        budget_gib, source = free / 2**30, f"free memory on {env.gpu.name}"
    else:
        return MemoryPlan(TIERS[0], None, "cpu: no GPU memory to plan; everything stays in host memory")
    tier = tier_for(budget_gib)
    return MemoryPlan(tier, budget_gib, source, _machine_notes(tier, env))


def _machine_notes(tier: Tier, env: Environment) -> tuple[str, ...]:
    from stages.transformer_fp8 import has_fp8_gemms

    if not env.has_cuda or "transformer_fp8" not in tier.changes:
        return ()
    cc = ".".join(map(str, env.compute_capability))
    if has_fp8_gemms(env):
        return (f"FP8 GEMMs run natively on {env.gpu.name} (compute capability {cc}): transformer_fp8 auto = rowwise",)
    return (
        f"{env.gpu.name} (compute capability {cc}) has no FP8 tensor cores: transformer_fp8 auto = weight_only, FP8 storage "
        "dequantized for bf16 GEMMs, slower per step than bf16",
    )
