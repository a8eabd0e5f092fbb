"""The memory tiers' mechanisms on a GPU, where group offload streams on CUDA streams and the FP8
weights are row-wise (FP8 GEMMs): same pixels as the resident FP8 model, and the prequantized round
trip. A small model with FLUX's real head size; skipped, with the reason, without a CUDA GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.checkpoints import save_prequantized
from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.memory_plan import get_tier
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest
from stages.config import OptimizationConfig
from stages.environment import current_environment
from tests.conftest import requires_cuda
from tests.test_gpu_stages import GPU_TEST_TRANSFORMER

pytestmark = [requires_cuda, pytest.mark.gpu]
REQUEST = EditRequest(prompt="make the sky red", width=256, height=256, steps=4, seed=5)


def _engine(tier: str) -> KontextEngine:
    env = current_environment("cuda:0")
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER)
    spec = ModelSpec("tiny-hd128", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    config = OptimizationConfig(**get_tier(tier).changes)
    return KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, config)


def _pixels(engine: KontextEngine) -> np.ndarray:
    return np.asarray(engine.edit(REQUEST).images[0]).astype(int)


def test_streamed_tiers_give_the_resident_pixels():
    medium = _engine("medium")
    if torch.cuda.get_device_capability() >= (8, 9):
        assert medium.memory_report()["loaded_knobs"]["transformer_fp8"] == "rowwise"
    reference = _pixels(medium)
    for tier in ("small", "tiny"):
        engine = _engine(tier)
        first, again = _pixels(engine), _pixels(engine)  # the second edit runs on the traced prefetch order
        assert np.abs(first - reference).max() <= 1 and np.abs(again - reference).max() <= 1, tier
        assert next(engine.loaded.pipe.transformer.parameters()).device.type == ("cpu" if tier == "tiny" else "cuda")


def test_prequantized_round_trip_on_the_gpu(tmp_path):
    engine = _engine("medium")
    save_prequantized(engine.loaded.pipe, tmp_path, source="tiny-hd128", knobs={})
    loaded = KontextEngine.load(str(tmp_path), "cuda:0")
    assert loaded.loaded.prequantized == {"transformer", "text_encoder_2"}
    assert np.abs(_pixels(loaded) - _pixels(engine)).max() <= 1


def test_a_deferred_move_to_host_memory_goes_in_slices_and_changes_no_pixel(photo, monkeypatch):
    import engine.variants as variants_module
    from stages.config import OptimizationConfig as Config

    engine = _engine("large")
    engine.variants.defer_residency = True  # as the server sets it before its first shape
    fp8 = Config(quantization="fp8")
    request = EditRequest(prompt="make the sky red", image=photo, width=256, height=256, steps=4, seed=5)
    first = np.asarray(engine.edit(request, fp8).images[0]).astype(int)
    proj = lambda: engine.loaded.pipe.transformer.single_transformer_blocks[0].proj_mlp.weight  # noqa: E731 - the base's, as it is now
    assert engine.variants.residency_pending and proj().device.type == "cuda"  # an H100 has room for it beside an edit

    monkeypatch.setattr(variants_module, "SETTLE_SLICE_BYTES", 1)  # one tensor a slice
    slices = 1
    while engine.variants.settle_some():
        slices += 1
    assert slices > 1 and not engine.variants.residency_pending and proj().device.type == "cpu"
    assert np.abs(np.asarray(engine.edit(request, fp8).images[0]).astype(int) - first).max() == 0
