"""Every rule between two stages, in one place, in dependency order, each with its reason.

`registry.resolve` first resolves each stage on its own against the machine (is triton there, is
this a Hopper GPU, ...), then applies these rules top to bottom. A rule only ever switches a stage
off (or notes how it adapted), never on, and no rule switches off a stage that an earlier rule
depends on, so one pass in this order settles the config: compile is final before anything that
needs compile is looked at, and the cache backend is concrete (not `auto`) before CUDA graphs are.
The memory knobs (transformer_fp8, transformer_offload) are fixed when the model loads, so rules
read them but never switch them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import OptimizationConfig
from .environment import Environment


def diffusers_cache_in_blocks(config: OptimizationConfig) -> bool:
    """diffusers' first-block cache decides inside every block, behind torch.compiler.disable."""
    return config.first_block_cache and config.cache_backend == "diffusers"


def fp8_from_load(config: OptimizationConfig) -> bool:
    """The base transformer's weights are FP8 from load: there are no bf16 weights to derive variants from."""
    return config.transformer_fp8 != "off"


def row_wise_fp8_weights(config: OptimizationConfig) -> bool:
    """The block Linears hold torchao's row-wise FP8 weights (stage 3's fp8, or FP8 from load)."""
    return config.quantization == "fp8" or config.transformer_fp8 == "rowwise"


# The attention kernels that stages/fused_blocks.py feeds (it holds their calls; a test checks both agree)
FUSED_ATTENTION = ("fa3_fp8", "fa3", "sdpa")


def graph_breaks_in_blocks(config: OptimizationConfig) -> bool:
    """Something runs behind torch.compiler.disable inside every block: diffusers' first-block cache
    check, or group offload's onload/offload hooks."""
    return diffusers_cache_in_blocks(config) or config.transformer_offload


@dataclass(frozen=True)
class Rule:
    stage: str  # the stage this rule acts on
    applies: Callable[[OptimizationConfig, Environment], bool]
    reason: str
    switches_off: bool = True  # False: the stage still runs, and the reason says how it adapted


