"""The memory tiers' mechanisms on the tiny model (CPU): every offload path gives the resident path's
pixels, the VAE tiles only above its tile size, and an out-of-memory error in an offloaded edit fails
that request alone.

Tolerance: at most one 8-bit level per pixel. On the CPU, onload and offload are copies within host
memory, so the arithmetic is the resident path's; what can differ is the alignment of a weight's
buffer, which can change the summation order of a CPU GEMM (a difference around 1e-6 before
rounding to 8 bits).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled

from engine.engine import KontextEngine
from engine.memory_plan import get_tier
from engine.requests import EditRequest
from stages.config import OptimizationConfig

LEVELS = 1  # the tolerance above, in 8-bit levels


def _engine(**knobs) -> KontextEngine:
    return KontextEngine.load("tiny", "cpu", OptimizationConfig(**knobs), max_variants=2)


def _pixels(engine: KontextEngine, request: EditRequest) -> np.ndarray:
    return np.asarray(engine.edit(request).images[0]).astype(int)


@pytest.fixture(scope="module")
def request_at_tile_size(photo_module) -> EditRequest:
    # 256x192 fits the tiny VAE's 256 px tile: tiling, where a tier turns it on, decodes exactly as untiled
    return EditRequest(prompt="make the sky red", image=photo_module, width=256, height=192, steps=3, seed=11)


@pytest.fixture(scope="module")
def photo_module():
    rng = np.random.default_rng(3)
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def fp8_resident(request_at_tile_size):
    """The medium tier on the tiny model: FP8 weights (weight-only on a CPU), everything resident."""
    engine = _engine(**get_tier("medium").changes)
    return engine, _pixels(engine, request_at_tile_size)


@pytest.mark.parametrize("tier", ["small", "tiny"])
def test_offloaded_tiers_give_the_resident_pixels(tier, fp8_resident, request_at_tile_size):
    _, reference = fp8_resident
    engine = _engine(**get_tier(tier).changes)
    assert _is_group_offload_enabled(engine.loaded.pipe.text_encoder_2) and _is_group_offload_enabled(engine.loaded.pipe.text_encoder)
    result = engine.edit(request_at_tile_size)
    transformer = engine.variants.pipeline_for(result.config)[0].transformer
    assert _is_group_offload_enabled(transformer) == (tier == "tiny")
    assert not _is_group_offload_enabled(engine.loaded.pipe.transformer), "the base carries no hooks; its clones do"
    difference = np.abs(np.asarray(result.images[0]).astype(int) - reference).max()
    assert difference <= LEVELS, (tier, difference)


def test_text_encoders_on_the_cpu_give_the_resident_pixels(fp8_resident, request_at_tile_size):
    _, reference = fp8_resident
    engine = _engine(**{**get_tier("small").changes, "text_encoders": "cpu"})
    assert hasattr(engine.loaded.pipe.text_encoder_2, "_hf_hook")  # accelerate's hook moves the ids and embeddings
    assert np.abs(_pixels(engine, request_at_tile_size) - reference).max() <= LEVELS


def test_bf16_group_offload_gives_the_resident_pixels(tiny_engine, request_at_tile_size):
    engine = _engine(transformer_offload=True)
    assert np.abs(_pixels(engine, request_at_tile_size) - _pixels(tiny_engine, request_at_tile_size)).max() <= LEVELS


def test_fp8_from_load_moves_pixels_a_little_and_says_what_ran(tiny_engine, fp8_resident, request_at_tile_size):
    engine, fp8 = fp8_resident
    bf16 = _pixels(tiny_engine, request_at_tile_size)
    difference = np.abs(fp8 - bf16)
    assert 0 < difference.max() <= 16 and difference.mean() < 1, "FP8 weights move the output, but it is the same picture"
    report = engine.resolve().report("transformer_fp8")
    assert report.active and "weight" in report.detail
    assert engine.memory_report()["loaded_knobs"]["transformer_fp8"] == "weight_only"


def test_vae_tiling_tiles_only_above_the_tile_size(monkeypatch, request_at_tile_size):
    engine = _engine(vae_tiling=True)
    vae = engine.loaded.pipe.vae
    tiled = []
    original = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda *args, **kwargs: (tiled.append(True), original(*args, **kwargs))[1])
    untiled = KontextEngine.load("tiny", "cpu")
    assert np.array_equal(_pixels(engine, request_at_tile_size), _pixels(untiled, request_at_tile_size)) and not tiled
    engine.edit(EditRequest(prompt="x", width=384, height=256, steps=1, seed=1))
    assert tiled, "an output wider than the tile decodes tile by tile"


def test_out_of_memory_in_an_offloaded_edit_fails_that_request_and_the_next_is_served(request_at_tile_size):
    """As for a resident model (tests/test_service_queue.py): 503, memory released, serving on,
    here with the transformer's and text encoders' offload hooks in the way."""
    from service.app import create_app
    from service.settings import ServiceSettings
    from tests.asgi_client import ready_client

    engine = _engine(**get_tier("tiny").changes)
    body = {"prompt": "make the sky red", "width": 64, "height": 64, "steps": 2, "seed": 4}
    expected = _pixels(engine, EditRequest(**{k: v for k, v in body.items()}))
    transformer = engine.variants.pipeline_for(engine.resolve().effective)[0].transformer
    failures = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")]

    def fail_once(module, args):
        if failures:
            raise failures.pop()

    handle = transformer.single_transformer_blocks[1].register_forward_pre_hook(fail_once)  # mid-step, blocks onloaded
    app = create_app(engine, ServiceSettings(warmup=False))

    async def scenario():
        async with await ready_client(app) as client:
            failed = await client.post("/inference", json=body, headers={"Accept": "application/json"})
            served = await client.post("/inference", json=body, headers={"Accept": "image/png"})
            return failed, served

    try:
        failed, served = asyncio.run(scenario())
    finally:
        app.state.service.stop()
        handle.remove()
    assert failed.status_code == 503 and failed.json()["error"]["type"] == "gpu_out_of_memory"
    assert served.status_code == 200
    from io import BytesIO

    from PIL import Image

    again = np.asarray(Image.open(BytesIO(served.content))).astype(int)
    assert np.abs(again - expected).max() <= LEVELS


def test_stream_prefetch_hooks_register_on_every_offloaded_component(monkeypatch):
    """With CUDA streams diffusers adds prefetch hooks that trace the execution order, and they can
    clash: block-level T5 offload with block_modules=["encoder"] registered its tracker twice. Hook
    registration needs no GPU, so this runs the stages' own offload calls for a CUDA device with
    CUDA's stream class stubbed and host-memory pinning skipped."""
    import diffusers.hooks.group_offloading as group_offloading
    from torchao.quantization import quantize_

    from engine.model_builders import build_tiny_pipeline
    from stages.base import BuildContext
    from stages.environment import current_environment
    from stages.text_encoder_fp8 import text_encoder_fp8_config
    from stages.text_encoder_offload import TextEncoderOffload
    from stages.transformer_offload import TransformerOffload

    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: object())
    unpinned = staticmethod(
        lambda tensor, low_cpu_mem_usage: tensor.cpu() if group_offloading._is_torchao_tensor(tensor) else tensor.data.cpu()
    )
    monkeypatch.setattr(group_offloading.ModuleGroup, "_to_cpu", unpinned)
    pipe = build_tiny_pipeline()
    quantize_(pipe.text_encoder_2, text_encoder_fp8_config(), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    build = BuildContext(current_environment("cpu"), torch.device("cuda"), torch.float32)
    TextEncoderOffload().apply_load(pipe, OptimizationConfig(text_encoders="offloaded"), build)
    TransformerOffload().apply_execution(pipe.transformer, OptimizationConfig(transformer_offload=True), build)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        assert module._diffusers_hook.get_hook("lazy_prefetch_group_offloading") is not None, type(module).__name__


def test_the_first_block_cache_composes_with_group_offload():
    request = EditRequest(prompt="x", width=128, height=128, steps=4, seed=2)
    knobs = dict(first_block_cache=True, cache_backend="para_attn", cache_threshold=0.5)
    resident, offloaded = _engine(**knobs).edit(request), _engine(**knobs, transformer_offload=True).edit(request)
    assert offloaded.extras["first_block_cache"] == resident.extras["first_block_cache"]
    assert offloaded.extras["first_block_cache"]["skipped"] > 0
    assert np.abs(np.asarray(offloaded.images[0]).astype(int) - np.asarray(resident.images[0]).astype(int)).max() <= LEVELS
