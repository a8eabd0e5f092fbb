"""Stage 1: Inductor compilation of the transformer's repeated blocks and of the VAE.

Regional compilation (`compile_repeated_blocks`) compiles one FluxTransformerBlock and one
FluxSingleTransformerBlock graph and reuses them for all 57 blocks, so the first call costs one to
two minutes on the full model (H200) instead of compiling 57 blocks' worth of graph. Python between
the blocks (the first-block cache decision, timing hooks) stays eager.
"""

from __future__ import annotations

import logging

from .base import Availability, Stage
from .rules import graph_breaks_in_blocks

log = logging.getLogger(__name__)

# A safety net: with the sequence dimensions dynamic (below) every Kontext resolution runs on the same
# graphs; should something else vary (the batch, with num_images > 1), Dynamo may recompile, and the
# default limit (8) would silently fall back to eager after a few shapes.
RECOMPILE_LIMIT = 64

# The inputs whose sizes change with the resolution: the blocks' image tokens and rotary tables, the
# VAE encoder's image and decoder's latents. Marked dynamic from the first compile, so a second
# resolution does not trigger Dynamo's automatic-dynamic recompile of every graph (measured on an
# H100: 261 s compiling at the first resolution, 432 s more at the second). Dimensions that meet a
# weight (hidden size, head size, channels) are specialised back to constants by Dynamo itself, and
# a batch of one stays static, so only the sequence (or height and width) becomes symbolic.
DYNAMIC_SOURCES = ("L['hidden_states']", "L['image_rotary_emb'][0]", "L['image_rotary_emb'][1]", "L['sample']", "L['z']")

# Inductor settings by `compile_tuning`, for the transformer blocks only (the VAE compiles with
# Inductor's defaults: coordinate-descent tuning stretched its first compile to about 11 minutes).
# Measured on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-23/README.md): coordinate
# descent ("tuned") makes a step 2.2% faster (197.0 vs 201.3 ms) but re-tunes the dynamic-shape
# kernels at run time in every process, cache hits or not (115 s of a 156 s first shape), so "fast"
# is the default and "tuned" an option. GEMMs stay with cuBLAS (extern kernels).
INDUCTOR_SETTINGS = {
    "tuned": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
    "fast": {},
}


# Inductor's process-wide settings that tune kernels one by one at their first call, multiplying a
# first compile's time. The VAE compiles with the global values (the blocks too, where their options
# do not say otherwise), so a library that switches one on stalls the first edit for minutes (torchao's
# set_inductor_config did, issue 23). The compile stage says so at build time, so a stall is named in
# the log before it happens.
SLOW_COMPILE_SETTINGS = ("coordinate_descent_tuning", "max_autotune", "max_autotune_pointwise", "max_autotune_gemm")


def slow_compile_settings() -> list[str]:
    """The SLOW_COMPILE_SETTINGS that are on in this process."""
    import torch._inductor.config as inductor_config

    return [name for name in SLOW_COMPILE_SETTINGS if getattr(inductor_config, name, False)]


def _warn_slow_compile_settings(build) -> None:
    slow = slow_compile_settings()
    if slow:
        build.note(f"Inductor's process-wide {', '.join(slow)} is on: the first compile tunes kernels one by one (minutes)")
        log.warning("Inductor's process-wide %s is on (set outside the compile stage): first compiles will be slow", ", ".join(slow))


def configure_dynamo() -> None:
    import torch._dynamo.config as dynamo_config
    import torch.compiler

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
    if not hasattr(torch.compiler.config, "dynamic_sources"):  # torch < 2.7: automatic dynamic shapes only
        log.warning("this torch cannot mark inputs dynamic by name: a second resolution will recompile every graph once")
        return
    present = [source.strip() for source in (torch.compiler.config.dynamic_sources or "").split(",") if source.strip()]
    torch.compiler.config.dynamic_sources = ",".join(dict.fromkeys(present + list(DYNAMIC_SOURCES)))


