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
