"""Stage 1: Inductor compilation of the transformer's repeated blocks and of the VAE.

Regional compilation (`compile_repeated_blocks`) compiles one FluxTransformerBlock and one
FluxSingleTransformerBlock graph and reuses them for all 57 blocks, so the first call costs about a
minute on the full model instead of several, with the same steady-state speed as a whole-model
compile. Python between the blocks (the first-block cache decision, timing hooks) stays eager.
"""

from __future__ import annotations

import shutil

import torch

from .base import Availability, FlagStage

# Kontext snaps inputs to 17 preferred resolutions, each a distinct shape for the compiled graphs;
# the default limit (8) would silently fall back to eager after a few resolutions.
RECOMPILE_LIMIT = 64

# Inductor settings, chosen by measurement (H200, synthetic-full, 1024x1024 edit, one step;
# benchmarks/results/nvidia-h200-2026-11-21/step_lab_inductor.md):
#   default                                 stage 1: 281.0 ms   stage 3: 203.3 ms
#   coordinate descent tuning               stage 1: 276.0 ms   stage 3: 198.8 ms   (compile ~2 min)
#   max-autotune (no cudagraphs) + c.d.     stage 1: 279.7 ms   stage 3: gave up after 15 min of autotuning
# Coordinate descent wins by about 2% for a longer first compile, which the persistent compile
# cache (engine/compile_cache.py) pays only once per machine. GEMMs stay with cuBLAS (extern).
INDUCTOR_SETTINGS = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
}


def configure_dynamo() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)


def configure_inductor() -> None:
    """Process-wide Inductor settings; applied before the first compilation of any variant."""
    import torch._inductor.config as inductor_config

    for key, value in INDUCTOR_SETTINGS.items():
        setattr(inductor_config, key, value)


class Compile(FlagStage):
    name = "compile"
    flag = "compile"
    benchmark_stage = 1
    summary = "torch.compile (Inductor) of the transformer blocks (regional) and the VAE encoder/decoder."

    def availability(self, env):
        if env.has_cuda and not env.has_package("triton"):
            return Availability(False, "Inductor on a GPU needs the triton package")
        if not env.has_cuda and shutil.which("g++") is None and shutil.which("c++") is None:
            return Availability(False, "Inductor on the CPU needs a C++ compiler (g++) on PATH")
        return Availability(True, detail="Inductor, regional (repeated blocks) + VAE")

    def active_detail(self, config, env):
        return "Inductor: transformer blocks (regional) + VAE encoder/decoder"

    def apply_execution(self, transformer, config, build):
        configure_dynamo()
        if build.env.has_cuda:
            configure_inductor()
        # diffusers' first-block cache decides inside each block, behind torch.compiler.disable: that
        # is a graph break, so those blocks cannot compile as one full graph.
        fullgraph = not (config.first_block_cache and config.cache_backend == "diffusers")
        # CUDA graphs come from Inductor's cudagraph trees: one graph per block call and shape.
        mode = "reduce-overhead" if config.cuda_graphs else None
        transformer.compile_repeated_blocks(fullgraph=fullgraph, mode=mode)
        build.note(f"transformer: regional compile (fullgraph={fullgraph}, mode={mode or 'default'}; compiles on first call)")

    def apply_vae(self, vae, config, build):
        configure_dynamo()
        if build.env.has_cuda:
            configure_inductor()
        vae.encoder.compile(fullgraph=True)
        vae.decoder.compile(fullgraph=True)
        build.note("vae: encoder and decoder compiled (lazy)")

    def touches_vae(self, config):
        return config.compile