def vae_compile_options(env) -> dict | None:
    """Inductor options for the VAE encoder and decoder. Its GroupNorms are Inductor reductions,
    whose block sizes are otherwise picked by timing at their first run in each process, and blocks
    that sum in another order round differently: the ahead-of-time path and the JIT path (or two
    servers) then drew pictures 1-7/255 apart (H100, session 3 of 2026-12-06). Deterministic mode
    fixes each reduction's configuration when the kernel is compiled (CUDA only: the CPU's C++
    kernels are not tuned by timing); with it the two paths drew identical pictures, warm edits were
    no slower, and the AOT functions loaded in 3.0 s instead of 12 (H100, session 4)."""
    import torch._inductor.config as inductor_config

    if not env.has_cuda or not hasattr(inductor_config, "deterministic"):
        return None
    return {"deterministic": True}


def transformer_compile_options(config, env) -> dict:
    """Inductor options for the transformer blocks (passed to torch.compile, not set globally)."""
    options = dict(INDUCTOR_SETTINGS[config.compile_tuning]) if env.has_cuda else {}
    if config.cuda_graphs:
        options["triton.cudagraphs"] = True  # what mode="reduce-overhead" means; torch.compile takes mode or options
    return options


class Compile(Stage):
    switch = "compile"
    title = "Inductor compile"
    summary = "torch.compile (Inductor) of the transformer blocks (regional) and the VAE encoder/decoder."

    def availability(self, env):
        if env.has_cuda and not env.has_package("triton"):
            return Availability(False, "Inductor on a GPU needs the triton package")
        if not env.has_cuda and not env.has_cxx_compiler:
            return Availability(False, "Inductor on the CPU needs a C++ compiler (g++) on PATH")
        return Availability(True, detail="Inductor, regional (repeated blocks) + VAE")

    def active_detail(self, config, env):
        return f"Inductor ({config.compile_tuning}): transformer blocks (regional) + VAE encoder/decoder, sequence dimensions dynamic"

    def apply_execution(self, transformer, config, build):
        configure_dynamo()
        fullgraph = not graph_breaks_in_blocks(config)  # stages/rules.py says why
        # CUDA graphs come from Inductor's cudagraph trees: one graph per block call and shape.
        options = transformer_compile_options(config, build.env)
        transformer.compile_repeated_blocks(fullgraph=fullgraph, options=options or None)
        build.note(f"transformer: regional compile (fullgraph={fullgraph}, inductor options {options}; compiles on first call)")
        _install_precompiled(repeated_blocks(transformer), build)

    def apply_vae(self, vae, config, build):
        configure_dynamo()
        _warn_slow_compile_settings(build)
        options = vae_compile_options(build.env)
        vae.encoder.compile(fullgraph=True, options=options)
        vae.decoder.compile(fullgraph=True, options=options)
        build.note(f"vae: encoder and decoder compiled (lazy, inductor options {options})")
        _install_precompiled([vae.encoder, vae.decoder], build)


def repeated_blocks(transformer) -> list:
    """The blocks regional compile compiles: one graph per class, shared by every block of it."""
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return [module for module in transformer.modules() if type(module).__name__ in names]


def compiled_modules(pipe, config, env) -> list[tuple]:
    """(module, its Inductor options) for every module this stage compiled in `pipe`'s variant:
    what `precompile --aot-compile` records (stages/precompiled.py)."""
    options = transformer_compile_options(config, env) or None
    modules = [(block, options) for block in repeated_blocks(pipe.transformer)]
    modules += [(module, vae_compile_options(env)) for module in (pipe.vae.encoder, pipe.vae.decoder)]
    return [(module, options) for module, options in modules if getattr(module, "_compiled_call_impl", None) is not None]


def _install_precompiled(modules, build) -> None:
    """With a bundle's ahead-of-time functions for this config, the modules run them instead of
    tracing and compiling on their first call (the JIT call stays as the fallback)."""
    if build.precompiled is None:
        return
    installed = sum(build.precompiled.install(module) for module in modules)
    build.note(f"precompiled functions: {installed} of {len(modules)} modules run ahead-of-time compiled code (no Dynamo)")
