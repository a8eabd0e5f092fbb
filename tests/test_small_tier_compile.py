"""The small tier's knobs under compile, on the CPU with the tiny model (issue 23: the small tier's
full stack stalled compiling on an H200, and the knobs were to be bisected).

Knobs: FP8 transformer weights from load, text encoders offloaded (group offload), VAE tiling;
each with the rest of the full stack (preset 5: compile, fused QKV, the sigmoid GELU, the cache).
Four of the eight combinations, chosen so that every pair of knobs is seen in all four of its
on/off settings (a two-level orthogonal array; it includes the whole small tier), because each
compile costs seconds on two cores and the knobs act on different modules: the FP8 weights on the
transformer's graphs, tiling on the VAE's input shapes, the text encoders on no compiled graph at
all. The VAE's tile is shrunk to 32 px so that a 64 px edit really is tiled.

What cannot run on the CPU is reported, not silently dropped: row-wise FP8 GEMMs (weight-only FP8
instead), CUDA graphs and FA3 attention. Each case checks that the blocks and the VAE compiled, that
the output matches the same knobs run eager, and that a second edit compiles nothing new.
"""

from __future__ import annotations

import pytest

from engine.engine import KontextEngine
from engine.memory_plan import get_tier
from engine.requests import EditRequest
from stages import registry
from stages.config import cumulative_config
from tests.conftest import image_distance

# (FP8 weights from load, text encoders offloaded, VAE tiling): the odd-parity half of the 2^3 design
COMBINATIONS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
TILE_PX = 32
TOLERANCE_REL_L2, TOLERANCE_MAX_ABS = 1e-2, 4 / 255  # compiled fp32 kernels only reorder sums (tests/test_stages.py)


def _config(fp8: bool, offloaded: bool, tiled: bool):
    small = get_tier("small").changes
    knobs = {
        "transformer_fp8": "rowwise" if fp8 else "off",  # what a 4090 gets; the CPU falls back, with the reason
        "t5_fp8": small["t5_fp8"],
        "text_encoders": small["text_encoders"] if offloaded else "resident",
        "vae_tiling": tiled,
    }
    return cumulative_config(5).with_changes(**knobs)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("fp8, offloaded, tiled", COMBINATIONS, ids=lambda on: "on" if on else "off")
def test_the_small_tier_knobs_compile_on_the_cpu(fp8, offloaded, tiled, photo):
    config = _config(fp8, offloaded, tiled)
    engine = KontextEngine.load("tiny", "cpu", config, max_variants=2)
    resolved = registry.resolve(config, engine.env)  # what the machine makes of the request, reasons included
    assert resolved.effective.compile and resolved.effective.fuse_qkv, resolved.skipped
    for name in ("cuda_graphs", "attention"):
        assert "needs a CUDA GPU" in resolved.skipped[name], name
    if fp8:
        assert resolved.effective.transformer_fp8 == "weight_only"
        assert "FP8 GEMMs need compute capability 8.9+" in resolved.report("transformer_fp8").reason
    resolved = engine.resolve()
    vae = engine.loaded.pipe.vae
    vae.tile_sample_min_size, vae.tile_latent_min_size = TILE_PX, TILE_PX // 8  # the tiny VAE downsamples 8x

    request = EditRequest(prompt="make the sky red", image=photo, width=64, height=64, steps=1, seed=3)
    compiled = engine.edit(request)
    pipe, _, _ = engine.variants.pipeline_for(resolved.effective)
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert pipe.vae.decoder._compiled_call_impl is not None and pipe.vae.use_tiling == tiled
    graphs = _graphs()
    engine.edit(request)
    assert _graphs() == graphs, "a second edit at the same size compiled again"

    eager = engine.edit(request, engine.resolve(config.with_changes(compile=False)).effective)
    rel, worst = image_distance(compiled.images[0], eager.images[0])
    assert rel < TOLERANCE_REL_L2 and worst < TOLERANCE_MAX_ABS, (rel, worst)
