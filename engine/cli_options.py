"""Command-line options that describe an optimization config, shared by serve, edit and benchmark.

A preset (a cumulative benchmark stage, 0..5) sets the starting point; each per-stage flag, when
given, overrides it. Nothing given: the full stack on a CUDA machine, the baseline on a CPU.
"""

from __future__ import annotations

import argparse
import os

from .config import OptimizationConfig

PRESET_ENV_VAR = "FLUX_KONTEXT_PRESET"


def add_optimization_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizations (each overrides the preset)")
    group.add_argument(
        "--preset",
        type=int,
        choices=range(0, 6),
        default=None,
        help=f"cumulative benchmark stage to start from: 0 = naive bf16 diffusers ... 5 = everything "
        f"(env {PRESET_ENV_VAR}; default 5 on a CUDA GPU, 0 on a CPU)",
    )
    boolean = argparse.BooleanOptionalAction
    group.add_argument("--compile", action=boolean, default=None, help="Inductor compile of transformer blocks and VAE")
    group.add_argument("--fuse-qkv", action=boolean, default=None, help="fused QKV projections (transformer and VAE)")
    group.add_argument("--channels-last", action=boolean, default=None, help="channels_last VAE")
    group.add_argument("--fast-gelu", action=boolean, default=None, help="tanh GELU in sigmoid form (cheaper compiled kernels; needs compile)")
    group.add_argument("--first-block-cache", action=boolean, default=None, help="first-block cache")
    group.add_argument("--cache-threshold", type=float, default=None, help="first-block cache threshold (default 0.12)")
    group.add_argument("--cache-backend", choices=["auto", "para_attn", "diffusers"], default=None, help="first-block cache implementation")
    group.add_argument("--attention", choices=["sdpa", "cudnn", "fa3", "fa3_fp8"], default=None, help="attention kernel")
    group.add_argument("--quantization", choices=["none", "auto", "fp8", "mxfp8", "mxfp4", "nvfp4"], default=None, help="low-precision GEMM format (auto = best native)")
    group.add_argument("--scheduler", choices=["euler", "dpmpp_2m_karras", "unipc"], default=None, help="sampler")
    group.add_argument("--cuda-graphs", action=boolean, default=None, help="CUDA graph capture of the denoising step")


def optimization_config_from_args(args: argparse.Namespace, has_cuda: bool) -> OptimizationConfig:
    from stages import cumulative_config

    preset = args.preset
    if preset is None:
        preset = int(os.environ.get(PRESET_ENV_VAR, 5 if has_cuda else 0))
    overrides = {
        field: getattr(args, field)
        for field in ("compile", "fuse_qkv", "channels_last", "fast_gelu", "first_block_cache", "cache_threshold", "cache_backend", "attention", "quantization", "scheduler", "cuda_graphs")
        if getattr(args, field, None) is not None
    }
    return cumulative_config(preset).with_changes(**overrides)
