"""Stage 1: Inductor compilation of the transformer's repeated blocks and of the VAE.

Regional compilation (`compile_repeated_blocks`) compiles one FluxTransformerBlock and one
FluxSingleTransformerBlock graph and reuses them for all 57 blocks, so the first call costs one to
two minutes on the full model (H200) instead of compiling 57 blocks' worth of graph. Python between
the blocks (the first-block cache decision, timing hooks) stays eager.
"""

from __future__ import annotations

from .base import Availability, FlagStage, Phase
from .rules import graph_breaks_in_blocks

# Kontext snaps inputs to 17 preferred resolutions, each a distinct shape for the compiled graphs;
# the default limit (8) would silently fall back to eager after a few resolutions.
RECOMPILE_LIMIT = 64

# Inductor settings, chosen by measurement (H200, synthetic-full, 1024x1024 edit, one step;
# benchmarks/results/nvidia-h200-2026-11-21/step_lab_inductor.md):
#   default                                 stage 1: 281.0 ms   stage 3: 203.3 ms
#   coordinate descent tuning               stage 1: 276.0 ms   stage 3: 198.8 ms   (compile ~2 min)
#   max-autotune (no cudagraphs) + c.d.     stage 1: 279.7 ms   stage 3: not finished after ~19 min of autotuning
# Coordinate descent wins by about 2% for a longer first compile (about 2 minutes for the blocks),
# which the persistent compile cache (engine/compile_cache.py) pays only once per machine. It is
# scoped to the transformer blocks; the VAE compiles with Inductor's defaults. GEMMs stay with
# cuBLAS (extern kernels).
INDUCTOR_SETTINGS = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
}


def configure_dynamo() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)


def transformer_compile_options(cuda_graphs: bool, env) -> dict:
    """Inductor options for the transformer blocks only (passed to torch.compile, not set globally):
    coordinate-descent tuning measured worthwhile there, while on the VAE it stretched the first
    compile to about 11 minutes (benchmarks/results/nvidia-h200-2026-11-21/stages.md, stage 1 warm-up)."""
    options = dict(INDUCTOR_SETTINGS) if env.has_cuda else {}
    if cuda_graphs:
        options["triton.cudagraphs"] = True  # what mode="reduce-overhead" means; torch.compile takes mode or options
    return options


class Compile(FlagStage):
    name = "compile"
    flag = "compile"
    benchmark_stage = 1
    title = "Inductor compile"
    summary = "torch.compile (Inductor) of the transformer blocks (regional) and the VAE encoder/decoder."
    phases = frozenset({Phase.EXECUTION, Phase.VAE})

    def availability(self, env):
        if env.has_cuda and not env.has_package("triton"):
            return Availability(False, "Inductor on a GPU needs the triton package")
        if not env.has_cuda and not env.has_cxx_compiler:
            return Availability(False, "Inductor on the CPU needs a C++ compiler (g++) on PATH")
        return Availability(True, detail="Inductor, regional (repeated blocks) + VAE")

    def active_detail(self, config, env):
        return "Inductor: transformer blocks (regional) + VAE encoder/decoder"

    def apply_execution(self, transformer, config, build):
        configure_dynamo()
        fullgraph = not graph_breaks_in_blocks(config)  # stages/rules.py says why
        # CUDA graphs come from Inductor's cudagraph trees: one graph per block call and shape.
        options = transformer_compile_options(config.cuda_graphs, build.env)
        transformer.compile_repeated_blocks(fullgraph=fullgraph, options=options or None)
        build.note(f"transformer: regional compile (fullgraph={fullgraph}, inductor options {options}; compiles on first call)")

    def apply_vae(self, vae, config, build):
        configure_dynamo()
        vae.encoder.compile(fullgraph=True)
        vae.decoder.compile(fullgraph=True)
        build.note("vae: encoder and decoder compiled (lazy)")
