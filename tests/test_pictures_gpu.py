"""engine/pictures.py on a GPU: the conditioning picture uploaded as uint8 and made float there
reaches the VAE exactly as diffusers' host-side preprocess makes it (values, dtype, strides), the
8-bit pictures made on the GPU equal diffusers' postprocess, and a whole edit draws the same
picture either way. Skipped, with the reason, without a CUDA GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import engine as engine_module
from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.pictures import conditioning_pixels, pictures_from_pixels
from engine.requests import EditRequest
from stages.config import cumulative_config
from stages.environment import current_environment
from tests.conftest import requires_cuda
from tests.test_pictures import step_three_output

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0")


@pytest.mark.parametrize("auto_resize", [True, False])
@pytest.mark.parametrize("size", [(1000, 700), (1024, 1024), (333, 517)])
def test_the_vae_input_is_diffusers_input_bit_for_bit(pipe, auto_resize, size):
    width, height = size
    levels = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3) * 7 % 256
    picture = Image.fromarray(levels.astype(np.uint8))
    ours = conditioning_pixels(pipe.image_processor, picture, pipe.vae_scale_factor * 2, auto_resize, "cuda:0")
    # prepare_latents moves the image to the transformer's device and dtype before the VAE
    reference = step_three_output(pipe, picture, auto_resize).to("cuda:0", torch.bfloat16)
    mine = step_three_output(pipe, ours, auto_resize).to("cuda:0", torch.bfloat16)
    assert mine.shape == reference.shape and mine.stride() == reference.stride()
    assert torch.equal(mine, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_pictures_made_on_the_gpu_are_diffusers_pictures(pipe, dtype):
    generator = torch.Generator(device="cuda:0").manual_seed(0)
    pixels = (torch.randn(2, 3, 256, 320, generator=generator, device="cuda:0") * 0.7).to(dtype)
    ours = pictures_from_pixels(pipe.image_processor, pixels)
    theirs = pipe.image_processor.postprocess(pixels, output_type="pil")
    for mine, reference in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(mine), np.asarray(reference))


def test_an_edit_draws_the_same_picture_with_the_upload(pipe, photo):
    env = current_environment()
    spec = ModelSpec("tiny", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    engine = KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, cumulative_config(0), max_variants=1)
    request = EditRequest(prompt="make the sky red", image=photo, width=256, height=256, steps=3, seed=5)
    ours = engine.edit(request).images[0]
    original = engine_module.conditioning_pixels
    engine_module.conditioning_pixels = lambda processor, picture, *args: picture  # diffusers' own preprocess
    try:
        theirs = engine.edit(request).images[0]
    finally:
        engine_module.conditioning_pixels = original
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