RULES: tuple[Rule, ...] = (
    # Context parallelism: every rank holds a shard of the tokens and all must take the same path.
    Rule(
        "first_block_cache",
        lambda config, env: config.first_block_cache and config.context_parallel > 1,
        "not applied under context parallelism: each rank would judge the residual of its own shard of tokens, "
        "and ranks that decide differently wait for each other forever",
    ),
    Rule(
        "quantization",
        lambda config, env: config.quantization != "none" and fp8_from_load(config),
        "not applied: the transformer's weights are FP8 from load (transformer_fp8) and are not quantized again",
    ),
    # No rule for fuse_qkv: it runs on FP8 weights from load too (stages/qkv_fusion.py concatenates
    # row-scaled FP8 rows and their scales, which is exact; every transformer_fp8 format is row-scaled).
    # Found on the CPU with torchao 0.18 and diffusers 0.42.1 (rowwise and weight-only alike): group
    # offload moves torchao tensors with torch.utils.swap_tensors, which refuses tensors that compiled
    # graphs hold weak references to ("Cannot swap t1 because it has weakref associated with it").
    Rule(
        "compile",
        lambda config, env: config.compile and config.transformer_offload and fp8_from_load(config),
        "not applied: group offload cannot move torchao FP8 weights that compiled graphs reference (swap_tensors fails); "
        "the offloaded FP8 transformer runs eager",
    ),
    # The fused kernels write row-wise e4m3 activations for torchao's row-wise FP8 weights and call
    # the blocks' modules directly (stages/fused_blocks.py); the rules below say what they cannot feed.
    Rule(
        "fused_kernels",
        lambda config, env: config.fused_kernels and not row_wise_fp8_weights(config),
        "not applied: the fused kernels produce row-wise FP8 activations for FP8 row-wise weights; "
        "turn on quantization fp8 (preset 3) or load the transformer with transformer_fp8 rowwise",
    ),
    Rule(
        "fused_kernels",
        lambda config, env: config.fused_kernels and config.lora_slots > 0,
        "not applied with LoRA slots: the slot layers compute their low-rank path from the bf16 activation, "
        "which the fused kernels never write (merge mode keeps the fused kernels)",
    ),
    Rule(
        "fused_kernels",
        lambda config, env: config.fused_kernels and config.transformer_offload,
        "not applied with group offload: its hooks move the weights that the fused GEMMs read",
    ),
    Rule(
        "fused_kernels",
        lambda config, env: config.fused_kernels and config.context_parallel > 1,
        "not applied under context parallelism: the fused attention inputs are not sharded across ranks",
    ),
    Rule(
        "fused_kernels",
        lambda config, env: config.fused_kernels and config.attention not in FUSED_ATTENTION,
        "not applied: the fused kernels feed FA3 (FP8 or bf16) or SDPA, and this attention kernel is cuDNN SDPA",
    ),
    Rule(
        "mlp_epilogue",
        lambda config, env: config.mlp_epilogue and not config.fused_kernels,
        "not applied: the epilogue GEMMs run inside the fused kernels' block forwards, which take their FP8 activations; "
        "turn on fused_kernels",
    ),
    Rule(
        "fast_gelu",
        lambda config, env: config.fast_gelu and not config.compile,
        "not applied: the sigmoid form only pays off inside compiled (fused) kernels; turn on compile",
    ),
    # Measured on an H200 (benchmarks/results/nvidia-h200-2026-11-21/step_lab_vae.md): eager NHWC VAE
    # convolutions are 40-50% slower; compiled, the decoder is slightly faster. On a CPU the stage
    # runs as asked (the CPU is not a speed target; this keeps it testable there).
    Rule(
        "channels_last",
        lambda config, env: config.channels_last and env.has_cuda and not config.compile,
        "not applied: on a GPU NHWC VAE convolutions measured slower without compile (decode 128 vs 87 ms); turn on compile",
    ),
    Rule(
        "cuda_graphs",
        lambda config, env: config.cuda_graphs and not config.compile,
        "CUDA graphs are captured through torch.compile here: turn on compile",
    ),
    Rule(
        "cuda_graphs",
        lambda config, env: config.cuda_graphs and config.transformer_offload,
        "not applied: with group offload the transformer's weights move between host and GPU on every step, "
        "and captured graphs would replay the addresses of weights that are gone",
    ),
    # Measured on the H200 (benchmarks/results/nvidia-h200-2026-11-22/cache_backends.md): every edit
    # failed with "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run".
    Rule(
        "cuda_graphs",
        lambda config, env: config.cuda_graphs and diffusers_cache_in_blocks(config),
        "not applied: diffusers' first-block cache subtracts block outputs across blocks, and under cudagraph "
        "trees those outputs are overwritten by the next replay; use cache_backend=para_attn to keep CUDA graphs",
    ),
    # LoRA adapters are checked against, and hosted on, the model's own Linears; the split replaces
    # the single blocks' proj_out with two halves that no adapter file names.
    Rule(
        "split_proj_out",
        lambda config, env: config.split_proj_out and config.transformer_fp8 != "off",
        "not applied: the weights were made FP8 when the model loaded, and the split needs the bf16 proj_out",
    ),
    Rule(
        "split_proj_out",
        lambda config, env: config.split_proj_out and config.fused_kernels,
        "not applied with the fused kernels: they write the single blocks' concatenation as one FP8 row, which is what the split avoided",
    ),
    Rule(
        "split_proj_out",
        lambda config, env: config.split_proj_out and config.lora_slots > 0,
        "not applied with LoRA adapters: they target the single blocks' unsplit proj_out",
    ),
    Rule(
        "cuda_graphs",
        lambda config, env: config.cuda_graphs and config.context_parallel > 1,
        "not applied under context parallelism: capturing the all-to-all collectives in cudagraph trees has not been verified",
    ),
    Rule(
        "compile",
        lambda config, env: config.compile and graph_breaks_in_blocks(config),
        "blocks compile without fullgraph: diffusers' first-block cache check or group offload's hooks run inside every block "
        "(graph breaks)",
        switches_off=False,
    ),
)
