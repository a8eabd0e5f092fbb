"""The small tier's knobs under the full stack on a GPU (issue 23), where what the CPU test cannot run
runs too: row-wise FP8 GEMMs on FP8 weights from load, QKV fusion of those FP8 weights, FP8 FA3
attention, the fused kernels and CUDA graphs, with the text encoders group-offloaded on CUDA streams
and the VAE tiled. The same four knob combinations as tests/test_small_tier_compile.py, on the tiny
model with FLUX's real head size at 256x256 (synthetic-full at 1024x1024 runs in
benchmarks/memory_tiers.py). Skipped, with the reason, without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest
from stages.environment import current_environment
from tests.conftest import image_distance, requires_cuda
from tests.test_gpu_stages import GPU_TEST_TRANSFORMER
from tests.test_small_tier_compile import COMBINATIONS, _config, _graphs

pytestmark = [requires_cuda, pytest.mark.gpu]
TILE_PX = 128  # a 256 px edit is tiled
TOLERANCE_REL_L2 = 0.05  # compiled and eager run the same FP8 GEMMs and attention; rounding differs (test_gpu_stages)


def _engine(config) -> KontextEngine:
    env = current_environment("cuda:0")
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER)
    spec = ModelSpec("tiny-hd128", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    return KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, config, max_variants=2)


@pytest.mark.parametrize("fp8, offloaded, tiled", COMBINATIONS, ids=lambda on: "on" if on else "off")
def test_the_small_tier_knobs_compile_on_the_gpu(fp8, offloaded, tiled, photo):
    config = _config(fp8, offloaded, tiled)
    engine = _engine(config)
    resolved = engine.resolve()
    wanted = {"compile", "fuse_qkv", "cuda_graphs", "attention"}
    if torch.cuda.get_device_capability() >= (8, 9):
        wanted.add("fused_kernels")
        assert resolved.effective.transformer_fp8 == ("rowwise" if fp8 else "off")
    assert not wanted & set(resolved.skipped), resolved.skipped
    vae = engine.loaded.pipe.vae
    vae.tile_sample_min_size, vae.tile_latent_min_size = TILE_PX, TILE_PX // 8

    request = EditRequest(prompt="make the sky red", image=photo, width=256, height=256, steps=4, seed=3)
    compiled = engine.edit(request)
    assert wanted <= set(compiled.active_stages), compiled.metadata()["skipped_stages"]
    pipe, _, _ = engine.variants.pipeline_for(resolved.effective)
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert pipe.vae.decoder._compiled_call_impl is not None and pipe.vae.use_tiling == tiled
    graphs = _graphs()
    again = engine.edit(request)
    assert _graphs() == graphs, "a second edit at the same size compiled again"
    assert image_distance(again.images[0], compiled.images[0])[0] < 1e-3  # replayed graphs, same picture

    eager = engine.edit(request, engine.resolve(config.with_changes(compile=False)).effective)
    rel, _ = image_distance(compiled.images[0], eager.images[0])
    assert rel < TOLERANCE_REL_L2, rel
