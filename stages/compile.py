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


def configure_dynamo() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)


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
        transformer.compile_repeated_blocks(fullgraph=True)
        build.note("transformer: regional compile (lazy: compiles on first call)")

    def apply_vae(self, vae, config, build):
        configure_dynamo()
        vae.encoder.compile(fullgraph=True)
        vae.decoder.compile(fullgraph=True)
        build.note("vae: encoder and decoder compiled (lazy)")

    def touches_vae(self, config):
        return config.compile
